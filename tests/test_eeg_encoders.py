"""EEG encoders: the shared (B, C, T) -> (B, embed_dim) contract, the registry, and that each one learns."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroimagen.models.eeg_encoders import ENCODERS, TSConvEncoder, build_encoder

NAMES = sorted(ENCODERS)
SHAPES = [(128, 440), (17, 100), (63, 250), (8, 440), (4, 32)]
EMBED = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module single-threaded: many small ops, and on a shared 2-core machine two OpenMP threads
    wait on each other (measured 3-5x slower under load than one thread); restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make(name: str, shape, seed: int = 0, embed_dim: int = EMBED, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_encoder(name, shape[0], shape[1], embed_dim, **kw)


def eeg(batch: int, shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry():
    assert set(ENCODERS) == {"lstm", "channelnet", "tsconv"}
    for name, cls in ENCODERS.items():
        m = build_encoder(name, 8, 64, 12, width=4, dropout=0.1, l2_normalize=True)
        assert type(m) is cls and m.embed_dim == 12


def test_unknown_name_raises():
    with pytest.raises(ValueError, match=re.escape("unknown encoder 'eegnet' (known: lstm, channelnet, tsconv)")):
        build_encoder("eegnet", 8, 64, 12)


@pytest.mark.parametrize("name", NAMES)
def test_bad_sizes_raise(name):
    for kw in (dict(width=0), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            build_encoder(name, 8, 64, 12, **kw)
    with pytest.raises(ValueError):
        build_encoder(name, 8, 64, 0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_every_shape(name, shape):
    m = make(name, shape).train()
    x = eeg(3, shape)
    z = m(x)
    assert z.shape == (3, EMBED) and z.dtype == torch.float32
    assert torch.isfinite(z).all()
    z.sum().backward()
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"no gradient reached {no_grad}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    assert sum(bool(p.grad.abs().sum() > 0) for _, p in trainable) == len(trainable)

    m.eval()  # batch of one in eval mode (BN uses running stats)
    with torch.no_grad():
        z1 = m(x[:1])
    assert z1.shape == (1, EMBED) and torch.isfinite(z1).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_l2_normalize_gives_unit_rows(name, shape):
    m = make(name, shape, l2_normalize=True)
    for mode in (m.train, m.eval):
        mode()
        with torch.no_grad():
            z = m(eeg(4, shape))
        assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_width_sets_size(name):
    shape = (17, 100)
    default = ENCODERS[name].DEFAULT_WIDTH
    assert make(name, shape).width == default
    assert n_params(make(name, shape)) == n_params(make(name, shape, width=default))
    small, large = n_params(make(name, shape, width=4)), n_params(make(name, shape, width=8))
    assert small < large


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_input_dependent(name):
    shape = (17, 100)
    a, b = make(name, shape, seed=7), make(name, shape, seed=7)
    x = eeg(5, shape)
    for training in (True, False):
        a.train(training)
        b.train(training)
        with torch.no_grad():
            za, zb = a(x), b(x)
        assert torch.equal(za, zb)
    with torch.no_grad():
        assert not torch.allclose(a(x), a(eeg(5, shape, seed=2)))
        assert not torch.allclose(a(x), make(name, shape, seed=8).eval()(x))  # another seed, another model


@pytest.mark.parametrize("name", NAMES)
def test_dropout_only_in_training(name):
    shape = (17, 100)
    m = make(name, shape, dropout=0.5)
    x = eeg(4, shape)
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(x), m(x))
        m.train()
        torch.manual_seed(0)
        z1 = m(x)
        z2 = m(x)
    assert not torch.equal(z1, z2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tsconv_fused_conv_pool_is_exact(shape):
    """The fused strided conv equals NICE's literal Conv2d -> AvgPool2d, values and gradients."""
    m = make("tsconv", shape)
    x = eeg(2, shape).unsqueeze(1)  # (B, 1, C, T)
    fused = m._conv_pool(x)
    literal = m.tsconv[1](m.tsconv[0](x))
    assert fused.shape == literal.shape and fused.shape[-1] >= 1
    assert torch.allclose(fused, literal, atol=1e-5)
    g = torch.randn_like(fused)
    gf = torch.autograd.grad((fused * g).sum(), m.tsconv[0].weight)[0]
    gl = torch.autograd.grad((literal * g).sum(), m.tsconv[0].weight)[0]
    assert torch.allclose(gf, gl, rtol=1e-4, atol=1e-4)


def test_tsconv_keeps_nice_sizes_at_250_samples():
    m = TSConvEncoder(63, 250, 128)
    assert m.kernel_sizes == {"temporal": 25, "pool": 51, "pool_stride": 5}
    assert m.fc.in_features == 40 * 36  # NICE's 1440-d flattened feature


def test_channelnet_cost_budget():
    """Forward + backward of one 128 x 440 trial stays under 1 GFLOP (the original's forward alone is ~47)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = make("channelnet", (128, 440), embed_dim=128)
    with FlopCounterMode(display=False) as counter:
        m(eeg(1, (128, 440))).sum().backward()
    assert counter.get_total_flops() < 1e9


# --- a tiny learning check ---------------------------------------------------------------------------------------
# Two classes of (8, 128) white noise; class 1 adds a 20 Hz sinusoid of amplitude 1 on 4 channels.
# The sampling rate is 160 Hz. NICE's 51-sample average pool (TSConv) is a comb filter with nulls at
# multiples of fs / 51, and at 128, 250 or 1000 Hz a 20 Hz tone sits almost exactly on one of them
# (20 * 51 / fs ~ integer) and TSConv learns only from leakage (0.85-0.93 after 60 steps at 128 Hz);
# at 160 Hz it sits near a side lobe, so the check tests learning rather than that null. Gradients are clipped to norm 1
# as is usual for LSTMs: unclipped, the LSTM sometimes reaches ~99 % and is thrown back by a spike.

FS, FREQ, N_TRAIN, STEPS = 160.0, 20.0, 256, 60


def toy_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, 8, 128, generator=g)
    y = torch.arange(N_TRAIN) % 2
    tone = torch.sin(2 * math.pi * FREQ * torch.arange(128) / FS)
    x[y == 1, :4] += tone
    return x, y, g


@pytest.mark.parametrize("name", NAMES)
def test_learns_a_toy_problem(name):
    x, y, g = toy_problem()
    torch.manual_seed(0)
    enc = build_encoder(name, 8, 128, 16)
    head = nn.Linear(16, 2)
    params = [*enc.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(STEPS):
        idx = torch.randint(0, N_TRAIN, (32,), generator=g)
        loss = F.cross_entropy(head(enc(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    enc.eval()
    with torch.no_grad():
        acc = (head(enc(x)).argmax(1) == y).float().mean().item()
    assert acc >= 0.9, f"{name}: training accuracy {acc:.3f} after {STEPS} steps"
