"""Losses against independent computations: hand-worked numbers, brute-force loops and skimage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuroimagen.losses import (hinge_d_loss, hinge_g_loss, mode_seeking_loss, pairwise_distances, ssim, ssim_loss,
                                triplet_loss)

MININGS = ("batch_all", "semi_hard", "batch_hard")


# ------------------------------------------------------------------------------------------------ distances


def loop_distances(emb: np.ndarray, squared: bool) -> np.ndarray:
    b = emb.shape[0]
    out = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            s = sum((emb[i, k] - emb[j, k]) ** 2 for k in range(emb.shape[1]))
            out[i, j] = s if squared else math.sqrt(s)
    return out


@pytest.mark.parametrize("squared", [True, False])
def test_pairwise_distances_match_double_loop(squared):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 5, generator=g, dtype=torch.float64)
    d = pairwise_distances(emb, squared=squared)
    assert d.shape == (7, 7)
    np.testing.assert_allclose(d.numpy(), loop_distances(emb.numpy(), squared), atol=1e-10)
    assert (d >= 0).all() and (torch.diagonal(d) == 0).all()


def test_squared_is_square_of_plain():
    emb = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    sq = pairwise_distances(emb, squared=True)
    plain = pairwise_distances(emb, squared=False)
    assert plain[0, 1].item() == pytest.approx(5.0)
    assert sq[0, 1].item() == pytest.approx(25.0)
    torch.testing.assert_close(plain ** 2, sq)


@pytest.mark.parametrize("squared", [True, False])
def test_distance_gradient_finite_at_identical_points(squared):
    emb = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], requires_grad=True)  # rows 0 and 1 coincide
    d = pairwise_distances(emb, squared=squared)
    assert d[0, 1].item() == 0.0
    d.sum().backward()
    assert torch.isfinite(emb.grad).all()


# ------------------------------------------------------------------------------------------------ triplet: by hand

# class 0: a0=(0,0), a1=(1,0); class 1: b0=(0,2), b1=(3,0). Squared distances:
# a0a1=1, a0b0=4, a0b1=9, a1b0=5, a1b1=4, b0b1=13. Margin 5.
HAND_EMB = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
HAND_LABELS = torch.tensor([0, 0, 1, 1])


def test_triplet_batch_all_by_hand():
    # (a,p,n): (a0,a1,b0)=5+1-4=2, (a0,a1,b1)=-3->0, (a1,a0,b0)=1, (a1,a0,b1)=2,
    # (b0,b1,a0)=14, (b0,b1,a1)=13, (b1,b0,a0)=9, (b1,b0,a1)=14: 8 valid, 7 active, sum 55
    loss, stats = triplet_loss(HAND_EMB, HAND_LABELS, margin=5.0, mining="batch_all")
    assert loss.item() == pytest.approx(55 / 7)
    assert stats == {"fraction_active": pytest.approx(7 / 8), "n_triplets": 8.0}


def test_triplet_batch_hard_by_hand_uses_closest_negative():
    # anchor: hardest positive / CLOSEST negative -> loss
    # a0: 1 / min(4, 9)=4 -> 2;  a1: 1 / min(5, 4)=4 -> 2;  b0: 13 / min(4, 5)=4 -> 14;  b1: 13 / min(9, 4)=4 -> 14
    loss, stats = triplet_loss(HAND_EMB, HAND_LABELS, margin=5.0, mining="batch_hard")
    assert loss.item() == pytest.approx(32 / 4)
    assert stats == {"fraction_active": 1.0, "n_triplets": 4.0}
    # the farthest negative would give (0 + 1 + 13 + 9) / 4: make sure that is NOT what we compute
    assert loss.item() != pytest.approx(23 / 4)


def test_triplet_semi_hard_by_hand():
    # (a0,a1): d_ap=1, negatives {4, 9}, farther than 1 -> 4 -> 2
    # (a1,a0): d_ap=1, negatives {5, 4} -> 4 -> 2
    # (b0,b1): d_ap=13, negatives {4, 5}, none farther -> largest 5 -> 13
    # (b1,b0): d_ap=13, negatives {9, 4}, none farther -> largest 9 -> 9
    loss, stats = triplet_loss(HAND_EMB, HAND_LABELS, margin=5.0, mining="semi_hard")
    assert loss.item() == pytest.approx(26 / 4)
    assert stats == {"fraction_active": 1.0, "n_triplets": 4.0}


def test_triplet_semi_hard_skips_negative_closer_than_positive():
    # a=(0,0), p=(2,0) [d=4], n1=(0,1) [d(a,n1)=1 < 4], n2=(0,3) [d(a,n2)=9]. Margin 10.
    # (a,p): farther than 4 -> n2 (9) -> 10+4-9=5 ; (p,a): d(p,n1)=5, d(p,n2)=13 -> 5 -> 9
    # (n1,n2): d=4; d(n1,a)=1, d(n1,p)=5 -> 5 -> 9 ; (n2,n1): d=4; d(n2,a)=9, d(n2,p)=13 -> 9 -> 5
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    loss, _ = triplet_loss(emb, torch.tensor([0, 0, 1, 1]), margin=10.0, mining="semi_hard")
    assert loss.item() == pytest.approx(28 / 4)


def test_triplet_batch_hard_closest_vs_farthest_negative():
    # one anchor pair and two negatives at different distances; margin 1, squared distances
    # a=(0,0), p=(1,0) [1], n_close=(0,1.5) [2.25], n_far=(0,10) [100]
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.5], [0.0, 10.0]])
    labels = torch.tensor([0, 0, 1, 2])  # negatives in different classes: they are not positives of each other
    loss, stats = triplet_loss(emb, labels, margin=2.0, mining="batch_hard")
    # anchors with a positive and a negative: a (1 vs 2.25 -> 0.75), p (1 vs d(p,n_close)=3.25 -> 0)
    assert stats["n_triplets"] == 2.0
    assert loss.item() == pytest.approx(0.75 / 2)
    # with the farthest negative both terms would be 0
    assert loss.item() > 0


# ------------------------------------------------------------------------------------------------ triplet: brute force


def brute_force(emb: np.ndarray, labels: np.ndarray, margin: float, mining: str, squared: bool) -> float:
    d = loop_distances(emb, squared)
    b = len(labels)
    if mining == "batch_all":
        losses = [max(0.0, margin + d[a, p] - d[a, n])
                  for a in range(b) for p in range(b) for n in range(b)
                  if a != p and labels[a] == labels[p] and labels[n] != labels[a]]
        active = [v for v in losses if v > 0]
        return sum(active) / len(active) if active else 0.0
    if mining == "batch_hard":
        losses = []
        for a in range(b):
            ps = [d[a, p] for p in range(b) if p != a and labels[p] == labels[a]]
            ns = [d[a, n] for n in range(b) if labels[n] != labels[a]]
            if ps and ns:
                losses.append(max(0.0, margin + max(ps) - min(ns)))
        return sum(losses) / len(losses) if losses else 0.0
    losses = []  # semi_hard
    for a in range(b):
        ns = [d[a, n] for n in range(b) if labels[n] != labels[a]]
        if not ns:
            continue
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            farther = [v for v in ns if v > d[a, p]]
            dn = min(farther) if farther else max(ns)
            losses.append(max(0.0, margin + d[a, p] - dn))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("mining", MININGS)
def test_triplet_matches_brute_force(mining, squared):
    g = torch.Generator().manual_seed(1)
    for trial in range(3):
        emb = torch.randn(12, 4, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (12,), generator=g)
        margin = 0.5 if not squared else 2.0
        loss, stats = triplet_loss(emb, labels, margin=margin, mining=mining, squared=squared)
        ref = brute_force(emb.numpy(), labels.numpy(), margin, mining, squared)
        assert loss.item() == pytest.approx(ref, abs=1e-5), (trial, mining, squared)
        assert stats["n_triplets"] > 0
        assert 0.0 <= stats["fraction_active"] <= 1.0


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("mining", MININGS)
def test_triplet_normalized_is_invariant_to_the_embedding_scale(mining, squared):
    """On the unit sphere the margin cannot be met by inflating the norms: scaling (even per row) changes
    nothing, and the value is the brute force on the normalised rows."""
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(12, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4])  # unequal counts, a singleton class
    margin = 0.5
    ref, _ = triplet_loss(emb, labels, margin, mining, squared, normalize=True)
    unit = (emb / emb.norm(dim=1, keepdim=True)).numpy()
    assert ref.item() == pytest.approx(brute_force(unit, labels.numpy(), margin, mining, squared), abs=1e-9)
    assert ref.item() > 0
    rows = torch.rand(12, 1, generator=g, dtype=torch.float64) * 50 + 0.1
    for scaled in (emb * 1e-3, emb * 1e3, emb * rows):
        loss, _ = triplet_loss(scaled, labels, margin, mining, squared, normalize=True)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)


def test_triplet_unnormalized_margin_is_met_by_inflating_the_norms():
    """Why the encoder normalises by default: without it, scaling a barely ordered embedding zeroes the loss."""
    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [0.4, 0.0]])  # d(a, p) < d(a, n), gap < margin
    labels = torch.tensor([0, 0, 1, 1])
    for mining in MININGS:
        small, _ = triplet_loss(emb, labels, margin=0.2, mining=mining)
        big, _ = triplet_loss(emb * 10, labels, margin=0.2, mining=mining)
        assert small.item() > 0 and big.item() == 0.0, mining
        same, _ = triplet_loss(emb * 10, labels, margin=0.2, mining=mining, normalize=True)
        assert same.item() == pytest.approx(triplet_loss(emb, labels, 0.2, mining, normalize=True)[0].item())


def test_triplet_float32_batch_256_runs_and_has_gradient():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(256, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (256,), generator=g)
    for mining in MININGS:
        loss, _ = triplet_loss(emb, labels, margin=0.2, mining=mining)
        (grad,) = torch.autograd.grad(loss, emb)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("mining", MININGS)
def test_triplet_zero_when_classes_separated_beyond_margin(mining, squared):
    g = torch.Generator().manual_seed(3)
    emb = torch.cat([0.01 * torch.randn(4, 2, generator=g), 0.01 * torch.randn(4, 2, generator=g) + 100.0])
    labels = torch.tensor([0] * 4 + [1] * 4)
    loss, stats = triplet_loss(emb, labels, margin=1.0, mining=mining, squared=squared)
    assert loss.item() == 0.0
    assert stats["fraction_active"] == 0.0 and stats["n_triplets"] > 0


@pytest.mark.parametrize("mining", MININGS)
def test_triplet_no_valid_triplet_is_zero_with_grad_path(mining):
    emb = torch.randn(5, 3, requires_grad=True)
    loss, stats = triplet_loss(emb, torch.zeros(5, dtype=torch.long), margin=1.0, mining=mining)  # one class
    assert loss.item() == 0.0 and loss.grad_fn is not None
    assert stats == {"fraction_active": 0.0, "n_triplets": 0.0}
    loss.backward()
    assert emb.grad is not None and (emb.grad == 0).all()
    # singletons only: no positives at all
    emb2 = torch.randn(3, 3, requires_grad=True)
    loss2, stats2 = triplet_loss(emb2, torch.tensor([0, 1, 2]), margin=1.0, mining=mining)
    assert loss2.item() == 0.0 and loss2.requires_grad and stats2["n_triplets"] == 0.0


def test_triplet_unknown_mining():
    with pytest.raises(ValueError) as exc:
        triplet_loss(HAND_EMB, HAND_LABELS, margin=1.0, mining="hardest")
    assert str(exc.value) == "unknown mining 'hardest' (known: batch_all, semi_hard, batch_hard)"


# ------------------------------------------------------------------------------------------------ GAN losses


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2   -> mean 2.5/3
    fake = torch.tensor([-2.0, 0.0, 0.5])  # relu(1 + f) = 0, 1, 1.5   -> mean 2.5/3
    assert hinge_d_loss(real, fake).item() == pytest.approx(5 / 3)
    assert hinge_g_loss(fake).item() == pytest.approx(0.5)  # -mean(-1.5/3)
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_mode_seeking_by_hand():
    img1 = torch.zeros(1, 1, 2, 2)
    img2 = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]]])  # mean |diff| = 2.5
    z1 = torch.zeros(1, 2)
    z2 = torch.tensor([[1.0, -3.0]])  # mean |diff| = 2
    assert mode_seeking_loss(img1, img2, z1, z2).item() == pytest.approx(1 / (1.25 + 1e-5))
    assert mode_seeking_loss(img1, img1, z1, z2, eps=1e-3).item() == pytest.approx(1e3)
    # farther images -> smaller loss
    assert mode_seeking_loss(img1, 2 * img2, z1, z2) < mode_seeking_loss(img1, img2, z1, z2)


# ------------------------------------------------------------------------------------------------ SSIM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_matches_skimage(dtype):
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((3, 3, 32, 32))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    b[1] = rng.random((3, 32, 32))  # one unrelated pair
    ours = ssim(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype), data_range=1.0)
    assert ours.shape == (3,)
    ref = [structural_similarity(a[i], b[i], channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False) for i in range(3)]
    np.testing.assert_allclose(ours.double().numpy(), ref, atol=1e-4)


def test_ssim_matches_skimage_range_and_rectangle():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (2, 1, 20, 27))
    b = np.clip(a + 0.3 * rng.standard_normal(a.shape), -1, 1)
    ours = ssim(torch.tensor(a), torch.tensor(b), data_range=2.0)
    ref = [structural_similarity(a[i, 0], b[i, 0], data_range=2.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False) for i in range(2)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-10)


def test_ssim_identical_is_one_and_decreases_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(x.shape, generator=g)
    values = [ssim(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.0, 0.05, 0.2, 0.5)]
    assert all(v1 > v2 for v1, v2 in zip(values, values[1:])), values


def test_ssim_gradient_flows():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    y = torch.rand(2, 3, 16, 16, generator=g, requires_grad=True)
    loss = ssim_loss(x, y)
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    # a small step against the gradient increases SSIM
    with torch.no_grad():
        y2 = y - 0.5 * y.grad / y.grad.abs().max()
    assert ssim(x, y2).mean() > ssim(x, y.detach()).mean()


def test_ssim_too_small_image():
    x = torch.rand(1, 3, 10, 32)
    with pytest.raises(ValueError, match=r"11x11.*10x32"):
        ssim(x, x)
