"""The mindeye SSIM convention against MindEye's own pipeline, rebuilt step by step from torchvision + skimage.

The reference follows MindEye 1 ``src/Reconstruction_Metrics.py``: clamp the reconstructions, the display
cell's ``transforms.Resize((256, 256))`` (applied unconditionally, as MindEye 1 does), then
``transforms.Resize(425, BILINEAR)``, ``rgb2gray`` and ``structural_similarity`` per pair.  The pinned
torchvision (0.15/0.16) did not antialias tensor resizes; the installed one defaults to ``antialias=True``, so
the reference passes ``antialias=False`` explicitly.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch


def _pair(b: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random ground truth in [0, 1] and a noisy reconstruction that leaves [0, 1] (so clamping matters)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 8, 8, generator=g, dtype=torch.float64)
    gt = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    gt = (gt + 0.1 * torch.rand(b, 3, size, size, generator=g, dtype=torch.float64)).clamp(0, 1)
    pred = gt + 0.3 * torch.randn(b, 3, size, size, generator=g, dtype=torch.float64)
    return pred, gt


def _mindeye_reference(pred: torch.Tensor, gt: torch.Tensor, base: bool = True) -> np.ndarray:
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity
    from torchvision import transforms

    pred = pred.clamp(0, 1)
    if base:
        display = transforms.Resize((256, 256), antialias=False)
        gt, pred = display(gt), display(pred)
    preprocess = transforms.Compose([
        transforms.Resize(425, interpolation=transforms.InterpolationMode.BILINEAR, antialias=False),
    ])
    img_gray = rgb2gray(preprocess(gt).permute((0, 2, 3, 1)).numpy())
    recon_gray = rgb2gray(preprocess(pred).permute((0, 2, 3, 1)).numpy())
    return np.array([structural_similarity(rec, im, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=1.0)
                     for im, rec in zip(img_gray, recon_gray)])


@pytest.mark.parametrize("size, seed", [(64, 0), (300, 1), (256, 2)])
def test_mindeye_ssim_reproduces_mindeye_pipeline(size, seed):
    from neuroimagen.metrics.ssim import mean_ssim, ssim

    pred, gt = _pair(2, size, seed)
    ref = _mindeye_reference(pred, gt)
    ours = ssim(pred, gt, convention="mindeye")
    assert ours.shape == (2,) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6)
    assert mean_ssim(pred, gt, convention="mindeye") == pytest.approx(float(ref.mean()), abs=1e-6)


def test_mindeye_ssim_without_the_256_step():
    from neuroimagen.metrics.ssim import ssim

    pred, gt = _pair(1, 64, 3)
    np.testing.assert_allclose(ssim(pred, gt, convention="mindeye", base_resolution=None).numpy(),
                               _mindeye_reference(pred, gt, base=False), rtol=0, atol=1e-6)
    # the 256 px step is itself an interpolation: it changes the score of 64 px images
    with_base = ssim(pred, gt, convention="mindeye")
    assert float((with_base - ssim(pred, gt, convention="mindeye", base_resolution=None)).abs().max()) > 1e-3


def test_mindeye_ssim_rejects_bad_base_resolution():
    from neuroimagen.metrics.ssim import ssim

    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="base_resolution must be a positive int or None, got 0"):
        ssim(x, x, convention="mindeye", base_resolution=0)


def test_metrics_package_exports_are_importable_and_documented():
    import neuroimagen.metrics as metrics
    from neuroimagen.metrics import inception_score, n_way_top_k_accuracy, ssim  # noqa: F401

    expected = {"ssim", "mean_ssim", "inception_score", "n_way_top_k_accuracy", "n_way_top_k_hits", "effective_n",
                "cosine_similarity", "retrieval_hits", "retrieval_accuracy", "pixcorr", "pixcorr_scores",
                "two_way_identification", "correlation_distance", "bootstrap_ci", "paired_permutation_test",
                "BootstrapCI", "PermutationResult"}
    assert expected <= set(metrics.__all__)
    assert len(metrics.__all__) == len(set(metrics.__all__))
    for name in metrics.__all__:
        obj = getattr(metrics, name)
        assert (inspect.getdoc(obj) or "").strip(), f"neuroimagen.metrics.{name} has no docstring"


def test_metrics_package_import_is_light():
    import subprocess
    import sys

    code = ("import sys, neuroimagen.metrics; "
            "print(sorted(m for m in ('torchvision', 'transformers', 'skimage', 'scipy', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "[]"
