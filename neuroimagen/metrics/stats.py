"""Statistics for per-trial scores: a percentile-bootstrap confidence interval and a paired permutation test.

DESIGN sec. 3b asks for a seeded bootstrap 95 % CI over test trials for every number and paired permutation
tests between variants.  Both functions are pure and every random draw comes from an explicit
``torch.Generator`` (``generator=``) or, when none is given, from a fresh one seeded with ``seed``: the same
call gives the same interval / p-value.

* :func:`bootstrap_ci` -- percentile bootstrap (Efron): resample the units with replacement ``n_boot`` times,
  recompute the statistic, and take the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
  replicates (linear interpolation, ``np.quantile``'s default, as ``scipy.stats.bootstrap(method="percentile")``).
  With ``groups`` the unit is a group (e.g. one EEG trial and all the images generated from it): groups are
  drawn with replacement and the statistic is computed over all the values of the drawn groups, so samples of
  one trial are never split (a cluster bootstrap).  Resampling the samples of one trial independently would
  treat them as independent and make the interval too narrow.
* :func:`paired_permutation_test` -- two-sided sign-flip test of ``mean(a - b) = 0`` on paired per-trial
  values: under the null each difference is as likely to have either sign.  The p-value is the fraction of
  sign assignments whose ``|mean|`` is at least the observed one.  Exact (all ``2^n`` assignments, p =
  count / 2^n) when ``2^n <= n_perm``; otherwise ``n_perm`` random assignments and ``p = (1 + count) /
  (1 + n_perm)`` (the observed assignment counted once, as ``scipy.stats.permutation_test``; never 0).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

_CHUNK = 4096  # bootstrap replicates / sign vectors processed at a time (bounds memory)


class BootstrapCI(NamedTuple):
    """``estimate`` = stat(values) on all data; [``low``, ``high``] its percentile-bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    n_units: int  # resampled units: values, or groups when grouped
    grouped: bool


class PermutationResult(NamedTuple):
    """``p_value`` of the two-sided sign-flip test of mean(a - b) = 0; ``statistic`` = mean(a - b)."""

    p_value: float
    statistic: float
    n_perm: int  # sign assignments evaluated (2^n when exact)
    exact: bool


def _as_1d(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D sequence of numbers ({exc})") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    return torch.Generator().manual_seed(int(seed))


def _group_index(groups: Any, n: int) -> tuple[np.ndarray, int]:
    """groups (n,) of any hashable ids -> (inverse (n,) int64 in [0, G), G)."""
    if isinstance(groups, Tensor):
        groups = groups.detach().cpu().numpy()
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must be 1-D with one id per value ({n}), got shape {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    return inverse, int(inverse.max()) + 1 if n else 0


def bootstrap_ci(values: Any, stat: Callable[[np.ndarray], Any] = np.mean, n_boot: int = 10_000,
                 level: float = 0.95, groups: Any = None, generator: torch.Generator | None = None,
                 seed: int = 0) -> BootstrapCI:
    """Percentile-bootstrap confidence interval of ``stat(values)`` (see the module docstring).

    ``values`` is 1-D (a list, array or tensor of per-sample or per-trial scores).  ``stat`` maps a 1-D float64
    array to a number; ``np.mean`` (the default) runs vectorised.  ``groups`` (optional, one id per value)
    makes each group one resampling unit: each replicate draws as many groups as there are, with replacement,
    and applies ``stat`` to the concatenated values of the drawn groups.  Draws: ``torch.randint`` from
    ``generator`` (else a generator seeded with ``seed``), one (n_boot, units) index matrix in chunks.

    Raises ``ValueError`` for fewer than 2 units, non-finite values, ``level`` outside (0, 1) or
    ``n_boot < 1``.
    """
    x = _as_1d(values, "values")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    n_boot = int(n_boot)
    gen = _generator(generator, seed)
    if groups is None:
        inverse, n_units = np.arange(x.shape[0]), x.shape[0]
    else:
        inverse, n_units = _group_index(groups, x.shape[0])
    if n_units < 2:
        raise ValueError(f"bootstrap_ci needs at least 2 resampling units, got {n_units}")
    sums = np.bincount(inverse, weights=x, minlength=n_units)  # (G,)
    counts = np.bincount(inverse, minlength=n_units).astype(np.float64)  # (G,)
    members = [np.flatnonzero(inverse == u) for u in range(n_units)] if stat is not np.mean else None

    reps = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, _CHUNK):
        m = min(_CHUNK, n_boot - start)
        idx = torch.randint(n_units, (m, n_units), generator=gen).numpy()  # (m, G) drawn units per replicate
        if members is None:  # the mean over all values of the drawn units
            reps[start:start + m] = sums[idx].sum(1) / counts[idx].sum(1)
        else:
            for r in range(m):
                reps[start + r] = float(stat(x[np.concatenate([members[u] for u in idx[r]])]))
    alpha = (1.0 - float(level)) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return BootstrapCI(estimate=float(stat(x)), low=float(low), high=float(high), level=float(level),
                       n_boot=n_boot, n_units=n_units, grouped=groups is not None)


def paired_permutation_test(a: Any, b: Any, n_perm: int = 10_000, seed: int = 0,
                            generator: torch.Generator | None = None) -> PermutationResult:
    """Two-sided paired sign-flip permutation test of mean(a - b) = 0 (see the module docstring).

    ``a`` and ``b`` are 1-D with one value per test trial, paired by position (e.g. one metric of two variants
    on the same trials).  Exact enumeration of the 2^n sign assignments when ``2^n <= n_perm``, else
    ``n_perm`` random ones (``torch.randint`` from ``generator``, else seeded with ``seed``).  An assignment
    counts when ``|sum(s * d)| >= |sum(d)|`` up to a relative tolerance of 1e-12 of ``sum(|d|)`` (sums that are
    equal in exact arithmetic may differ in the last bits).  All differences zero gives p = 1.
    """
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must be paired (equal lengths), got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if n < 1:
        raise ValueError("paired_permutation_test needs at least one pair")
    if isinstance(n_perm, bool) or int(n_perm) != n_perm or n_perm < 1:
        raise ValueError(f"n_perm must be a positive int, got {n_perm!r}")
    n_perm = int(n_perm)
    d = torch.from_numpy(x - y)  # (n,) float64
    observed = abs(float(d.sum()))
    tol = 1e-12 * float(d.abs().sum())
    exact = n < 63 and 2 ** n <= n_perm
    count = 0
    if exact:
        total = 2 ** n
        bits = torch.arange(n, dtype=torch.int64)
        for start in range(0, total, _CHUNK):
            codes = torch.arange(start, min(start + _CHUNK, total), dtype=torch.int64)
            signs = 1.0 - 2.0 * ((codes[:, None] >> bits) & 1).to(torch.float64)  # (m, n) in {+1, -1}
            count += int(((signs @ d).abs() >= observed - tol).sum())
        p = count / total
        evaluated = total
    else:
        gen = _generator(generator, seed)
        for start in range(0, n_perm, _CHUNK):
            m = min(_CHUNK, n_perm - start)
            signs = 1.0 - 2.0 * torch.randint(2, (m, n), generator=gen).to(torch.float64)  # (m, n)
            count += int(((signs @ d).abs() >= observed - tol).sum())
        p = (1 + count) / (1 + n_perm)
        evaluated = n_perm
    return PermutationResult(p_value=min(1.0, p), statistic=float(d.mean()), n_perm=evaluated, exact=exact)

