"""SSIM between generated and ground-truth images under the two public conventions, vectorised in torch.

Images are float tensors (B, 3, H, W) in [0, 1].  The implementation reproduces
``skimage.metrics.structural_similarity`` exactly (it is the reference in the tests) but runs batched in
float64 with convolution windows instead of a Python loop over images.

Conventions
-----------
``"dreamdiffusion"`` (default; DreamDiffusion / BrainVis ``ssim_metric``)
    Colour.  Optional resize of both images to ``resolution`` x ``resolution`` (bilinear, antialias,
    ``align_corners=False``) in float; then conversion to the uint8 range ``round(clamp(x, 0, 1) * 255)``
    (round half to even); then ``structural_similarity(a, b, channel_axis=-1, data_range=255)`` with skimage
    defaults: 7x7 uniform window, sample covariance (factor NP/(NP-1), NP = 49), K1 = 0.01, K2 = 0.03, the SSIM
    map cropped by (7-1)//2 = 3 pixels on every side, mean over pixels, then mean over the 3 channels.
    ``resolution=None`` scores at the input size.

``"mindeye"`` (MindEye 1 ``src/Reconstruction_Metrics.py``, MedARC-AI/fMRI-reconstruction-NSD; MindEye 2
``src/final_evaluations.ipynb``, MedARC-AI/MindEyeV2; the same preprocessing as :mod:`~.pixcorr`)
    The public code, in order:

    1. clamp to [0, 1] (the public code clamps the reconstructions; its ground truth is already in [0, 1]);
    2. ``transforms.Resize((256, 256))`` of both sets (the grid-display cell, whose result every later metric
       inherits; ``base_resolution``, ``None`` skips it).  Images already 256 x 256 are unchanged: MindEye 1
       resizes them to the same size, an exact identity for bilinear interpolation, and MindEye 2 skips them;
    3. ``transforms.Resize(425, interpolation=BILINEAR)`` of both sets (``resolution``; an int resizes the
       short edge and keeps the aspect ratio, ``int(425 * long / short)``);
    4. grey with ``skimage.color.rgb2gray``: ``0.2125 R + 0.7154 G + 0.0721 B`` (*not* the ITU-R 601 luma
       weights 0.299/0.587/0.114);
    5. ``structural_similarity(gray_pred, gray_gt, gaussian_weights=True, sigma=1.5,
       use_sample_covariance=False, data_range=1.0)`` per pair: 11-tap Gaussian window (truncate 3.5 ->
       radius 5), population covariance, map cropped by 5 pixels per side, mean.

    Both resizes are torchvision tensor resizes with the default ``antialias`` of the pinned torchvision
    (0.15.2 / 0.16.0), which for tensors means **no antialiasing**: bilinear ``F.interpolate(...,
    align_corners=False, antialias=False)`` (:func:`~.pixcorr.torchvision_resize`).  Values are not quantised.
    The public code computes in float32 (its tensors are float32 and skimage keeps float32); here float64
    (the two differ by ~1e-7).

    The public code also passes ``multichannel=True`` on the 2-D grey image.  The pinned scikit-image (0.20.0
    for MindEye 1, 0.22.0 for MindEye 2) no longer has that parameter (removed in 0.20) and its ``**kwargs``
    silently swallow it: 2-D SSIM, as here.  Only scikit-image <= 0.19 read it (as ``channel_axis=-1``: a
    column-wise 1-D SSIM).

Border handling: skimage filters with ``mode="reflect"`` and then crops exactly the filter radius, so every
kept value comes from a window lying fully inside the image; the valid (unpadded) convolution used here is
therefore identical, not an approximation.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from neuroimagen.metrics.pixcorr import MINDEYE_BASE_RESOLUTION, torchvision_resize

CONVENTIONS = ("dreamdiffusion", "mindeye")

_K1, _K2 = 0.01, 0.03
_UNIFORM_WIN = 7
_SIGMA, _TRUNCATE = 1.5, 3.5
_MINDEYE_RESOLUTION = 425
_GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)  # skimage.color.rgb2gray, as called by the MindEye code
_CHUNK = 16  # images per vectorised chunk (bounds memory at 425 px in float64)


def _check(pred: Tensor, gt: Tensor, convention: str, resolution: int | None, base_resolution: int | None) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown SSIM convention {convention!r}; expected one of {CONVENTIONS}")
    for name, x in (("pred", pred), ("gt", gt)):
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must be a (B, 3, H, W) image tensor, got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have equal shapes, got {tuple(pred.shape)} vs {tuple(gt.shape)}")
    for name, value in (("resolution", resolution), ("base_resolution", base_resolution)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _resize(x: Tensor, resolution: int | None) -> Tensor:
    if resolution is None or tuple(x.shape[-2:]) == (resolution, resolution):
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


def _gaussian_taps(sigma: float, truncate: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = int(truncate * sigma + 0.5)  # as scipy.ndimage.gaussian_filter
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * x * x / (sigma * sigma))
    return w / w.sum()


def _filter_valid(x: Tensor, taps: Tensor) -> Tensor:
    """Separable correlation of every (N, C, H, W) map with ``taps`` along H and W, valid region only.

    A uniform window (DreamDiffusion's 7 x 7) is ``avg_pool2d``; any other (MindEye's Gaussian) weighted sums of
    shifted views (``win`` multiply-adds per axis). Both give the numbers of a grouped ``conv2d`` with the
    outer-product kernel up to float64 rounding (~1e-13 of 255); on an idle CPU they cost about the same, but a
    float64 grouped convolution stalls when the cores are shared (measured 40x slower at load 7 on 2 cores)."""
    win = taps.numel()
    if bool((taps == taps[0]).all()):
        return F.avg_pool2d(x, (win, win), stride=1) * float(taps[0] * win) ** 2  # mean * (win t)^2 = sum t_i t_j x
    h, w = x.shape[-2] - win + 1, x.shape[-1] - win + 1
    weights = [float(t) for t in taps]
    rows = sum(weights[i] * x[..., i:i + h, :] for i in range(win))
    return sum(weights[i] * rows[..., i:i + w] for i in range(win))


class SsimTarget(NamedTuple):
    """A target image set ready for SSIM (:func:`ssim_target`): ``prepared`` (the convention's preprocessing),
    ``mu`` and ``mu2`` (its locally filtered mean and second moment), float64. Computed once for a ground truth
    that many generations are compared with."""

    prepared: Tensor
    mu: Tensor
    mu2: Tensor
    convention: str
    resolution: int | None
    base_resolution: int | None

    def select(self, index) -> "SsimTarget":
        return self._replace(prepared=self.prepared[index], mu=self.mu[index], mu2=self.mu2[index])


def _ssim_means(x: Tensor, ys: Sequence[tuple[Tensor, Tensor, Tensor]], taps: Tensor, data_range: float,
                cov_norm: float) -> list[Tensor]:
    """Mean SSIM per image (mean over the cropped map and over channels) of float64 ``x`` against each target ``(y, filtered y, filtered y^2)``: x's own moments and
    the cross moments in one grouped conv, the targets' moments given."""
    c = x.shape[1]
    parts = [x, x * x] + [x * y for y, _, _ in ys]
    f = _filter_valid(torch.cat(parts, dim=1), taps).split(c, dim=1)
    ux, uxx = f[0], f[1]
    vx = cov_norm * (uxx - ux * ux)
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    out = []
    for j, (_, uy, uyy) in enumerate(ys):
        uxy = f[2 + j]
        vy = cov_norm * (uyy - uy * uy)
        vxy = cov_norm * (uxy - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        out.append(s.mean(dim=(2, 3)).mean(dim=1))
    return out


def _mindeye_preprocess(x: Tensor, resolution: int, base_resolution: int | None) -> Tensor:
    """Steps 1-3 of the mindeye convention on a float64 (b, 3, H, W) chunk."""
    x = x.clamp(0, 1)
    if base_resolution is not None:
        x = torchvision_resize(x, (base_resolution, base_resolution))  # (b, 3, 256, 256)
    return torchvision_resize(x, int(resolution))  # short edge to 425


def ssim(pred: Tensor, gt: Tensor, convention: str = "dreamdiffusion", resolution: int | None = None,
         base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> Tensor:
    """Per-pair SSIM, a float64 tensor of shape (B,); see :func:`ssim_against` and the module docstring."""
    return ssim_against(pred, [gt], convention=convention, resolution=resolution, base_resolution=base_resolution)[0]


def _protocol(convention: str, resolution: int | None, device) -> tuple[Tensor, float, float, int | None]:
    """(window taps, covariance normalisation, data range, resolution) of a convention."""
    if convention == "dreamdiffusion":
        taps = torch.full((_UNIFORM_WIN,), 1.0 / _UNIFORM_WIN, dtype=torch.float64, device=device)
        np_ = _UNIFORM_WIN ** 2
        return taps, np_ / (np_ - 1), 255.0, resolution
    resolution = _MINDEYE_RESOLUTION if resolution is None else resolution
    return _gaussian_taps(_SIGMA, _TRUNCATE, torch.float64, device), 1.0, 1.0, resolution


def _prepare(z: Tensor, convention: str, resolution: int | None, base_resolution: int | None) -> Tensor:
    z = z.detach().to(torch.float64)
    if convention == "dreamdiffusion":
        return torch.round(_resize(z, resolution).clamp(0, 1) * 255)
    gray = torch.tensor(_GRAY_WEIGHTS, dtype=torch.float64, device=z.device).view(1, 3, 1, 1)
    return (_mindeye_preprocess(z, resolution, base_resolution) * gray).sum(1, keepdim=True)


def _check_window(shape, convention: str, resolution: int | None, taps: Tensor) -> None:
    out_h = out_w = resolution
    if convention == "dreamdiffusion" and resolution is None:
        out_h, out_w = shape[-2], shape[-1]
    if min(out_h, out_w) < taps.numel():
        raise ValueError(f"images ({out_h}x{out_w}) are smaller than the {taps.numel()}x{taps.numel()} SSIM "
                         f"window of convention {convention!r}")


def ssim_target(images: Tensor, convention: str = "dreamdiffusion", resolution: int | None = None,
                base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> SsimTarget:
    """An image set's side of SSIM (:class:`SsimTarget`), to compare many generations with it
    (:func:`ssim_against`); same conventions and checks as :func:`ssim`."""
    _check(images, images, convention, resolution, base_resolution)
    taps, _, _, res = _protocol(convention, resolution, images.device)
    _check_window(images.shape, convention, res, taps)
    with torch.no_grad():
        y = torch.cat([_prepare(images[i:i + _CHUNK], convention, res, base_resolution)
                       for i in range(0, images.shape[0], _CHUNK)]) if images.shape[0] else images.double()
        f = _filter_valid(torch.cat([y, y * y], dim=1), taps).split(y.shape[1], dim=1) if images.shape[0] else (y, y)
    return SsimTarget(y, f[0], f[1], convention, resolution, base_resolution)


def ssim_against(pred: Tensor, targets: Sequence[Tensor | SsimTarget], convention: str = "dreamdiffusion",
                 resolution: int | None = None, base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> list[Tensor]:
    """Per-pair SSIM of ``pred`` against each target set, one float64 (B,) tensor per target (``ssim`` of each
    pair, with ``pred``'s preprocessing and local moments computed once); the exact protocols are in the module
    docstring. A target is an image tensor or an :class:`SsimTarget` made by :func:`ssim_target` with the same
    convention (its moments are then not recomputed).

    ``pred`` and every target are (B, 3, H, W) float images in [0, 1] of equal shape.  ``"dreamdiffusion"``:
    ``resolution`` resizes both to ``resolution`` x ``resolution`` (bilinear, antialias; ``None``: as-is).
    ``"mindeye"``: clamp, resize both to ``base_resolution`` x ``base_resolution`` (MindEye's 256 px step;
    ``None`` skips it), then the short edge to ``resolution`` (``None``: 425), bilinear without antialiasing;
    ``base_resolution`` is read by the mindeye convention only.  Raises ``ValueError`` for an unknown
    convention, malformed or mismatched shapes, or images smaller than the window (7 px for dreamdiffusion,
    11 px for mindeye).
    """
    ready = []
    for t in targets:
        if isinstance(t, SsimTarget):
            if (t.convention, t.resolution, t.base_resolution) != (convention, resolution, base_resolution):
                raise ValueError(f"target made for SSIM ({t.convention}, {t.resolution}, {t.base_resolution}), "
                                 f"asked for ({convention}, {resolution}, {base_resolution})")
            if t.prepared.shape[0] != pred.shape[0]:
                raise ValueError(f"pred and target must hold as many images, got {pred.shape[0]} and "
                                 f"{t.prepared.shape[0]}")
            _check(pred, pred, convention, resolution, base_resolution)
            ready.append(t)
        else:
            _check(pred, t, convention, resolution, base_resolution)
            ready.append(ssim_target(t, convention, resolution, base_resolution))
    device = pred.device
    taps, cov_norm, data_range, res = _protocol(convention, resolution, device)
    _check_window(pred.shape, convention, res, taps)
    scores: list[list[Tensor]] = [[] for _ in targets]
    with torch.no_grad():
        for i in range(0, pred.shape[0], _CHUNK):
            x = _prepare(pred[i:i + _CHUNK], convention, res, base_resolution)
            ys = [(t.prepared[i:i + _CHUNK], t.mu[i:i + _CHUNK], t.mu2[i:i + _CHUNK]) for t in ready]
            for j, s in enumerate(_ssim_means(x, ys, taps, data_range, cov_norm)):
                scores[j].append(s)
    return [torch.cat(s) if s else torch.zeros(0, dtype=torch.float64, device=device) for s in scores]


def mean_ssim(pred: Tensor, gt: Tensor, convention: str = "dreamdiffusion", resolution: int | None = None,
              base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> float:
    """Mean over pairs of :func:`ssim` (same conventions and arguments)."""
    s = ssim(pred, gt, convention=convention, resolution=resolution, base_resolution=base_resolution)
    if s.numel() == 0:
        raise ValueError("mean_ssim needs at least one image pair (B >= 1)")
    return float(s.mean())
