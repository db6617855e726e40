"""PixCorr: per-pair Pearson correlation of the pixels of a reconstruction and its ground truth (MindEye).

Source: MindEye 1 ``src/Reconstruction_Metrics.py`` (MedARC-AI/fMRI-reconstruction-NSD) and MindEye 2
``src/final_evaluations.ipynb`` (MedARC-AI/MindEyeV2); ATM reports the same suite on THINGS-EEG. The public
code, in order:

1. ``all_brain_recons.clamp(0, 1)`` (reconstructions only; ground truth is already in [0, 1]);
2. ``transforms.Resize((256, 256))`` of both sets (the grid-display cell, whose result every later metric
   inherits; MindEye 2 skips it for images already 256 px wide);
3. ``transforms.Resize(425, interpolation=BILINEAR)`` of both sets;
4. flatten each image over channels and pixels (3 x 425 x 425 values) and take
   ``np.corrcoef(gt_i, recon_i)[0, 1]`` per pair; PixCorr is the mean over pairs.

Both resizes are torchvision tensor resizes with the default ``antialias`` of the pinned torchvision (0.15.2
for MindEye 1, 0.16.0 for MindEye 2), which for tensors means **no antialiasing**: plain bilinear
``F.interpolate(..., align_corners=False, antialias=False)``, reproduced here.  An int size resizes the short
edge and keeps the aspect ratio (``int(size * long / short)``), as torchvision does; after step 2 every image
is square anyway.  Computation is in float64.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

MINDEYE_BASE_RESOLUTION = 256  # step 2: both image sets resized to 256 x 256 before every metric
PIXCORR_RESOLUTION = 425  # step 3


def _check_pair(pred: Tensor, gt: Tensor) -> None:
    for name, x in (("pred", pred), ("gt", gt)):
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must be a (B, 3, H, W) image tensor, got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must hold float images in [0, 1], got dtype {x.dtype}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have equal shapes, got {tuple(pred.shape)} vs {tuple(gt.shape)}")


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def torchvision_resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """``torchvision.transforms.Resize(size)`` on a (B, C, H, W) tensor, bilinear, without antialiasing.

    An int ``size`` sets the short edge to ``size`` and the long edge to ``int(size * long / short)``; a pair
    is (H, W).  Unchanged when the image already has that size (as bilinear interpolation to the same size is).
    """
    h, w = x.shape[-2:]
    if isinstance(size, int):
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = size, int(size * long / short)
        out = (new_short, new_long) if h <= w else (new_long, new_short)
    else:
        out = (int(size[0]), int(size[1]))
    if (h, w) == out:
        return x
    return F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=False)


@functools.lru_cache(maxsize=32)
def _resize_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) float64 matrix of a 1-D bilinear resize without antialiasing (``align_corners=False``), read
    off ``F.interpolate`` of the identity: resizing a (.., H, W) image is ``A_h @ x @ A_w.T``."""
    if n_in == n_out:
        return torch.eye(n_in, dtype=torch.float64)
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)  # batch i: the column e_i
    out = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False, antialias=False)
    return out.reshape(n_in, n_out).T.contiguous()


@functools.lru_cache(maxsize=16)
def _maps(h: int, w: int, resolution: int, base_resolution: int | None) -> tuple[Tensor, Tensor, int]:
    """(A_h, A_w, number of pixels per channel) of the whole preprocessing of an (h, w) image: the base step,
    then :func:`torchvision_resize` to ``resolution``, composed into one matrix per axis."""
    a_h, a_w = torch.eye(h, dtype=torch.float64), torch.eye(w, dtype=torch.float64)
    if base_resolution is not None:
        a_h, a_w = _resize_matrix(h, base_resolution) @ a_h, _resize_matrix(w, base_resolution) @ a_w
    hh, ww = a_h.shape[0], a_w.shape[0]
    short, long = (hh, ww) if hh <= ww else (ww, hh)
    new_short, new_long = resolution, int(resolution * long / short)
    oh, ow = (new_short, new_long) if hh <= ww else (new_long, new_short)
    a_h, a_w = _resize_matrix(hh, oh) @ a_h, _resize_matrix(ww, ow) @ a_w
    return a_h, a_w, oh * ow


def pixcorr_scores(pred: Tensor, gt: Tensor, resolution: int = PIXCORR_RESOLUTION,
                   base_resolution: int | None = MINDEYE_BASE_RESOLUTION, constant: str = "raise") -> Tensor:
    """Per-pair PixCorr, a float64 tensor of shape (B,) with values in [-1, 1].

    ``pred`` and ``gt`` are (B, 3, H, W) float images in [0, 1] of equal shape.  Protocol (module docstring):
    clamp to [0, 1], resize both to ``base_resolution`` x ``base_resolution`` (MindEye's 256 px step; ``None``
    skips it), then to ``resolution`` (short edge, 425), bilinear without antialiasing; Pearson r of the
    flattened 3 x H x W pixels per pair.  A constant image has no correlation: ``ValueError`` naming it, or NaN
    for that pair with ``constant="nan"`` (the scoring pass, where one degenerate generation must not stop a run).

    Computed without materialising the resized images: both resizes are linear, ``u = A_h x A_w^T`` per channel,
    so the sums of Pearson's r are ``sum u = a_h^T x a_w`` and ``sum u v = <M_h x M_w, y>`` with ``M = A^T A``
    (a few (H, H) products per image instead of two 425 x 425 float64 resizes; the same number up to float64
    rounding, ~1e-12).
    """
    if constant not in ("raise", "nan"):
        raise ValueError(f"constant must be 'raise' or 'nan', got {constant!r}")
    _check_pair(pred, gt)
    _check_size("resolution", resolution)
    _check_size("base_resolution", base_resolution)
    if pred.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=pred.device)
    return pixcorr_from_stats(pixcorr_stats(pred, resolution, base_resolution),
                              pixcorr_stats(gt, resolution, base_resolution), constant)


class PixStats(NamedTuple):
    """The sums PixCorr needs of one image set (B images), after its preprocessing (:func:`pixcorr_stats`):
    ``image`` the clamped image (B, 3, H, W) float64, ``total`` the sum of its resized pixels (B,), ``spread`` n
    times their variance (B,), ``flat`` whether the image is constant after preprocessing (B,), ``smoothed`` the
    image through ``M_h . M_w`` (B, 3, H, W): ``sum u v = <smoothed_u, image_v>``."""

    image: Tensor
    smoothed: Tensor
    total: Tensor
    spread: Tensor
    flat: Tensor
    n: int

    def select(self, index) -> "PixStats":
        """The stats of a subset (or a reordering, with repeats) of the images."""
        return PixStats(self.image[index], self.smoothed[index], self.total[index], self.spread[index],
                        self.flat[index], self.n)


def pixcorr_stats(images: Tensor, resolution: int = PIXCORR_RESOLUTION,
                  base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> PixStats:
    """:class:`PixStats` of (B, 3, H, W) float images in [0, 1]: compute them once for an image that is scored
    against several others (a ground truth shared by every variant and sample of a trial)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be a (B, 3, H, W) float image tensor, got shape "
                         f"{tuple(getattr(images, 'shape', ()))}")
    _check_size("resolution", resolution)
    _check_size("base_resolution", base_resolution)
    h, w = images.shape[-2:]
    a_h, a_w, n = _maps(int(h), int(w), int(resolution), None if base_resolution is None else int(base_resolution))
    a_h, a_w = a_h.to(images.device), a_w.to(images.device)
    m_h, m_w = a_h.T @ a_h, a_w.T @ a_w  # (H, H), (W, W)
    s_h, s_w = a_h.sum(0), a_w.sum(0)  # (H,), (W,): the column sums, sum u = s_h^T x s_w
    with torch.no_grad():
        z = images.detach().to(torch.float64).clamp(0, 1)
        mz = m_h @ z @ m_w  # (B, 3, H, W)
        total = torch.einsum("h,bchw,w->b", s_h, z, s_w)
        raw = (mz * z).sum((1, 2, 3))
        spread = raw - total * total / (3 * n)
    # a constant image has zero variance; float64 rounding leaves ~1e-16 of the raw sum of squares
    return PixStats(z, mz, total, spread, spread <= 1e-12 * raw.clamp_min(1e-300), 3 * n)


def pixcorr_from_stats(pred: PixStats, gt: PixStats, constant: str = "raise") -> Tensor:
    """Per-pair PixCorr (B,) float64 of two :class:`PixStats` of equal shapes (see :func:`pixcorr_scores`)."""
    if constant not in ("raise", "nan"):
        raise ValueError(f"constant must be 'raise' or 'nan', got {constant!r}")
    if pred.image.shape != gt.image.shape or pred.n != gt.n:
        raise ValueError(f"pred and gt must have equal shapes, got {tuple(pred.image.shape)} vs {tuple(gt.image.shape)}")
    with torch.no_grad():
        cov = (pred.smoothed * gt.image).sum((1, 2, 3)) - pred.total * gt.total / pred.n
        flat = pred.flat | gt.flat
        if bool(flat.any()) and constant == "raise":
            j = int(flat.nonzero()[0])
            which = "pred" if bool(pred.flat[j]) else "gt"
            raise ValueError(f"pixcorr: {which} image {j} is constant after preprocessing; its pixel "
                             f"correlation is undefined")
        r = (cov / (pred.spread.clamp_min(1e-300) * gt.spread.clamp_min(1e-300)).sqrt()).clamp(-1, 1)
        return torch.where(flat, torch.full_like(r, float("nan")), r)


def pixcorr(pred: Tensor, gt: Tensor, resolution: int = PIXCORR_RESOLUTION,
            base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> float:
    """MindEye's PixCorr: the mean over pairs of :func:`pixcorr_scores` (same protocol and arguments)."""
    _check_pair(pred, gt)
    if pred.shape[0] == 0:
        raise ValueError("pixcorr needs at least one image pair (B >= 1)")
    return float(pixcorr_scores(pred, gt, resolution=resolution, base_resolution=base_resolution).mean())
