"""Generate: init image + prompt embedding -> an image from the frozen latent diffusion model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from neuroimagen.errors import ConfigError
from neuroimagen.models.ldm import img2img, pipeline_resolution, text2img, text2img_from
from neuroimagen.training.loop import kill_once


class Generate:
    """Rows with ``init``/``init_kind``/``prompt`` -> ``image`` (B, 3, R, R) in [0, 1]; drops ``prompt``.

    Rows whose ``init_kind`` is not ``noise`` go through img2img from their (upsampled) init image; the others
    through text-to-image from pure noise, with the same components. One generator per row, seeded by the
    row's ``seed_noise`` (trial, sample): the samples of one trial differ, every variant of (trial, sample) starts
    from the same noise, and no row's image depends on its batch.

    Components:
        pipe: a loaded ``StableDiffusionImg2ImgPipeline`` (``neuroimagen.models.ldm.load_img2img``).
        negative_prompt: (L, E), the embedding of the empty caption by the pipeline's own text encoder: the
            negative prompt of classifier-free guidance, and the shape every prompt must have.
        strength, guidance_scale, num_inference_steps: the img2img / text-to-image call (``ldm.*``).
        fault_batch, fault_marker: testing hook (``eval.fault_injection_batch``): this process dies on its
            Nth batch, once per ``fault_marker`` file.
    """

    def __init__(self, pipe, negative_prompt: torch.Tensor, *, strength: float, guidance_scale: float,
                 num_inference_steps: int, fault_batch: Optional[int] = None, fault_marker: Optional[Path] = None):
        self.pipe = pipe
        self.t2i = text2img_from(pipe)
        self.empty = negative_prompt
        self.strength, self.guidance_scale = float(strength), float(guidance_scale)
        self.num_inference_steps = int(num_inference_steps)
        self.fault_batch, self.fault_marker, self.calls = fault_batch, fault_marker, 0

    def __call__(self, batch: dict) -> dict:
        if self.fault_batch is not None and self.calls == self.fault_batch:
            kill_once(Path(self.fault_marker))
        self.calls += 1

        kinds = np.asarray(batch["init_kind"]).astype(str)
        prompt = torch.from_numpy(np.asarray(batch["prompt"], dtype=np.float32))  # (B, L, E)
        if prompt.shape[1:] != self.empty.shape:
            raise ConfigError(f"prompt embeddings are {tuple(prompt.shape[1:])} but the diffusion model's text encoder "
                              f"gives {tuple(self.empty.shape)}: train stage 3 with the LDM's own text encoder")
        init = torch.from_numpy(np.asarray(batch["init"], dtype=np.float32))
        seeds = [int(s) for s in batch["seed_noise"]]
        R = pipeline_resolution(self.pipe)
        images = torch.zeros(len(seeds), 3, R, R)
        neg = self.empty.expand(len(seeds), *self.empty.shape)
        for noise, sel in ((False, np.flatnonzero(kinds != "noise")), (True, np.flatnonzero(kinds == "noise"))):
            if len(sel) == 0:
                continue
            t = torch.from_numpy(sel)
            s = [seeds[i] for i in sel]
            if noise:
                images[t] = text2img(self.t2i, prompt[t], neg[t], s, self.guidance_scale, self.num_inference_steps)
            else:
                images[t] = img2img(self.pipe, init[t], prompt[t], neg[t], s, self.strength, self.guidance_scale,
                                    self.num_inference_steps)
        out = {k: v for k, v in batch.items() if k != "prompt"}
        out["image"] = images.numpy().astype(np.float32)
        return out
