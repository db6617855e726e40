"""FID and KID against independent computations: scipy.linalg.sqrtm (pytorch-fid's formula) and a brute-force MMD loop."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from neuroimagen.metrics.fid import frechet_distance, kernel_inception_distance


def _features(seed: int, n: int = 60, d: int = 8, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d ** 0.5 + torch.eye(d)  # correlated
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix) * scale + shift


def _fid_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1.dot(s2)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.5, 1.0), (0.0, 2.0), (1.0, 0.3)])
def test_frechet_distance_matches_scipy_sqrtm(shift, scale):
    a, b = _features(0), _features(1, n=45, shift=shift, scale=scale)
    assert frechet_distance(a, b) == pytest.approx(_fid_scipy(a.double().numpy(), b.double().numpy()), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("na,nb", [(12, 20), (30, 9), (5, 5)])
def test_frechet_distance_with_fewer_rows_than_dimensions_matches_scipy_sqrtm(na, nb):
    # N < d takes the (N_a, N_b) nuclear-norm route: the same number as sqrtm of the rank-deficient (d, d) product
    g = torch.Generator().manual_seed(7)
    a = torch.randn(na, 48, generator=g, dtype=torch.float64)
    b = torch.randn(nb, 48, generator=g, dtype=torch.float64) * 1.3 + 0.2
    assert frechet_distance(a, b) == pytest.approx(_fid_scipy(a.numpy(), b.numpy()), rel=1e-6, abs=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_invariants():
    a = _features(0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = _features(1)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    # a pure mean shift of c in every one of d dimensions adds exactly d c^2
    assert frechet_distance(a, a + 0.5) == pytest.approx(8 * 0.25, rel=1e-6)
    with pytest.raises(ValueError, match="same feature size"):
        frechet_distance(a, a[:, :4])
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        frechet_distance(a[0], a)


def _kid_brute_force(a: torch.Tensor, b: torch.Tensor, subsets: int, m: int, seed: int) -> tuple[float, float]:
    """The same subsets (same generator draws), every kernel value in a Python loop."""
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=g)[:m]].double().tolist()
        y = b[torch.randperm(b.shape[0], generator=g)[:m]].double().tolist()
        d = len(x[0])

        def k(u, v):
            return (sum(p * q for p, q in zip(u, v)) / d + 1) ** 3

        xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
        vals.append(xx + yy - 2 * xy)
    return float(np.mean(vals)), float(np.std(vals))


def test_kid_matches_a_brute_force_mmd_loop():
    a, b = _features(0, n=30), _features(1, n=25, shift=0.4)
    mean, std = kernel_inception_distance(a, b, subsets=4, subset_size=12, generator=torch.Generator().manual_seed(7))
    ref_mean, ref_std = _kid_brute_force(a, b, 4, 12, 7)
    assert mean == pytest.approx(ref_mean, rel=1e-9) and std == pytest.approx(ref_std, rel=1e-7)
    assert mean > 0


def test_kid_properties():
    a, b = _features(0, n=200), _features(1, n=200)
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=100, generator=torch.Generator().manual_seed(0))
    far, _ = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=100, generator=torch.Generator().manual_seed(0))
    assert abs(same) < 0.05 * far  # same distribution: ~0 (unbiased, may be slightly negative)
    r1 = kernel_inception_distance(a, b, 3, 50, generator=torch.Generator().manual_seed(3))
    r2 = kernel_inception_distance(a, b, 3, 50, generator=torch.Generator().manual_seed(3))
    assert r1 == r2  # seeded draws
    assert kernel_inception_distance(a, b, 1, 50, generator=torch.Generator().manual_seed(3))[1] == 0.0
    with pytest.raises(ValueError, match=r"subset_size: expected an integer in \[2, 200\]"):
        kernel_inception_distance(a, b, 2, 201)
    with pytest.raises(ValueError, match="subsets"):
        kernel_inception_distance(a, b, 0, 10)
