"""Decode: EEG -> the init image and the prompt embedding of each row (the first of stage 4's callables)."""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Protocol

import numpy as np
import torch
from torch import nn

from neuroimagen.data.captions import label_caption
from neuroimagen.data.datasets import load_image
from neuroimagen.errors import ConfigError, DataError
from neuroimagen.models.saliency_gan import sample_z


class TextEmbedder(Protocol):
    def encode(self, captions: list[str]) -> torch.Tensor:
        """N captions -> (N, L, E) embeddings."""


class Decode:
    """Rows -> ``init`` (B, 3, r, r) in [0, 1] at the saliency resolution (zeros for noise), ``init_kind``,
    ``prompt`` (B, L, E): the prompt embedding each row's ``semantics`` asks for.

    Components (already loaded, in eval mode):
        segment: trial index -> its EEG segment (C, T), e.g. ``Recording.segment``.
        text: the text encoder of stage 3 (``encode(captions) -> (N, L, E)``), for the empty caption and
            the true captions of the oracle variants.
        encoder, generator: stage 1's f_theta and stage 2's G(z, f); needed by ``init_kind == 'saliency'``.
        regressors: stage-3 regressors EEG -> (L, E) by semantics (``label``, ``image``).
        z_dim, resolution: G's noise size and output resolution r (the init image size of every row).
        captions: per-image captions by image stem (``semantics == 'true_image'``), or None.

    Row ``i`` draws its noise z from a generator seeded by ``seed_z[i]``, a seed of its trial alone
    (:func:`~neuroimagen.reconstruction.rows.row_seeds`): every sample of one EEG trial, in every variant, gets
    the same z, so one saliency map per EEG (fed the same EEG, the same map); the init image does not depend
    on its batch. CPU.
    """

    def __init__(self, *, segment: Callable[[int], torch.Tensor], text: TextEmbedder, z_dim: int, resolution: int,
                 encoder: Optional[nn.Module] = None, generator: Optional[nn.Module] = None,
                 regressors: Optional[Mapping[str, nn.Module]] = None,
                 captions: Optional[Mapping[str, str]] = None):
        self.segment = segment
        self.text = text
        self.encoder, self.generator = encoder, generator
        self.regressors = dict(regressors or {})
        self.z_dim, self.res = int(z_dim), int(resolution)
        self.captions = captions
        self.empty = text.encode([""])[0]  # (L, E)
        self._true: dict[str, torch.Tensor] = {}

    def _true_embedding(self, caption: str) -> torch.Tensor:
        if caption not in self._true:
            self._true[caption] = self.text.encode([caption])[0]
        return self._true[caption]

    def _check(self, variant: str, kind: str, semantics: str) -> None:
        if kind == "saliency" and (self.encoder is None or self.generator is None):
            raise ConfigError(f"variant '{variant}': a saliency init needs the stage-1 encoder and stage-2 generator")
        if semantics in ("label", "image") and semantics not in self.regressors:
            raise ConfigError(f"variant '{variant}': '{semantics}' semantics need the stage-3 '{semantics}' regressor")

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        B = len(batch["item"])
        kinds = [str(k) for k in batch["init_kind"]]
        semantics = [str(s) for s in batch["semantics"]]
        for i in range(B):
            self._check(str(batch["variant"][i]), kinds[i], semantics[i])
        init = torch.zeros(B, 3, self.res, self.res)
        prompt = self.empty.expand(B, *self.empty.shape).clone()
        eeg = torch.stack([self.segment(int(j)) for j in batch["eeg_item"]])  # (B, C, T)
        feats = self.encoder(eeg) if self.encoder is not None else None
        preds = {kind: m(eeg) for kind, m in self.regressors.items()}  # (B, L, E) each
        for i in range(B):
            if kinds[i] == "saliency":
                z = sample_z(1, self.z_dim, generator=torch.Generator().manual_seed(int(batch["seed_z"][i])))
                init[i] = (self.generator(z, feats[i: i + 1])[0] + 1) / 2
            elif kinds[i] == "gt":
                init[i] = load_image(str(batch["gt"][i]), self.res)
            if semantics[i] in ("label", "image"):
                prompt[i] = preds[semantics[i]][i]
            elif semantics[i] == "true_label":
                prompt[i] = self._true_embedding(label_caption(str(batch["class_name"][i])))
            elif semantics[i] == "true_image":
                stem = str(batch["stem"][i])
                if self.captions is None or stem not in self.captions:
                    raise DataError(f"variant '{batch['variant'][i]}': no per-image caption for '{stem}' (data.captions)")
                prompt[i] = self._true_embedding(self.captions[stem])
        out = dict(batch)
        out["init"] = init.clamp(0, 1).numpy().astype(np.float32)
        out["init_kind"] = np.asarray(kinds, dtype=object)
        out["prompt"] = prompt.numpy().astype(np.float32)
        return out
