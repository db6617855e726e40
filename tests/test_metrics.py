"""Metric functions, each checked against an independent computation (hand/analytic values or skimage)."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuroimagen.metrics.inception_score import inception_score
from neuroimagen.metrics.nway import effective_n, n_way_top_k_accuracy, n_way_top_k_hits
from neuroimagen.metrics.ssim import CONVENTIONS, mean_ssim, ssim


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- N-way

P3 = torch.tensor([[0.5, 0.3, 0.2]])


@pytest.mark.parametrize("true, expected", [(0, 1.0), (2, 0.0)])
def test_nway_hand_cases_deterministic(true, expected):
    acc = n_way_top_k_accuracy(P3, torch.tensor([true]), n=2, k=1, trials=200, generator=gen())
    assert acc == expected


def test_nway_middle_class_hits_half_the_time():
    # true class 1 (p=0.3) wins exactly when the single distractor is class 2 (p=0.2): probability 1/2
    probs = P3.expand(50, 3)
    acc = n_way_top_k_accuracy(probs, torch.ones(50, dtype=torch.long), n=2, k=1, trials=400, generator=gen(1))
    assert abs(acc - 0.5) < 0.02  # 20000 Bernoulli(0.5) draws: sd 0.0035


def test_nway_matches_hypergeometric_expectation():
    # independent computation: exact P(hit) = P(#outranking drawn distractors < k) (hypergeometric)
    g = gen(7)
    b, kc, n, k = 30, 12, 5, 2
    probs = torch.rand(b, kc, generator=g).softmax(1)
    true = torch.randint(0, kc, (b,), generator=g)
    hits = n_way_top_k_hits(probs, true, n=n, k=k, trials=4000, generator=gen(3))
    for i in range(b):
        m = int((probs[i] > probs[i, true[i]]).sum())
        pop, draws = kc - 1, n - 1
        exact = sum(math.comb(m, j) * math.comb(pop - m, draws - j) for j in range(k)) / math.comb(pop, draws)
        assert abs(float(hits[i]) - exact) < 0.035, (i, float(hits[i]), exact)  # ~4.5 sd at p=0.5


def test_nway_matches_explicit_sampling_reference():
    # independent computation: the public loop (explicit distinct distractors, rank among candidates)
    rng = np.random.default_rng(0)
    b, kc, n, k, trials = 8, 20, 15, 3, 3000  # n-1 > (K-1)/2 exercises the complement sampler
    probs = torch.from_numpy(rng.dirichlet(np.ones(kc), size=b))
    true = torch.from_numpy(rng.integers(0, kc, size=b))
    ours = n_way_top_k_hits(probs, true, n=n, k=k, trials=trials, generator=gen(5)).numpy()
    for i in range(b):
        p, t = probs[i].numpy(), int(true[i])
        others = np.array([c for c in range(kc) if c != t])
        hit = 0
        for _ in range(trials):
            picked = rng.choice(others, n - 1, replace=False)
            hit += int((p[picked] >= p[t]).sum() < k)
        assert abs(ours[i] - hit / trials) < 0.05, (i, ours[i], hit / trials)


def test_nway_k_equals_n_always_hits():
    g = gen(2)
    probs = torch.rand(20, 30, generator=g).softmax(1)
    true = torch.randint(0, 30, (20,), generator=g)
    assert n_way_top_k_accuracy(probs, true, n=5, k=5, trials=20, generator=gen()) == 1.0


def test_nway_tie_rule_ties_count_against():
    probs = torch.full((4, 10), 0.1)  # every distractor ties with the true class
    true = torch.arange(4)
    assert n_way_top_k_accuracy(probs, true, n=3, k=1, trials=20, generator=gen()) == 0.0
    assert n_way_top_k_accuracy(probs, true, n=3, k=2, trials=20, generator=gen()) == 0.0
    assert n_way_top_k_accuracy(probs, true, n=3, k=3, trials=20, generator=gen()) == 1.0
    # one tie, one strictly lower: K=3, n=3 (all classes), true=0 ties with class 1
    tied = torch.tensor([[0.4, 0.4, 0.2]])
    assert n_way_top_k_accuracy(tied, torch.tensor([0]), n=3, k=1, trials=5) == 0.0
    assert n_way_top_k_accuracy(tied, torch.tensor([0]), n=3, k=2, trials=5) == 1.0


def test_nway_seeded_determinism_and_seed_dependence():
    g = gen(4)
    probs = torch.rand(100, 50, generator=g).softmax(1)
    true = torch.randint(0, 50, (100,), generator=g)
    a = n_way_top_k_hits(probs, true, n=10, trials=30, generator=gen(11))
    b = n_way_top_k_hits(probs, true, n=10, trials=30, generator=gen(11))
    c = n_way_top_k_hits(probs, true, n=10, trials=30, generator=gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (100,) and a.dtype == torch.float64 and bool(((a >= 0) & (a <= 1)).all())


def test_nway_clamps_n_with_warning():
    g = gen(6)
    probs = torch.rand(40, 8, generator=g).softmax(1)
    true = torch.randint(0, 8, (40,), generator=g)
    assert effective_n(5, 8) == (5, None)
    n_eff, msg = effective_n(50, 8)
    assert n_eff == 8 and "50" in msg and "8" in msg
    with pytest.warns(UserWarning, match="clamping to n=8"):
        clamped = n_way_top_k_accuracy(probs, true, n=50, k=2, trials=10, generator=gen(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        direct = n_way_top_k_accuracy(probs, true, n=8, k=2, trials=10, generator=gen(1))
    assert clamped == direct
    # n = K: every other class is a distractor, so the result is exact (top-k of the full vector)
    expected = float(((probs >= probs.gather(1, true[:, None])).sum(1) - 1 < 2).double().mean())
    assert direct == expected


def test_nway_chance_level_for_random_probs():
    g = gen(8)
    probs = torch.rand(400, 100, generator=g).softmax(1)
    true = torch.randint(0, 100, (400,), generator=g)
    acc = n_way_top_k_accuracy(probs, true, n=50, k=1, trials=50, generator=gen(9))
    # per-image rates depend on the true class's rank; over 400 images with uniformly random ranks the mean is
    # k/n up to the spread of those ranks (sd ~0.005 for k=1, ~0.013 for k=5; tolerances ~2-3 sd)
    assert abs(acc - 1 / 50) < 0.01
    acc5 = n_way_top_k_accuracy(probs, true, n=50, k=5, trials=50, generator=gen(9))
    assert abs(acc5 - 5 / 50) < 0.04


def test_nway_is_fast_at_realistic_size():
    g = gen(10)
    probs = torch.rand(3000, 1000, generator=g).softmax(1)
    true = torch.randint(0, 1000, (3000,), generator=g)

    def best_of_3(f) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    # measured side by side with sorting the same (3000, 1000) matrix, so a loaded machine slows both:
    # 2.1x the sort on 2 idle cores; materialising 3000 x 50 draws of 49 class indices is ~25x
    nway = best_of_3(lambda: n_way_top_k_accuracy(probs, true, n=50, k=1, trials=50, generator=gen()))
    sort = best_of_3(lambda: probs.sort(1))
    assert nway < 8 * sort, f"n-way accuracy took {nway:.3f} s, {nway / sort:.1f}x a sort of the same matrix"


@pytest.mark.parametrize("probs, true, kw, frag", [
    (torch.rand(4), torch.zeros(4, dtype=torch.long), {}, "(B, K)"),
    (torch.rand(4, 5), torch.zeros(3, dtype=torch.long), {}, "true_class"),
    (torch.rand(4, 5), torch.zeros(4, 1, dtype=torch.long), {}, "true_class"),
    (torch.rand(4, 5), torch.zeros(4), {}, "integer"),
    (torch.rand(4, 5), torch.full((4,), 5), {}, "[0, 5)"),
    (torch.rand(4, 5), torch.full((4,), -1), {}, "[0, 5)"),
    (torch.rand(4, 5), torch.zeros(4, dtype=torch.long), {"n": 1}, "n must be"),
    (torch.rand(4, 5), torch.zeros(4, dtype=torch.long), {"n": 3, "k": 4}, "k must"),
    (torch.rand(4, 5), torch.zeros(4, dtype=torch.long), {"n": 3, "k": 0}, "k must"),
    (torch.rand(4, 5), torch.zeros(4, dtype=torch.long), {"n": 3, "trials": 0}, "trials"),
])
def test_nway_validation_errors(probs, true, kw, frag):
    with pytest.raises(ValueError, match=None) as exc:
        n_way_top_k_accuracy(probs, true, **kw)
    assert frag in str(exc.value)


# ----------------------------------------------------------------------------------- Inception Score

def _np_is(preds: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over all of ``preds`` (one split), in numpy."""
    py = preds.mean(0, keepdims=True)
    kl = np.where(preds > 0, preds * (np.log(np.clip(preds, 1e-300, None)) - np.log(py)), 0.0)
    return float(np.exp(kl.sum(1).mean()))


def _trials_table(n_classes=6, trials=12, samples=3, seed=0):
    """A per-image table sorted by trial: ``trials`` EEG trials x ``samples`` near-identical samples, each trial of
    one of ``n_classes`` perfectly separated classes (the true class gets most of the mass), as summarize sees it."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for item in range(trials):
        label = item % n_classes
        for k in range(samples):
            p = rng.dirichlet(np.full(n_classes, 0.5)) * 0.1
            p[label] += 0.9
            rows.append(dict(subject="1", variant="L+I", item=item, sample=k, probs=p, acc_hit=1.0, acc_n=n_classes,
                             ssim=0.5, judge_gt_top1=label, label=label))
    return pd.DataFrame(rows)


def test_is_uniform_predictions_is_one():
    mean, std = inception_score(torch.full((50, 10), 0.1), splits=5, generator=gen())
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_confident_and_evenly_spread_is_num_classes():
    probs = F.one_hot(torch.arange(100) % 10, 10).double()
    mean, std = inception_score(probs, splits=1, generator=gen())
    assert mean == pytest.approx(10.0, rel=1e-9) and std == 0.0


def test_is_hand_computed_two_class_case():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # p(y) = (0.75, 0.25); KL1 = log(4/3); KL2 = 0.5 log(2/3) + 0.5 log 2 = 0.5 log(4/3)
    mean, std = inception_score(probs, splits=1, generator=gen())
    assert mean == pytest.approx((4 / 3) ** 0.75, rel=1e-9) and std == 0.0


def test_is_splits_are_chunks_of_the_seeded_permutation():
    rng = np.random.default_rng(1)
    preds = rng.dirichlet(np.full(7, 0.3), size=203)
    perm = torch.randperm(203, generator=gen(5)).numpy()  # the documented shuffle, reproduced here
    shuffled = preds[perm]
    scores = [_np_is(shuffled[i * 203 // 4:(i + 1) * 203 // 4]) for i in range(4)]  # Salimans et al. loop
    mean, std = inception_score(torch.from_numpy(preds), splits=4, generator=gen(5))
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-7)
    assert inception_score(torch.from_numpy(preds), splits=4, generator=gen(5)) == (mean, std)  # seeded


def test_is_rows_sorted_by_class_do_not_collapse_the_splits():
    # 200 confident images of 10 classes, sorted by class: contiguous chunks of 50 would hold 2-3 classes each
    probs = F.one_hot(torch.arange(200) // 20, 10).double()
    mean, _ = inception_score(probs, splits=4, generator=gen())
    assert mean > 8.5  # each shuffled split of 50 holds nearly all 10 classes (contiguous chunks: 2.5)


@pytest.mark.parametrize("n, max_splits, expected", [(0, 10, 1), (36, 10, 1), (99, 10, 1), (100, 10, 2),
                                                     (549, 10, 10), (5000, 10, 10), (600, 3, 3), (600, 1, 1)])
def test_is_split_count_keeps_splits_of_at_least_50(n, max_splits, expected):
    from neuroimagen.metrics.inception_score import is_split_count

    k = is_split_count(n, max_splits)
    assert k == expected and (n < 50 or n // k >= 50)


def test_is_errors():
    with pytest.raises(ValueError, match="N=3 < splits=10"):
        inception_score(torch.full((3, 4), 0.25), 10, generator=gen())
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        inception_score(torch.full((12,), 0.25), 1, generator=gen())
    with pytest.raises(ValueError, match="logits"):
        inception_score(torch.randn(20, 4), splits=2, generator=gen())
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        inception_score(torch.full((4, 4), 0.25), 1, generator=None)


def test_summary_is_over_the_whole_group_when_it_holds_fewer_than_100_images():
    """12 trials x 3 samples sorted by trial: 10 contiguous splits of 3-4 images held one trial each (IS -> 1);
    the group's IS is now one split over all 36 images, and N and the split count are recorded."""
    from neuroimagen.metrics.summary import summarize

    df = _trials_table()
    row = summarize(df, k=1, is_splits=10, is_seed=0).set_index("subject").loc["1"]
    assert row["is"] == pytest.approx(_np_is(np.stack(df["probs"])), rel=1e-9)
    assert row["is"] > 4.0 and row["is_std"] == 0.0  # 10 contiguous splits of this table: 1.56
    assert row["is_n"] == 36 and row["is_splits"] == 1


def test_summary_is_splits_and_seed():
    from neuroimagen.metrics.summary import summarize

    df = _trials_table(trials=80, samples=3)  # 240 images -> 4 splits of 60
    a = summarize(df, k=1, is_splits=10, is_seed=0).set_index("subject").loc["1"]
    b = summarize(df.sample(frac=1.0, random_state=3), k=1, is_splits=10, is_seed=0).set_index("subject").loc["1"]
    c = summarize(df, k=1, is_splits=10, is_seed=1).set_index("subject").loc["1"]
    assert a["is_splits"] == 4 and a["is_n"] == 240
    assert a["is"] == b["is"] and a["is_std"] == b["is_std"]  # the shuffle starts from the sorted rows
    assert a["is_std"] != c["is_std"]  # another seed, another partition
    shuffled = np.stack(df.sort_values(["item", "sample"])["probs"])[torch.randperm(240, generator=gen(0)).numpy()]
    assert a["is"] == pytest.approx(np.mean([_np_is(shuffled[i * 60:(i + 1) * 60]) for i in range(4)]), rel=1e-9)


def test_summary_has_one_is_per_network():
    from neuroimagen.metrics.summary import summarize

    df = _trials_table()
    rng = np.random.default_rng(2)
    df["is_probs"] = list(rng.dirichlet(np.full(20, 0.2), size=len(df)))
    out = summarize(df, k=1, is_splits=10, is_seed=0)
    row = out.set_index("subject").loc["1"]
    assert row["is_inception_v3"] == pytest.approx(_np_is(np.stack(df["is_probs"])), rel=1e-9)
    assert row["is"] == pytest.approx(_np_is(np.stack(df["probs"])), rel=1e-9)
    assert "is_inception_v3" not in summarize(_trials_table(), k=1, is_splits=10, is_seed=0).columns


def test_summary_gt_accuracy_in_the_classifier_label_space():
    """An ImageNet-1k classifier's top-1 (0..999) against dataset labels (0..5): compared through the mapping,
    never index against index (which read ~0 %); without a mapping the number is not available (NaN)."""
    from neuroimagen.metrics.summary import summarize

    df = _trials_table()
    lut = [409, 2, 817, 980, 130, 555]  # dataset label -> classifier class
    df["judge_gt_top1"] = [lut[label] for label in df["label"]]
    df.loc[df["item"] == 0, "judge_gt_top1"] = 3  # one trial of 12 misread
    mapped = summarize(df, k=1, is_splits=10, is_seed=0, label_to_class=lut).set_index("subject")
    assert mapped.loc["1", "judge_gt_acc"] == pytest.approx(11 / 12)
    unmapped = summarize(df, k=1, is_splits=10, is_seed=0).set_index("subject")
    assert math.isnan(unmapped.loc["1", "judge_gt_acc"]) and math.isnan(unmapped.loc["all", "judge_gt_acc"])
    with pytest.raises(ValueError, match="label_to_class has 3 entries"):
        summarize(df, k=1, is_splits=10, is_seed=0, label_to_class=lut[:3])


# ---------------------------------------------------------------------------------------------- SSIM

def _structured(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phase = torch.rand(b, 3, 1, 1, generator=g) * 6
    img = 0.5 + 0.3 * torch.sin(4 * xx + 3 * yy + phase) * torch.cos(2 * yy - phase)
    return (img + 0.08 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)


def _sk_dreamdiffusion(pred: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    from skimage.metrics import structural_similarity

    def u8(x):
        return np.round(np.clip(x.double().numpy(), 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)

    return np.array([structural_similarity(u8(p), u8(g), channel_axis=-1, data_range=255)
                     for p, g in zip(pred, gt)])


def _sk_mindeye(pred: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    def gray(x):
        return rgb2gray(x.double().numpy().transpose(1, 2, 0))

    return np.array([structural_similarity(gray(p), gray(g), gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=1.0)
                     for p, g in zip(pred, gt)])


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_dreamdiffusion_matches_skimage(kind):
    if kind == "random":
        g = gen(20)
        pred, gt = torch.rand(4, 3, 40, 33, generator=g), torch.rand(4, 3, 40, 33, generator=g)
    else:
        gt = _structured(4, 48, 48, 21)
        pred = (gt + 0.1 * torch.randn(gt.shape, generator=gen(22))).clamp(0, 1)
    ours = ssim(pred, gt)  # default convention, no resize
    assert ours.shape == (4,) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), _sk_dreamdiffusion(pred, gt), atol=1e-4)
    assert mean_ssim(pred, gt) == pytest.approx(float(ours.mean()))


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_mindeye_matches_skimage(kind):
    if kind == "random":
        g = gen(30)
        pred, gt = torch.rand(3, 3, 36, 36, generator=g), torch.rand(3, 3, 36, 36, generator=g)
    else:
        gt = _structured(3, 36, 36, 31)
        pred = (0.8 * gt + 0.1 + 0.05 * torch.randn(gt.shape, generator=gen(32))).clamp(0, 1)
    # no 256 px step and a no-op resize: pure SSIM check (the resizes: tests/test_ssim_mindeye.py)
    ours = ssim(pred, gt, convention="mindeye", resolution=36, base_resolution=None)
    np.testing.assert_allclose(ours.numpy(), _sk_mindeye(pred, gt), atol=1e-4)


def test_ssim_resolution_path_matches_independent_resize():
    from torchvision.transforms.functional import InterpolationMode, resize

    gt = _structured(2, 64, 64, 40)
    pred = (gt + 0.1 * torch.randn(gt.shape, generator=gen(41))).clamp(0, 1)

    def tv(x, r, antialias=True):
        return resize(x, [r, r], interpolation=InterpolationMode.BILINEAR, antialias=antialias)

    ours = ssim(pred, gt, convention="dreamdiffusion", resolution=40)
    np.testing.assert_allclose(ours.numpy(), _sk_dreamdiffusion(tv(pred, 40), tv(gt, 40)), atol=1e-4)
    # mindeye defaults to 256 px, then 425 px, both without antialiasing (as MindEye's pinned torchvision)
    ours = ssim(pred, gt, convention="mindeye")
    ref = _sk_mindeye(tv(tv(pred, 256, False), 425, False), tv(tv(gt, 256, False), 425, False))
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_ssim_identical_images_is_one(convention):
    x = _structured(3, 32, 32, 50)
    np.testing.assert_allclose(ssim(x, x.clone(), convention=convention, resolution=32).numpy(), 1.0,
                               atol=1e-12)
    assert mean_ssim(x, x, convention=convention, resolution=32) == pytest.approx(1.0)


def test_ssim_errors():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="dreamdiffusion"):
        ssim(x, x, convention="bogus")
    with pytest.raises(ValueError, match="equal shapes"):
        ssim(x, torch.rand(2, 3, 16, 17))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        ssim(x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.rand(1, 3, 6, 6), torch.rand(1, 3, 6, 6))
