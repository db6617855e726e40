"""Zero-shot k-way retrieval of test images from EEG embeddings (the NICE / ATM protocol on THINGS-EEG2).

Each test EEG (its repetitions averaged by the caller, as the field does) has an embedding; the *gallery* is
the embedding of every test image (200 on THINGS-EEG2), never only the images of a batch. For EEG ``i`` with
true gallery item ``t_i``:

* similarity ``s_ij`` = cosine similarity of EEG embedding ``i`` and gallery embedding ``j``;
* k-way: ``k - 1`` distractors are drawn uniformly without replacement from the gallery items other than
  ``t_i``; the draw is a top-``m`` hit when the true item ranks within the top ``m`` of the ``k`` candidates.
  Ties count against (a distractor with ``s_ij >= s_it`` outranks the true item), as in
  :mod:`neuroimagen.metrics.nway`;
* the accuracy of (k, m) is the mean over EEGs of the hit rate over ``draws`` seeded draws; when ``k`` is
  the gallery size every other item is a candidate and the value is exact.

``k`` is capped at the gallery size; chance is ``m / k``. The field reports k = 2, 4, 10, 50, 100, 200 with
top-1, and top-5 for the 200-way case: a top-``m`` accuracy is only reported where ``m < k`` (top-5 of 4
candidates is 1 by construction). The draw is the same hypergeometric count as the N-way accuracy, so the
protocol and the code are shared with it (:func:`neuroimagen.metrics.nway.n_way_top_k_hits`).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from neuroimagen.metrics.nway import n_way_top_k_hits

DEFAULT_WAYS = (2, 4, 10, 50, 100, 200)
DEFAULT_TOPS = (1, 5)


def cosine_similarity(queries: Tensor, gallery: Tensor) -> Tensor:
    """(B, D) x (G, D) -> (B, G) cosine similarities in float64 (a zero vector has similarity 0)."""
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries (B, D) and gallery (G, D) must share D, got {tuple(queries.shape)} and "
                         f"{tuple(gallery.shape)}")
    q = torch.nn.functional.normalize(queries.detach().to(torch.float64), dim=1)
    g = torch.nn.functional.normalize(gallery.detach().to(torch.float64), dim=1)
    return q @ g.T


def retrieval_hits(similarity: Tensor, true_index: Tensor, k: int, top: int = 1, draws: int = 100,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-EEG k-way top-``top`` hit rate (B,) over ``draws`` seeded draws; ``k`` capped at the gallery size."""
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (B, G), got shape {tuple(similarity.shape)}")
    g = similarity.shape[1]
    if g < 2:
        raise ValueError(f"retrieval needs a gallery of at least 2 items, got {g}")
    k = min(int(k), g)
    if not 1 <= top <= k:
        raise ValueError(f"top must satisfy 1 <= top <= k={k}, got {top}")
    return n_way_top_k_hits(similarity, true_index, n=k, k=top, trials=draws, generator=generator)


def retrieval_accuracy(similarity: Tensor, true_index: Tensor, ways: Iterable[int] = DEFAULT_WAYS,
                       tops: Iterable[int] = DEFAULT_TOPS, draws: int = 100, seed: int = 0) -> list[dict]:
    """Every (k, top) of the protocol: rows ``{k, top, accuracy, chance, n_queries, gallery, draws, seed}``.

    ``k`` values above the gallery size collapse to the gallery size (listed once); a ``top`` is kept only where
    ``top < k``. Each (k, top) draws from its own generator seeded by ``(seed, k, top)``, so a row does not
    depend on which other rows were asked for.
    """
    g = similarity.shape[1]
    out, seen = [], set()
    for k in ways:
        kk = min(int(k), g)
        for top in tops:
            if top >= kk or (kk, top) in seen:
                continue
            seen.add((kk, top))
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + kk * 1009 + top)
            hits = retrieval_hits(similarity, true_index, kk, top, draws, gen)
            out.append({"k": kk, "top": int(top), "accuracy": float(hits.mean()), "chance": top / kk,
                        "n_queries": int(similarity.shape[0]), "gallery": int(g),
                        "draws": int(draws) if kk < g else 1, "seed": int(seed)})
    return out
