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


def pixcorr_scores(pred: Tensor, gt: Tensor, resolution: int = PIXCORR_RESOLUTION,
                   base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> Tensor:
    """Per-pair PixCorr, a float64 tensor of shape (B,) with values in [-1, 1].

    ``pred`` and ``gt`` are (B, 3, H, W) float images in [0, 1] of equal shape.  Protocol (module docstring):
    clamp to [0, 1], resize both to ``base_resolution`` x ``base_resolution`` (MindEye's 256 px step; ``None``
    skips it), then to ``resolution`` (short edge, 425), bilinear without antialiasing; Pearson r of the
    flattened 3 x H x W pixels per pair.  A constant image has no correlation: ``ValueError`` naming it.
    """
    _check_pair(pred, gt)
    _check_size("resolution", resolution)
    _check_size("base_resolution", base_resolution)
    scores = []
    with torch.no_grad():
        for i in range(0, pred.shape[0], 16):  # 16 images of 3 x 425 x 425 float64 at a time
            pair = []
            for x in (pred[i:i + 16], gt[i:i + 16]):
                x = x.detach().to(torch.float64).clamp(0, 1)
                if base_resolution is not None:
                    x = torchvision_resize(x, (base_resolution, base_resolution))
                x = torchvision_resize(x, int(resolution)).flatten(1)  # (b, 3 * H' * W')
                pair.append(x - x.mean(1, keepdim=True))
            xp, xg = pair
            norm = xp.norm(dim=1) * xg.norm(dim=1)  # (b,)
            if bool((norm == 0).any()):
                j = i + int((norm == 0).nonzero()[0])
                which = "pred" if float(xp[j - i].norm()) == 0 else "gt"
                raise ValueError(f"pixcorr: {which} image {j} is constant after preprocessing; its pixel "
                                 f"correlation is undefined")
            scores.append(((xp * xg).sum(1) / norm).clamp(-1, 1))
    if not scores:
        return torch.zeros(0, dtype=torch.float64, device=pred.device)
    return torch.cat(scores)


def pixcorr(pred: Tensor, gt: Tensor, resolution: int = PIXCORR_RESOLUTION,
            base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> float:
    """MindEye's PixCorr: the mean over pairs of :func:`pixcorr_scores` (same protocol and arguments)."""
    s = pixcorr_scores(pred, gt, resolution=resolution, base_resolution=base_resolution)
    if s.numel() == 0:
        raise ValueError("pixcorr needs at least one image pair (B >= 1)")
    return float(s.mean())
