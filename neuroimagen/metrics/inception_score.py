"""Inception Score (Salimans et al. 2016) from precomputed class probabilities."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_EPS = 1e-12
MIN_SPLIT_SIZE = 50  # images per split at the least (DESIGN sec. 3: "at most 10 splits of at least ~50 images")


def is_split_count(n: int, max_splits: int, min_split_size: int = MIN_SPLIT_SIZE) -> int:
    """The number of Inception Score splits for ``n`` images: ``clamp(n // min_split_size, 1, max_splits)``.

    Every split then holds at least ``min_split_size`` images (50 by default) whenever there are that many, and
    one split is used when fewer than ``2 * min_split_size`` (100) images are scored: p(y) estimated from a few
    images is close to each p(y|x) and pushes the score towards 1. ``max_splits`` is ``eval.is_splits`` (10, as
    Salimans et al.). ``n = 0`` gives 1 (the caller reports no score for an empty group).
    """
    if max_splits < 1 or min_split_size < 1:
        raise ValueError(f"max_splits and min_split_size must be >= 1, got {max_splits}, {min_split_size}")
    return max(1, min(int(n) // int(min_split_size), int(max_splits)))


def inception_score(probs: Tensor, splits: int, *, generator: torch.Generator) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` over ``splits`` random disjoint splits of the N generated images.

    ``probs`` is (N, K): the classifier's softmax p(y|x) for each generated image (rows sum to 1).
    Protocol: the rows are shuffled with ``torch.randperm(N, generator=generator)`` and the shuffled rows are
    cut into ``splits`` chunks with boundaries ``i * N // splits`` (the Salimans et al. ``get_inception_score``
    loop on the permuted rows); in each chunk p(y) is the mean of the chunk's rows and the chunk score is
    ``exp(mean_x KL(p(y|x) || p(y)))``; the result is the mean and the population std (ddof=0, like
    ``np.std``) of the chunk scores. Computed in float64 with logs clamped at 1e-12 (so 0 * log 0 -> 0).

    The permutation matters: rows sorted by EEG trial put one trial's near-identical samples in one chunk, so
    p(y) ~ p(y|x) and the score collapses towards 1. With ``splits = 1`` the order is irrelevant. Pick the
    split count with :func:`is_split_count` (chunks of at least 50 images).

    Range: 1 (every image gets the same prediction) to K (confident predictions spread evenly over K classes).

    It is a whole-set statistic: reduce it **once per (subject, variant) group** over all generated images of
    that group, never per batch followed by averaging (per-batch IS is biased low and depends on batch size).
    The number is only "Inception Score" with the torchvision/TF Inception-v3 classifier at 299 px; with any
    other classifier (e.g. ViT-H/14 probabilities reused from N-way accuracy) it must be labelled as such.

    Raises ``ValueError`` if ``probs`` is not 2-D, has negative/non-finite entries or rows not summing to 1
    (within 1e-3; catches logits passed by mistake), if ``splits < 1``, or if N < ``splits``.
    """
    if not isinstance(probs, Tensor) or probs.ndim != 2:
        raise ValueError(f"probs must be an (N, K) tensor of class probabilities, got shape "
                         f"{tuple(getattr(probs, 'shape', ()))}")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (it seeds the shuffle before splitting), got "
                         f"{type(generator).__name__}")
    n = probs.shape[0]
    if n < splits:
        raise ValueError(f"inception_score needs at least as many images as splits: N={n} < splits={splits}")
    p = probs.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("probs must be finite and non-negative (pass softmax probabilities, not logits)")
    row_sums = p.sum(1)
    if bool(((row_sums - 1).abs() > 1e-3).any()):
        raise ValueError(f"probs rows must sum to 1 (got sums in [{float(row_sums.min()):.4g}, "
                         f"{float(row_sums.max()):.4g}]); pass softmax probabilities, not logits")
    p = p[torch.randperm(n, generator=generator)]  # (N, K), shuffled
    log_p = p.clamp_min(_EPS).log()
    scores = []
    for i in range(splits):
        part, log_part = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdim=True)
        kl = (part * (log_part - py.clamp_min(_EPS).log())).sum(1).mean()
        scores.append(math.exp(float(kl)))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))
