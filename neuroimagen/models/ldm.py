"""Stage 4's frozen latent diffusion model: Stable Diffusion from local files, or a tiny one trained here.

Both paths end in the same object, a ``StableDiffusionImg2ImgPipeline`` loaded from a directory in the
Stable Diffusion snapshot layout (``model_index.json``, ``vae/``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), and the same call (:func:`img2img`)::

    pipe(image=init, prompt_embeds=h, negative_prompt_embeds=h_empty, strength=s, guidance_scale=g,
         num_inference_steps=n, generator=[one torch.Generator per image])

* Real: ``ldm.pretrained`` names a local snapshot directory or a model id already in the local Hugging
  Face cache (Stable Diffusion 1.5 / 2.1). Nothing is ever downloaded (``local_files_only=True``).
* Embedded default: a tiny ``AutoencoderKL`` + ``UNet2DConditionModel`` (:func:`build_tiny_vae`,
  :func:`build_tiny_unet`) trained on the dataset's *training* images by
  ``neuroimagen.frozen.ldm.train_tiny_ldm``, saved by :func:`save_snapshot` in the snapshot layout under
  ``<run>/ldm/tiny-<hash>/`` and loaded back through the real-path loader.

"Pure noise" variants (the paper's L and B) use the text-to-image pipeline built from the same components
(:func:`text2img`). Sampling is DDIM (eta 0): the only randomness is each image's own generator, so an
image does not depend on which batch it was generated in.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from neuroimagen.errors import ConfigError

# SD 1.x noise schedule (scheduler_config.json of stable-diffusion-v1-5)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _quiet_diffusers() -> None:
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# Tiny components
# ---------------------------------------------------------------------------------------------------------------


def build_tiny_vae(resolution: int, channels: Sequence[int] = (16, 32), latent_channels: int = 4):
    """AutoencoderKL with ``len(channels) - 1`` halvings: (B, 3, R, R) <-> (B, 4, R / 2^(n-1), ...)."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(channels),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8,
                         sample_size=resolution)


def build_tiny_unet(latent_size: int, cross_attention_dim: int, channels: Sequence[int] = (32, 64)):
    """UNet2DConditionModel with cross-attention on the lower-resolution level only (CPU-friendly)."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=tuple(channels), down_block_types=down, up_block_types=up,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def save_snapshot(directory: str | os.PathLike, vae, unet, text_encoder, extra: Optional[dict] = None) -> Path:
    """Write a Stable Diffusion snapshot directory (atomically) from components + ``neuroimagen.json``."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from neuroimagen.atomic import atomic_dir

    _quiet_diffusers()
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder.model, tokenizer=text_encoder.tokenizer,
                                          unet=unet, scheduler=ddim_scheduler(), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    with atomic_dir(directory, overwrite=True) as stage:
        pipe.save_pretrained(str(stage))
        text_encoder.save(stage)  # also the classic vocab.json + merges.txt
        (stage / "neuroimagen.json").write_text(json.dumps(extra or {}, indent=1), encoding="utf-8")
    return Path(directory)


# ---------------------------------------------------------------------------------------------------------------
# Loading (real path and cached tiny snapshots alike)
# ---------------------------------------------------------------------------------------------------------------


def resolve_snapshot(path: str) -> Path:
    """A local snapshot directory, or a model id already in the local HF cache; ConfigError otherwise."""
    expected = "expected a Stable Diffusion snapshot directory (model_index.json, vae/, unet/, text_encoder/, tokenizer/)"
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        root = p.resolve()
    elif p.exists():
        raise ConfigError(f"ldm.pretrained: {path}: is a file; {expected}")
    elif _REPO_ID.match(path) and ".." not in path and "--" not in path:
        from neuroimagen.models.text_encoder import _cached_snapshot

        root = _cached_snapshot(path)
        if root is None:
            raise ConfigError(f"ldm.pretrained: {path}: not a local directory and not in the local Hugging Face "
                              f"cache (nothing is downloaded); {expected}")
    else:
        raise ConfigError(f"ldm.pretrained: {path}: no such directory; {expected}")
    missing = [d for d in ("model_index.json", "vae", "unet", "text_encoder", "tokenizer", "scheduler")
               if not (root / d).exists()]
    if missing:
        raise ConfigError(f"ldm.pretrained: {path}: missing {', '.join(missing)}; {expected}")
    return root


def load_img2img(path: str, device: str | torch.device = "cpu", dtype: str = "float32",
                 attention_slicing: bool = False, attention: str = "sdpa"):
    """``StableDiffusionImg2ImgPipeline`` from a local snapshot, offline, DDIM (eta 0) scheduler, no safety checker.

    ``attention``: ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``: flash / memory-efficient
    kernels on GPUs) or ``eager`` (explicit matmul + softmax) in every UNet and VAE attention layer; the two
    agree to float tolerance. ``attention_slicing`` then replaces both with sliced attention.
    """
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    _quiet_diffusers()
    if dtype not in _DTYPES:
        raise ConfigError(f"ldm.dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    root = resolve_snapshot(path)
    try:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            str(root), local_files_only=True, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    except Exception as exc:  # noqa: BLE001 - any loading failure is a bad snapshot
        text = " ".join(str(exc).split())[:200] or exc.__class__.__name__
        raise ConfigError(f"ldm.pretrained: {path}: cannot load a Stable Diffusion img2img pipeline ({text})") from exc
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                               steps_offset=1)
    pipe = pipe.to(device, _DTYPES[dtype]) if dtype != "float32" else pipe.to(device)
    set_attention(pipe, attention)
    if attention_slicing:
        pipe.enable_attention_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_attention(pipe, attention: str) -> None:
    """Use ``sdpa`` or ``eager`` attention processors in the pipeline's UNet and VAE."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    kinds = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}
    if attention not in kinds:
        raise ConfigError(f"ldm.attention: expected one of {', '.join(kinds)}, got {attention!r}")
    for model in (pipe.unet, pipe.vae):
        if model.attn_processors:
            model.set_attn_processor(kinds[attention]())


def text2img_from(img2img_pipe):
    """The text-to-image pipeline sharing the img2img pipeline's components (no copy of the weights)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**img2img_pipe.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def snapshot_resolution(path: str) -> int:
    """The image size of a snapshot's UNet, from its config files alone (no weights loaded)."""
    root = resolve_snapshot(path)
    try:
        unet = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"ldm.pretrained: {path}: unreadable unet/ or vae/ config.json ({exc.__class__.__name__})") from None


def pipeline_resolution(pipe) -> int:
    """The image size the UNet was trained for: ``unet.sample_size * vae_scale_factor``."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _generators(seeds: Sequence[int], device) -> list[torch.Generator]:
    dev = torch.device(device)
    return [torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def img2img(pipe, init: torch.Tensor, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
            seeds: Sequence[int], strength: float, guidance_scale: float, num_inference_steps: int) -> torch.Tensor:
    """(B, 3, h, w) init images in [0, 1] (resized to the pipeline's resolution) + (B, L, E) embeddings ->
    (B, 3, R, R) float32 images in [0, 1] on the CPU. One generator per image, seeded by ``seeds``."""
    R = pipeline_resolution(pipe)
    dev, dt = pipe.unet.device, pipe.unet.dtype
    if init.shape[-1] != R or init.shape[-2] != R:
        init = F.interpolate(init.float(), size=(R, R), mode="bicubic", align_corners=False).clamp(0, 1)
    out = pipe(image=init.to(dev, dt), prompt_embeds=prompt_embeds.to(dev, dt),
               negative_prompt_embeds=negative_prompt_embeds.to(dev, dt), strength=float(strength),
               guidance_scale=float(guidance_scale), num_inference_steps=int(num_inference_steps),
               generator=_generators(seeds, dev), output_type="pt")
    return out.images.float().cpu().clamp(0, 1)


@torch.no_grad()
def text2img(pipe, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor, seeds: Sequence[int],
             guidance_scale: float, num_inference_steps: int) -> torch.Tensor:
    """(B, L, E) embeddings -> (B, 3, R, R) images in [0, 1], from pure noise (``pipe``: :func:`text2img_from`)."""
    R = pipeline_resolution(pipe)
    dev, dt = pipe.unet.device, pipe.unet.dtype
    out = pipe(prompt_embeds=prompt_embeds.to(dev, dt), negative_prompt_embeds=negative_prompt_embeds.to(dev, dt),
               height=R, width=R, guidance_scale=float(guidance_scale), num_inference_steps=int(num_inference_steps),
               generator=_generators(seeds, dev), output_type="pt")
    return out.images.float().cpu().clamp(0, 1)

