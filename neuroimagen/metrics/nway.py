"""N-way top-k classification accuracy of generated images (the MinD-Vis protocol).

MinD-Vis (Chen et al. 2023) introduced it; DreamDiffusion and BrainVis reuse the same ``n_way_top_k_acc``.
A pretrained ImageNet classifier (ViT-H/14 in the public code) scores both images of a pair:

* ``true_class[b]`` is the classifier's **top-1 class on the ground-truth image** b (computed by the caller;
  it is *not* the dataset label);
* ``probs_pred[b]`` is the classifier's probability vector (softmax) on the **generated** image b.

For each generated image and each of ``trials`` trials, N-1 distinct distractor classes are drawn uniformly
without replacement from the classifier's K-1 classes other than ``true_class[b]``; the trial is a hit when
the true class's probability ranks within the top k of the N candidates' probabilities.  Per-image hit rate =
mean over trials; accuracy = mean of the per-image rates over images.  Chance level is k / N.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def effective_n(n: int, num_classes: int) -> tuple[int, str | None]:
    """Clamp N to the classifier's number of classes.

    Returns ``(n_eff, message)`` where ``message`` is ``None`` when no clamping was needed, else a warning text
    (the N-way protocol needs N distinct candidate classes, so N cannot exceed the number of classes).
    """
    if n <= num_classes:
        return int(n), None
    return int(num_classes), (f"n-way accuracy: n={n} exceeds the classifier's {num_classes} classes; "
                              f"clamping to n={num_classes} (chance level is then k/{num_classes})")


def _validate(probs_pred: Tensor, true_class: Tensor, n: int, k: int, trials: int) -> None:
    if not isinstance(probs_pred, Tensor) or probs_pred.ndim != 2:
        raise ValueError(f"probs_pred must be a (B, K) tensor of class probabilities, got shape "
                         f"{tuple(getattr(probs_pred, 'shape', ()))}")
    b, num_classes = probs_pred.shape
    if num_classes < 2:
        raise ValueError(f"probs_pred must have at least 2 classes, got K={num_classes}")
    if not bool(torch.isfinite(probs_pred).all()):
        raise ValueError("probs_pred contains non-finite values")
    if not isinstance(true_class, Tensor) or true_class.ndim != 1 or true_class.shape[0] != b:
        raise ValueError(f"true_class must be a ({b},) tensor matching probs_pred's batch, got shape "
                         f"{tuple(getattr(true_class, 'shape', ()))}")
    if true_class.dtype.is_floating_point or true_class.dtype == torch.bool or true_class.is_complex():
        raise ValueError(f"true_class must be an integer tensor, got dtype {true_class.dtype}")
    if b and (int(true_class.min()) < 0 or int(true_class.max()) >= num_classes):
        raise ValueError(f"true_class values must lie in [0, {num_classes}), got range "
                         f"[{int(true_class.min())}, {int(true_class.max())}]")
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n={n}, got {k}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")


def n_way_top_k_hits(probs_pred: Tensor, true_class: Tensor, n: int = 50, k: int = 1, trials: int = 50,
                     generator: torch.Generator | None = None) -> Tensor:
    """Per-image N-way top-k hit rate, a float64 tensor of shape (B,) with values in [0, 1].

    Protocol (MinD-Vis ``n_way_top_k_acc``): for image b and each of ``trials`` trials, draw N-1 distinct
    distractor classes uniformly without replacement from the K-1 classes other than ``true_class[b]``; the
    trial is a hit if ``probs_pred[b, true_class[b]]`` ranks within the top k among the N candidates.

    Tie rule (pessimistic, ties count against): a distractor *outranks* the true class when its probability is
    **greater than or equal to** the true class's probability, and a trial is a hit iff strictly fewer than k
    distractors outrank it.  (The public code delegates ties to torchmetrics / ``torch.topk``, whose order among
    equal values is implementation-defined; with continuous softmax outputs exact ties are practically absent.)

    Sampling: a hit depends only on how many drawn distractors outrank the true class, which for a uniform
    draw of N-1 of the K-1 other classes is hypergeometric with ``m_b`` = number of outranking classes.  That
    count is drawn exactly, one draw-without-replacement step at a time, vectorised over (B, trials) (for
    N-1 > (K-1)/2 the complementary, undrawn set is sampled instead; N = K is deterministic).  This is
    equal in distribution to materialising the class indices, at a fraction of the cost.

    Randomness comes only from ``generator`` (``None`` -> torch's global RNG), so seeded calls are
    reproducible; the public MinD-Vis/DreamDiffusion code draws with unseeded ``np.random.choice``, so its
    published numbers carry Monte-Carlo noise of order sqrt(p(1-p)/trials) per image.  Public copies default to
    40 or 1000 trials; this function defaults to 50 — report the value used.

    If ``n`` exceeds K it is clamped to K (see :func:`effective_n`) with a ``warnings.warn``.
    Raises ``ValueError`` on malformed shapes/dtypes, out-of-range classes, n < 2, k not in [1, n], trials < 1.
    """
    return _hits(probs_pred, true_class, n, k, trials, generator, stacklevel=3)


def _hits(probs_pred: Tensor, true_class: Tensor, n: int, k: int, trials: int,
          generator: torch.Generator | None, stacklevel: int) -> Tensor:
    _validate(probs_pred, true_class, n, k, trials)
    b, num_classes = probs_pred.shape
    n_eff, msg = effective_n(n, num_classes)
    if msg is not None:
        warnings.warn(msg, stacklevel=stacklevel)
    device = probs_pred.device
    if b == 0:
        return torch.zeros(0, dtype=torch.float64, device=device)

    probs = probs_pred.detach().to(torch.float64)
    tc = true_class.detach().to(device=device, dtype=torch.long)
    p_true = probs.gather(1, tc[:, None])  # (B, 1)
    # classes other than the true one whose probability is >= the true class's (ties count against)
    m = (probs >= p_true).sum(1) - 1  # (B,), excludes the true class itself

    population = num_classes - 1  # candidate distractors
    draws = n_eff - 1
    if draws >= population:  # every other class is a distractor: deterministic
        count = m[:, None].expand(b, trials).to(torch.float64)
    else:
        complement = draws > population - draws
        steps = population - draws if complement else draws
        remaining_good = m[:, None].to(torch.float64).expand(b, trials).clone()
        got = torch.zeros(b, trials, dtype=torch.float64, device=device)
        for j in range(steps):  # sequential draw without replacement of `steps` classes
            u = torch.rand(b, trials, generator=generator, dtype=torch.float64, device=device)
            take = (u * (population - j) < remaining_good).to(torch.float64)
            got += take
            remaining_good -= take
        count = (m[:, None].to(torch.float64) - got) if complement else got
    hits = (count < k).to(torch.float64)  # (B, trials)
    return hits.mean(1)


def n_way_top_k_accuracy(probs_pred: Tensor, true_class: Tensor, n: int = 50, k: int = 1, trials: int = 50,
                         generator: torch.Generator | None = None) -> float:
    """Mean over images of :func:`n_way_top_k_hits` (same protocol, tie rule, seeding and clamping)."""
    hits = _hits(probs_pred, true_class, n, k, trials, generator, stacklevel=3)
    if hits.numel() == 0:
        raise ValueError("n-way accuracy needs at least one image (B >= 1)")
    return float(hits.mean())
