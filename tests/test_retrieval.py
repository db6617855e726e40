"""Zero-shot k-way retrieval (NICE/ATM protocol), checked against a brute-force loop and the exact expectation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import hypergeom

from neuroimagen.metrics.retrieval import cosine_similarity, retrieval_accuracy, retrieval_hits


def brute_force(sim: np.ndarray, true: np.ndarray, k: int, top: int, draws: int, rng: np.random.Generator) -> float:
    """Draw the distractor indices themselves and rank the k candidates (ties count against the true item)."""
    b, g = sim.shape
    hits = []
    for i in range(b):
        others = np.array([j for j in range(g) if j != true[i]])
        for _ in range(draws):
            cand = others if k - 1 >= len(others) else rng.choice(others, size=k - 1, replace=False)
            outrank = int((sim[i, cand] >= sim[i, true[i]]).sum())
            hits.append(outrank < top)
    return float(np.mean(hits))


def exact(sim: np.ndarray, true: np.ndarray, k: int, top: int) -> float:
    """The expectation over draws: the number of outranking distractors is hypergeometric."""
    g = sim.shape[1]
    m = (sim >= sim[np.arange(len(true)), true][:, None]).sum(1) - 1
    return float(np.mean([hypergeom(g - 1, int(mi), k - 1).cdf(top - 1) for mi in m]))


@pytest.fixture(scope="module")
def noisy():
    g = torch.Generator().manual_seed(0)
    gallery = torch.randn(30, 16, generator=g)
    true = torch.randperm(30, generator=g)[:24]
    queries = gallery[true] + 1.2 * torch.randn(24, 16, generator=g)
    return cosine_similarity(queries, gallery), true


def test_full_gallery_is_exact_and_matches_brute_force(noisy):
    sim, true = noisy
    for top in (1, 5):
        got = float(retrieval_hits(sim, true, k=30, top=top, draws=3).mean())
        assert got == pytest.approx(brute_force(sim.numpy(), true.numpy(), 30, top, 1, np.random.default_rng(0)))


@pytest.mark.parametrize("k, top", [(2, 1), (4, 1), (10, 1), (10, 5)])
def test_seeded_draws_converge_to_the_exact_expectation(noisy, k, top):
    sim, true = noisy
    got = float(retrieval_hits(sim, true, k=k, top=top, draws=4000, generator=torch.Generator().manual_seed(1)).mean())
    want = exact(sim.numpy(), true.numpy(), k, top)
    slow = brute_force(sim.numpy(), true.numpy(), k, top, 300, np.random.default_rng(2))
    assert got == pytest.approx(want, abs=0.01)
    assert slow == pytest.approx(want, abs=0.03)


def test_protocol_rows_cap_k_and_skip_trivial_top5(noisy):
    sim, true = noisy
    rows = retrieval_accuracy(sim, true, ways=(2, 4, 10, 50, 100, 200), tops=(1, 5), draws=50, seed=3)
    assert [(r["k"], r["top"]) for r in rows] == [(2, 1), (4, 1), (10, 1), (10, 5), (30, 1), (30, 5)]
    assert all(r["chance"] == pytest.approx(r["top"] / r["k"]) for r in rows)
    full = [r for r in rows if r["k"] == 30]
    assert all(r["draws"] == 1 and r["gallery"] == 30 and r["n_queries"] == 24 for r in full)
    again = retrieval_accuracy(sim, true, ways=(10,), tops=(1,), draws=50, seed=3)
    assert again[0]["accuracy"] == next(r["accuracy"] for r in rows if (r["k"], r["top"]) == (10, 1))


def test_perfect_and_random_embeddings():
    g = torch.Generator().manual_seed(4)
    gallery = torch.randn(200, 32, generator=g)
    perfect = retrieval_accuracy(cosine_similarity(gallery, gallery), torch.arange(200), draws=20)
    assert all(r["accuracy"] == 1.0 for r in perfect)
    random = retrieval_accuracy(cosine_similarity(torch.randn(200, 32, generator=g), gallery), torch.arange(200),
                                draws=40)
    for r in random:
        assert abs(r["accuracy"] - r["chance"]) < 4 * np.sqrt(r["chance"] * (1 - r["chance"]) / 200) + 0.01, r


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="share D"):
        cosine_similarity(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="at least 2"):
        retrieval_hits(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), k=2)
    with pytest.raises(ValueError, match="top must"):
        retrieval_hits(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), k=2, top=3)
