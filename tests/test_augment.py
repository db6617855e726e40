"""DiffAugment: shapes, determinism, and what each policy does to images whose answer is known."""

from __future__ import annotations

import pytest
import torch

from neuroimagen.augment import POLICIES, diff_augment


def images(b=4, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout", "cutout, color"])
def test_shape_preserved(policy):
    for h, w in [(32, 32), (24, 40)]:
        x = images(h=h, w=w)
        assert diff_augment(x, policy, generator=gen(0)).shape == x.shape


def test_default_policy_is_all_three():
    assert POLICIES == ("color", "translation", "cutout")
    x = images()
    torch.testing.assert_close(diff_augment(x, generator=gen(3)), diff_augment(x, "color,translation,cutout", gen(3)))


def test_deterministic_with_seeded_generator_and_seeds_differ():
    x = images()
    a = diff_augment(x, generator=gen(7))
    b = diff_augment(x, generator=gen(7))
    c = diff_augment(x, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = gen(7)
    first, second = diff_augment(x, generator=g), diff_augment(x, generator=g)  # the state advances
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_empty_policy_is_identity():
    x = images()
    assert diff_augment(x, "") is x
    assert diff_augment(x, " , ") is x


def test_cutout_zeroes_a_quarter_square():
    b, h, w = 64, 32, 32
    x = torch.ones(b, 3, h, w)
    out = diff_augment(x, "cutout", generator=gen(0))
    zero = out == 0  # (B, 3, H, W)
    assert torch.equal(zero, zero[:, :1].expand_as(zero)), "the same region is cut in every channel"
    assert torch.equal(out[~zero], torch.ones(int((~zero).sum())))
    side = h // 2  # 0.5 * size
    full = 0
    for i in range(b):
        m = zero[i, 0]
        rows = m.any(1).nonzero().flatten()
        cols = m.any(0).nonzero().flatten()
        hh, ww = len(rows), len(cols)
        # contiguous axis-aligned rectangle
        assert rows[-1] - rows[0] + 1 == hh and cols[-1] - cols[0] + 1 == ww
        assert int(m.sum()) == hh * ww
        # clipped at most to half a side (the centre stays inside the image)
        assert side // 2 <= hh <= side and side // 2 <= ww <= side
        full += int(m.sum()) == side * side
    assert full > b // 4  # most squares are not clipped: exactly 25 % of the pixels
    frac = zero[:, 0].float().mean(dim=(1, 2))
    assert frac.max().item() == pytest.approx(0.25)


def test_translation_moves_a_bright_pixel_at_most_an_eighth():
    b, h, w = 64, 32, 32
    x = torch.zeros(b, 3, h, w)
    x[:, :, 16, 16] = 1.0
    out = diff_augment(x, "translation", generator=gen(1))
    max_shift = int(0.125 * h)  # 4 pixels
    shifts = set()
    for i in range(b):
        m = out[i, 0]
        assert m.sum().item() == 1.0 and torch.equal(out[i, 0], out[i, 1])
        r, c = (m == 1).nonzero()[0].tolist()
        assert abs(r - 16) <= max_shift and abs(c - 16) <= max_shift
        shifts.add((r - 16, c - 16))
    assert len(shifts) > 10  # the shift really is random
    assert max(abs(s[0]) for s in shifts) == max_shift  # and reaches the bound


def test_translation_is_a_pure_shift_with_zero_padding():
    x = images(b=8)
    out = diff_augment(x, "translation", generator=gen(2))
    for i in range(8):
        found = False
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                ref = torch.zeros_like(x[i])
                src = x[i][:, max(0, dy):32 + min(0, dy), max(0, dx):32 + min(0, dx)]
                ref[:, max(0, -dy):32 + min(0, -dy), max(0, -dx):32 + min(0, -dx)] = src
                found |= torch.equal(ref, out[i])
        assert found, i


def test_color_changes_the_mean_by_a_brightness_offset():
    x = images(b=16)
    out = diff_augment(x, "color", generator=gen(4))
    delta = out.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))  # saturation and contrast keep the mean
    assert (delta.abs() <= 0.5 + 1e-6).all()
    assert (delta.abs() > 1e-4).all()
    # a grey constant image: saturation and contrast do nothing, brightness adds one constant per sample
    grey = torch.full((16, 3, 8, 8), 0.2)
    out = diff_augment(grey, "color", generator=gen(5))
    offs = out - grey
    torch.testing.assert_close(offs, offs[:, :1, :1, :1].expand_as(offs))
    assert (offs[:, 0, 0, 0].abs() < 0.5).all() and offs[:, 0, 0, 0].std() > 0.1


def test_color_saturation_and_contrast_act_per_sample():
    # image with channel differences and spatial contrast: the change is not a constant offset
    x = images(b=4)
    out = diff_augment(x, "color", generator=gen(6))
    offs = out - x
    assert (offs.flatten(1).std(dim=1) > 1e-3).all()


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_gradient_flows_to_x(policy):
    x = images().requires_grad_(True)
    out = diff_augment(x, policy, generator=gen(0))
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unknown_policy_error():
    with pytest.raises(ValueError) as exc:
        diff_augment(images(), "color,rotate")
    msg = str(exc.value)
    assert "rotate" in msg and all(p in msg for p in POLICIES)
