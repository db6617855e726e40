"""Distribution distances between two sets of image features: FID and KID (pure functions).

The feature network is the caller's (Inception-v3 pool features for the published conventions); these
functions only see the features, float tensors (N, d). Which network produced them is part of the number's
protocol and must be stated beside it.

``frechet_distance`` (Heusel et al. 2017, "GANs trained by a two time-scale update rule ...", eq. 6)
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with means mu and covariances S of the two
    sets (``np.cov`` convention: unbiased, N - 1), as pytorch-fid / torch-fidelity compute it. The trace of
    the matrix square root is taken as the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2)
    (symmetric positive semi-definite, same spectrum as S_a S_b), so no complex ``sqrtm`` is needed.

``kernel_inception_distance`` (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 4)
    The unbiased estimate of MMD^2 with the cubic polynomial kernel k(x, y) = (x . y / d + 1)^3, averaged over
    ``subsets`` random subsets of ``subset_size`` rows drawn without replacement from each set, exactly as
    torch-fidelity (``kid_subsets``, ``kid_subset_size``) does: per subset pair (X, Y) of m rows,
    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2.
    Returns (mean, std) over the subsets. The estimate is unbiased, so it can be slightly negative.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _features(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"{name}: expected a (N, d) feature tensor, got {getattr(x, 'shape', type(x).__name__)}")
    return x.detach().to("cpu", torch.float64)


def _sqrt_psd(m: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative rounding eigenvalues clamped)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """FID between two feature sets (N_a, d) and (N_b, d), N >= 2 each; float >= 0 (0 for identical sets).

    When both sets are smaller than the feature size (a test set of a few hundred images in Inception's 2048
    dimensions), Tr((S_a S_b)^(1/2)) is computed exactly from the small (N_a, N_b) matrix instead of (d, d)
    ones: with centred rows X_a, X_b and S = X^T X / (N - 1), the eigenvalues of S_a S_b are the squared
    singular values of X_a X_b^T / sqrt((N_a - 1)(N_b - 1)) (plus zeros), so the trace of the square root is
    that matrix's nuclear norm. The same number, at a cost in N instead of d (bootstrap replicates need it).
    """
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a, feats_b: expected the same feature size, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"feats_a, feats_b: expected at least 2 rows each, got {a.shape[0]} and {b.shape[0]}")
    mu_a, mu_b = a.mean(0), b.mean(0)  # (d,)
    xa, xb = a - mu_a, b - mu_b
    na, nb, d = a.shape[0], b.shape[0], a.shape[1]
    tr_a = xa.pow(2).sum() / (na - 1)  # Tr(S_a)
    tr_b = xb.pow(2).sum() / (nb - 1)
    if max(na, nb) < d:
        tr_sqrt = torch.linalg.svdvals(xa @ xb.T).sum() / ((na - 1) * (nb - 1)) ** 0.5
    else:
        s_a, s_b = xa.T @ xa / (na - 1), xb.T @ xb / (nb - 1)  # (d, d), unbiased
        r = _sqrt_psd(s_a)
        tr_sqrt = torch.linalg.eigvalsh(r @ s_b @ r).clamp_min(0).sqrt().sum()  # Tr((S_a S_b)^(1/2))
    fid = (mu_a - mu_b).pow(2).sum() + tr_a + tr_b - 2 * tr_sqrt
    return max(float(fid), 0.0)


def _poly_mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 of two (m, d) sets with k(x, y) = (x . y / d + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3  # (m, m)
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    off = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return off - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(feats_a: Tensor, feats_b: Tensor, subsets: int = 100, subset_size: int = 1000,
                              generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID (mean, std over ``subsets``) between feature sets (N_a, d) and (N_b, d).

    Each subset draws ``subset_size`` rows of each set without replacement (``torch.randperm`` with
    ``generator``: pass a seeded one); ``2 <= subset_size <= min(N_a, N_b)``. The std is the population std
    of the per-subset estimates (0 for one subset), as torch-fidelity reports it.
    """
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a, feats_b: expected the same feature size, got {a.shape[1]} and {b.shape[1]}")
    if isinstance(subsets, bool) or int(subsets) != subsets or subsets < 1:
        raise ValueError(f"subsets: expected a positive integer, got {subsets!r}")
    n = min(a.shape[0], b.shape[0])
    if isinstance(subset_size, bool) or int(subset_size) != subset_size or not 2 <= subset_size <= n:
        raise ValueError(f"subset_size: expected an integer in [2, {n}] (the smaller set's size), got {subset_size!r}")
    vals = []
    for _ in range(int(subsets)):
        ia = torch.randperm(a.shape[0], generator=generator)[: int(subset_size)]
        ib = torch.randperm(b.shape[0], generator=generator)[: int(subset_size)]
        vals.append(_poly_mmd2(a[ia], b[ib]))
    v = torch.stack(vals)
    return float(v.mean()), float(v.std(unbiased=False))
