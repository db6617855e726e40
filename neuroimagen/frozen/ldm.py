"""Training the tiny latent diffusion model of the embedded default, once per content hash.

:func:`train_tiny_ldm` trains a tiny ``AutoencoderKL`` (reconstruction + KL) and then a tiny
``UNet2DConditionModel`` (epsilon prediction, DDPM noise schedule of SD) on the dataset's *training*
images, conditioned on the run's text-encoder embeddings of their captions (label captions and per-image
captions, dropped to the empty caption 10 % of the time for classifier-free guidance). The caller saves the
result with ``neuroimagen.models.ldm.save_snapshot`` in the Stable Diffusion snapshot layout under
``<run>/ldm/tiny-<key>/``, :func:`tiny_ldm_key` being everything that determines it, and loads it back
through the same loader as a pretrained snapshot.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from neuroimagen.config import LDMConfig
from neuroimagen.errors import DataError
from neuroimagen.logs import Progress, get_logger
from neuroimagen.models.ldm import SD_SCHEDULE, build_tiny_unet, build_tiny_vae

_log = get_logger(__name__)


def tiny_ldm_key(te_identity: str, image_ids: Sequence[str], captions: Sequence[Sequence[str]], lc: LDMConfig) -> str:
    """Cache key of a tiny LDM: text encoder, training images and captions, and the tiny-LDM settings."""
    doc = [te_identity, list(image_ids), [list(c) for c in captions], lc.resolution, list(lc.vae_channels),
           list(lc.unet_channels), lc.vae_steps, lc.unet_steps, lc.train_batch_size, lc.lr, lc.cond_dropout, lc.seed]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def train_tiny_ldm(images: torch.Tensor, caption_embeds: Sequence[torch.Tensor], empty_embed: torch.Tensor,
                   lc: LDMConfig, progress: bool = True, log: Optional[Callable[[str], None]] = None) -> dict:
    """Train a tiny VAE, then a conditional UNet; returns {'vae', 'unet', 'history'}.

    images: (N, 3, R, R) in [0, 1], the training images. caption_embeds: a list of (N, L, E) tensors, one
    per caption kind (row i = a caption of image i); each step draws one kind per image. empty_embed:
    (L, E), the embedding of the empty caption (classifier-free-guidance dropout target).
    """
    from diffusers import DDPMScheduler  # ~7 s to import: only when a tiny LDM is actually trained

    log = log or _log.info
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
    bar = Progress(total=lc.vae_steps, desc="tiny LDM: VAE", unit="steps", logger=_log, enabled=progress)
    for step in range(lc.vae_steps):
        x = _augment(x_all[torch.randint(0, N, (bs,), generator=g)], g)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-5 * post.kl().mean() / (x[0].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["vae"].append(loss.item())
        bar.set_postfix(f"mse={history['vae'][-1]:.4f}")
        bar.update(1)
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
    bar.close()
    bar = Progress(total=lc.unet_steps, desc="tiny LDM: UNet", unit="steps", logger=_log, enabled=progress)
    for step in range(lc.unet_steps):
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
        bar.set_postfix(f"eps_mse={history['unet'][-1]:.4f}")
        bar.update(1)
    bar.close()
    unet.eval().requires_grad_(False)
    tail = history["unet"][-max(1, lc.unet_steps // 10):]
    log(f"tiny LDM: UNet epsilon MSE {sum(tail) / len(tail):.4f} over the last {len(tail)} steps (1.0 = predicting nothing)")
    return {"vae": vae, "unet": unet, "history": history}
