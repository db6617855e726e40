"""Stage 4's frozen latent diffusion model: Stable Diffusion from local files, or a tiny one trained here.

Both paths end in the same object, a ``StableDiffusionImg2ImgPipeline`` loaded from a directory in the
Stable Diffusion snapshot layout (``model_index.json``, ``vae/``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), and the same call (:func:`img2img`)::

    pipe(image=init, prompt_embeds=h, negative_prompt_embeds=h_empty, strength=s, guidance_scale=g,
         num_inference_steps=n, generator=[one torch.Generator per image])

* Real: ``ldm.pretrained`` names a local snapshot directory or a model id already in the local Hugging
  Face cache (Stable Diffusion 1.5 / 2.1). Nothing is ever downloaded (``local_files_only=True``).
* Embedded default: :func:`train_tiny_ldm` trains a tiny ``AutoencoderKL`` (reconstruction + KL) and then a
  tiny ``UNet2DConditionModel`` (epsilon prediction, DDPM noise schedule of SD) on the dataset's
  *training* images, conditioned on the run's text-encoder embeddings of their captions (label captions
  and per-image captions, dropped to the empty caption 10 % of the time for classifier-free guidance). The
  result is saved with ``save_pretrained`` in the snapshot layout under ``<run>/ldm/tiny-<hash>/``, keyed
  by everything that determines it, and loaded back through the real-path loader.

"Pure noise" variants (the paper's L and B) use the text-to-image pipeline built from the same components
(:func:`text2img`). Sampling is DDIM (eta 0): the only randomness is each image's own generator, so an
image does not depend on which batch it was generated in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from neuroimagen.errors import ConfigError, DataError

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


def tiny_ldm_key(te_identity: str, image_ids: Sequence[str], captions: Sequence[Sequence[str]], lc) -> str:
    """Cache key of a tiny LDM: text encoder, training images and captions, and the tiny-LDM settings."""
    doc = [te_identity, list(image_ids), [list(c) for c in captions], lc.resolution, list(lc.vae_channels),
           list(lc.unet_channels), lc.vae_steps, lc.unet_steps, lc.train_batch_size, lc.lr, lc.cond_dropout, lc.seed]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def train_tiny_ldm(images: torch.Tensor, caption_embeds: Sequence[torch.Tensor], empty_embed: torch.Tensor, lc,
                   progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train a tiny VAE, then a conditional UNet; returns {'vae', 'unet', 'history'}.

    images: (N, 3, R, R) in [0, 1], the training images. caption_embeds: a list of (N, L, E) tensors, one
    per caption kind (row i = a caption of image i); each step draws one kind per image. empty_embed:
    (L, E), the embedding of the empty caption (classifier-free-guidance dropout target).
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    torch.manual_seed(lc.seed)
    g = torch.Generator().manual_seed(lc.seed)
    x_all = images.float() * 2 - 1  # (N, 3, R, R) in [-1, 1]
    N = x_all.shape[0]
    if N == 0:
        raise DataError("ldm: no training images to train the tiny latent diffusion model on")
    bs = min(lc.train_batch_size, N)
    history: dict[str, list] = {"vae": [], "unet": []}

    # --- VAE: MSE reconstruction + small KL, then the latent scaling factor (1 / std of latents)
    vae = build_tiny_vae(lc.resolution, lc.vae_channels)
    opt = torch.optim.AdamW(vae.parameters(), lr=lc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=lc.vae_steps)
    bar = tqdm(range(lc.vae_steps), desc="tiny LDM: VAE", disable=None if progress else True, leave=False)
    for step in bar:
        x = _augment(x_all[torch.randint(0, N, (bs,), generator=g)], g)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-5 * post.kl().mean() / (x[0].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["vae"].append(loss.item())
        bar.set_postfix(mse=f"{history['vae'][-1]:.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(x_all[i:i + 64]).latent_dist.mode() for i in range(0, N, 64)])
        scale = float(1.0 / lat.std().clamp_min(1e-6))
        rec = torch.cat([vae.decode(lat[i:i + 64]).sample for i in range(0, N, 64)])
    vae.register_to_config(scaling_factor=scale)
    history["vae_recon_mse"] = float(F.mse_loss(rec.clamp(-1, 1), x_all))
    log(f"tiny LDM: VAE reconstruction MSE {history['vae_recon_mse']:.4f} (images in [-1, 1]), latent scale {scale:.3f}")

    # --- UNet: epsilon prediction on scaled latents, conditioned on caption embeddings
    noise_sched = DDPMScheduler(**SD_SCHEDULE)
    lat = lat * scale  # (N, 4, r, r)
    kinds = torch.stack([c.float() for c in caption_embeds])  # (K, N, L, E)
    unet = build_tiny_unet(lat.shape[-1], kinds.shape[-1], lc.unet_channels)
    opt = torch.optim.AdamW(unet.parameters(), lr=lc.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=lc.unet_steps)
    bar = tqdm(range(lc.unet_steps), desc="tiny LDM: UNet", disable=None if progress else True, leave=False)
    for step in bar:
        idx = torch.randint(0, N, (bs,), generator=g)
        z0 = lat[idx]
        flip = torch.rand(bs, generator=g) < 0.5
        with torch.no_grad():  # flipping the image is flipping its latent, up to the VAE's equivariance
            z0 = torch.where(flip.view(-1, 1, 1, 1), z0.flip(-1), z0)
        kind = torch.randint(0, kinds.shape[0], (bs,), generator=g)
        cond = kinds[kind, idx]  # (bs, L, E)
        drop = torch.rand(bs, generator=g) < lc.cond_dropout
        cond = torch.where(drop.view(-1, 1, 1), empty_embed.view(1, *empty_embed.shape).expand_as(cond), cond)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (bs,), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        history["unet"].append(loss.item())
        bar.set_postfix(eps_mse=f"{history['unet'][-1]:.4f}")
    unet.eval().requires_grad_(False)
    tail = history["unet"][-max(1, lc.unet_steps // 10):]
    log(f"tiny LDM: UNet epsilon MSE {sum(tail) / len(tail):.4f} over the last {len(tail)} steps (1.0 = predicting nothing)")
    return {"vae": vae, "unet": unet, "history": history}


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

