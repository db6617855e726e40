"""DiffAugment (Zhao et al. 2020): differentiable augmentation for data-efficient GAN training.

The same random augmentation family is applied to real *and* generated images before they reach the
discriminator, so the discriminator cannot overfit the small training set while the generator still
gets gradients through the augmentation.

NeuroImagen's pixel-level stage follows EEG2Image (Singh et al. 2023), which trains its conditional
GAN with the policy ``"color,translation"``; here the default is ``"color,translation,cutout"`` (all
three DiffAugment policies), as the project issue asks. Pass ``policy="color,translation"`` to
reproduce the EEG2Image setting.

Policies (all per sample, randomness only from the optional ``generator``):

- ``color``: brightness ``x + U(-0.5, 0.5)``, saturation (deviation from the per-pixel channel mean
  scaled by ``U(0, 2)``), contrast (deviation from the per-image mean scaled by ``U(0.5, 1.5)``);
- ``translation``: integer shift by up to ``0.125`` of the size along each axis, zero padding;
- ``cutout``: a ``0.5 * size`` square set to zero at a random centre (clipped at the borders).
"""

from __future__ import annotations

import torch
from torch import Tensor

POLICIES = ("color", "translation", "cutout")

_TRANSLATION_RATIO = 0.125
_CUTOUT_RATIO = 0.5


def _rand(b: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """(B, 1, 1, 1) draws of U(0, 1), made on the generator's device, returned on x's device/dtype."""
    device = generator.device if generator is not None else x.device
    u = torch.rand(b, 1, 1, 1, generator=generator, device=device)
    return u.to(device=x.device, dtype=x.dtype)


def _randint(low: int, high: int, b: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """(B,) integers uniform in [low, high), on x's device."""
    device = generator.device if generator is not None else x.device
    return torch.randint(low, high, (b,), generator=generator, device=device).to(x.device)


def _color(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random brightness, saturation, contrast per sample: (B, C, H, W) -> (B, C, H, W)."""
    b = x.shape[0]
    x = x + (_rand(b, x, generator) - 0.5)  # brightness
    x_mean = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    x = (x - x_mean) * (_rand(b, x, generator) * 2.0) + x_mean  # saturation
    x_mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (x - x_mean) * (_rand(b, x, generator) + 0.5) + x_mean  # contrast
    return x


def _translation(x: Tensor, ratio: float = _TRANSLATION_RATIO, generator: torch.Generator | None = None) -> Tensor:
    """Shift each sample by integers in ``[-round(ratio*H), round(ratio*H)]`` x same for W, zero padding.

    (B, C, H, W) -> (B, C, H, W); implemented with ``gather`` so it is differentiable w.r.t. ``x``.
    Output pixel ``(i, j)`` reads input ``(i + ty, j + tx)`` (zero if that is outside the image).
    """
    b, c, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = _randint(-sh, sh + 1, b, x, generator)  # (B,)
    tx = _randint(-sw, sw + 1, b, x, generator)  # (B,)
    rows = torch.arange(h, device=x.device).unsqueeze(0) + ty.unsqueeze(1)  # (B, H) source rows
    cols = torch.arange(w, device=x.device).unsqueeze(0) + tx.unsqueeze(1)  # (B, W) source columns
    row_ok = (rows >= 0) & (rows < h)  # (B, H)
    col_ok = (cols >= 0) & (cols < w)  # (B, W)
    row_idx = rows.clamp(0, h - 1).view(b, 1, h, 1).expand(b, c, h, w)  # (B, C, H, W)
    col_idx = cols.clamp(0, w - 1).view(b, 1, 1, w).expand(b, c, h, w)  # (B, C, H, W)
    out = x.gather(2, row_idx).gather(3, col_idx)  # (B, C, H, W)
    keep = (row_ok.view(b, 1, h, 1) & col_ok.view(b, 1, 1, w)).to(x.dtype)  # (B, 1, H, W)
    return out * keep


def _cutout(x: Tensor, ratio: float = _CUTOUT_RATIO, generator: torch.Generator | None = None) -> Tensor:
    """Zero a ``round(ratio*H) x round(ratio*W)`` rectangle per sample, centre uniform over the image.

    (B, C, H, W) -> (B, C, H, W). The rectangle is clipped at the borders (at least half of each side
    stays inside), exactly as in the reference DiffAugment code.
    """
    b, c, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = _randint(0, h + (1 - ch % 2), b, x, generator)  # (B,) centre row
    ox = _randint(0, w + (1 - cw % 2), b, x, generator)  # (B,) centre column
    top = (oy - ch // 2).unsqueeze(1)  # (B, 1)
    left = (ox - cw // 2).unsqueeze(1)  # (B, 1)
    r = torch.arange(h, device=x.device).unsqueeze(0)  # (1, H)
    q = torch.arange(w, device=x.device).unsqueeze(0)  # (1, W)
    in_rows = (r >= top) & (r < top + ch)  # (B, H)
    in_cols = (q >= left) & (q < left + cw)  # (B, W)
    cut = in_rows.view(b, 1, h, 1) & in_cols.view(b, 1, 1, w)  # (B, 1, H, W)
    return x * (~cut).to(x.dtype)


_FNS = {"color": _color, "translation": _translation, "cutout": _cutout}


def _parse_policy(policy: str) -> list[str]:
    """``"color, translation"`` -> ``["color", "translation"]``; unknown names raise ``ValueError``."""
    names = [p.strip() for p in policy.split(",") if p.strip()]
    for p in names:
        if p not in _FNS:
            raise ValueError(f"unknown DiffAugment policy '{p}' (known: {', '.join(POLICIES)})")
    return names


def diff_augment(x: Tensor, policy: str = "color,translation,cutout", generator: torch.Generator | None = None) -> Tensor:
    """Apply DiffAugment (Zhao et al. 2020) before the discriminator of the pixel stage (eqs. 2-3).

    Args:
        x: (B, 3, H, W) images in [-1, 1] (real or generated; the output may leave that range).
        policy: comma-separated subset of :data:`POLICIES`, applied in the given order;
            ``""`` returns ``x`` unchanged.
        generator: source of every random draw (same generator state -> same output); the global
            RNG when None. A CPU generator works for inputs on any device.

    Returns:
        (B, 3, H, W) augmented images, differentiable w.r.t. ``x``.
    """
    names = _parse_policy(policy)
    if x.dim() != 4:
        raise ValueError(f"diff_augment expects (B, C, H, W), got shape {tuple(x.shape)}")
    for p in names:
        x = _FNS[p](x, generator=generator)
    return x
