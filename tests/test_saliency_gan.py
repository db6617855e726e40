"""The saliency-map GAN: shapes, ranges, conditioning, spectral norm, and a tiny learning check."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from neuroimagen.models.saliency_gan import Discriminator, Generator, sample_z


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shapes_and_ranges(resolution):
    torch.manual_seed(0)
    g = Generator(z_dim=16, cond_dim=8, resolution=resolution, width=8)
    d = Discriminator(cond_dim=8, resolution=resolution, width=8)
    z, cond = sample_z(3, 16), torch.randn(3, 8)
    img = g(z, cond)
    assert img.shape == (3, 3, resolution, resolution)
    assert img.dtype == torch.float32
    assert img.min() >= -1.0 and img.max() <= 1.0
    logits = d(img, cond)
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()


def test_default_sizes():
    g, d = Generator(), Discriminator()
    assert g(sample_z(2, 128), torch.randn(2, 128)).shape == (2, 3, 64, 64)
    assert d(torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 128)).shape == (2,)


@pytest.mark.parametrize("resolution", [16, 48, 256, 0])
def test_bad_resolution(resolution):
    with pytest.raises(ValueError, match=f"resolution: expected 32, 64 or 128, got {resolution}"):
        Generator(resolution=resolution)
    with pytest.raises(ValueError, match=f"resolution: expected 32, 64 or 128, got {resolution}"):
        Discriminator(resolution=resolution)


def test_bad_input_shapes():
    g = Generator(z_dim=4, cond_dim=3, resolution=32, width=4)
    d = Discriminator(cond_dim=3, resolution=32, width=4)
    with pytest.raises(ValueError, match="z: expected shape"):
        g(torch.zeros(2, 5), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cond: expected shape"):
        g(torch.zeros(2, 4), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="img: expected shape"):
        d(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cond: expected shape"):
        d(torch.zeros(2, 3, 32, 32), torch.zeros(2, 4))


def test_sample_z():
    z = sample_z(4096, 8, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4096, 8) and z.dtype == torch.float32
    assert z.min() >= -1.0 and z.max() < 1.0
    assert z.min() < -0.99 and z.max() > 0.99  # covers the whole interval
    assert abs(z.mean().item()) < 0.02
    again = sample_z(4096, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    assert sample_z(0, 8).shape == (0, 8)
    with pytest.raises(ValueError):
        sample_z(2, 0)


def test_generator_depends_on_z_and_cond():
    torch.manual_seed(1)
    g = Generator(z_dim=16, cond_dim=8, resolution=32, width=8).eval()
    z, cond = sample_z(2, 16), torch.randn(2, 8)
    with torch.no_grad():
        base = g(z, cond)
        other_z = g(sample_z(2, 16), cond)
        other_cond = g(z, torch.randn(2, 8))
        same = g(z, cond)
    assert torch.equal(base, same)
    assert (base - other_z).abs().max() > 1e-4
    assert (base - other_cond).abs().max() > 1e-4


def test_discriminator_projection_uses_cond():
    torch.manual_seed(2)
    d = Discriminator(cond_dim=8, resolution=32, width=8).eval()
    img = torch.rand(4, 3, 32, 32) * 2 - 1
    c1, c2 = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        out1, out2, out1_again = d(img, c1), d(img, c2), d(img, c1)
    assert torch.equal(out1, out1_again)
    assert (out1 - out2).abs().min() > 1e-6
    # The projection term is linear in cond: D(x, c1) + D(x, c2) - D(x, 0) == D(x, c1 + c2).
    with torch.no_grad():
        lhs = out1 + out2 - d(img, torch.zeros(4, 8))
        rhs = d(img, c1 + c2)
    assert torch.allclose(lhs, rhs, atol=1e-4)


def _parametrized_weights(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))
            and parametrize.is_parametrized(m, "weight")]


def _weight_layers(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]


def test_spectral_norm_everywhere():
    g = Generator(z_dim=8, cond_dim=8, resolution=64, width=8)
    d = Discriminator(cond_dim=8, resolution=64, width=8)
    for net, n_layers in ((g, 1 + 4 + 1), (d, 4 + 1 + 2)):  # fc/up-convs/to_rgb; down-convs/3x3/linear+embed
        layers = _weight_layers(net)
        assert len(layers) == n_layers
        assert _parametrized_weights(net) == layers
        for name in layers:
            m = net.get_submodule(name)
            assert type(m.parametrizations.weight[0]).__name__ == "_SpectralNorm"
    # After a few power iterations the spectral norm of the effective weight is ~1.
    lin = d.linear
    for _ in range(20):
        lin(torch.zeros(1, lin.in_features))
    assert torch.linalg.matrix_norm(lin.weight.detach(), ord=2).item() == pytest.approx(1.0, abs=1e-3)


def test_channel_plan():
    g = Generator(z_dim=8, cond_dim=8, resolution=128, width=16)
    ups = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in ups] == [64, 32, 16, 8, 8]  # halves, never below width // 2
    assert g.fc.out_features == 16 * 8 * 4 * 4
    d = Discriminator(cond_dim=8, resolution=128, width=16)
    downs = [m for m in d.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert [m.out_channels for m in downs] == [16, 32, 64, 128, 128]
    assert d.feature_dim == 128


def test_backward_through_discriminator():
    torch.manual_seed(3)
    g = Generator(z_dim=8, cond_dim=6, resolution=32, width=8)
    d = Discriminator(cond_dim=6, resolution=32, width=8)
    cond = torch.randn(4, 6, requires_grad=True)
    img = g(sample_z(4, 8), cond)
    real = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
    loss = torch.relu(1.0 - d(real, cond)).mean() + torch.relu(1.0 + d(img, cond)).mean()  # hinge
    loss.backward()
    for grad in (real.grad, cond.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    for net in (g, d):
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        assert any(gr.abs().sum() > 0 for gr in grads)


@pytest.fixture
def one_thread():
    """Tiny nets train much faster on one thread than on two contended ones (2-core CI machines)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_generator_learns_conditional_targets(one_thread):
    """Generator-only L1 regression: each cond learns its own constant colour (class 0 red, 1 blue)."""
    torch.manual_seed(4)
    z_dim, cond_dim = 16, 8
    g = Generator(z_dim=z_dim, cond_dim=cond_dim, resolution=32, width=16)
    conds = torch.randn(2, cond_dim)
    targets = torch.full((2, 3, 32, 32), -1.0)
    targets[0, 0] = 1.0  # red
    targets[1, 2] = 1.0  # blue
    labels = torch.arange(8) % 2
    opt = torch.optim.Adam(g.parameters(), lr=2e-3, betas=(0.5, 0.999))
    for _ in range(150):
        out = g(sample_z(8, z_dim), conds[labels])
        loss = (out - targets[labels]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    g.eval()
    with torch.no_grad():
        out = g(sample_z(8, z_dim), conds[labels])  # (8, 3, 32, 32), fresh noise
    for i, label in enumerate(labels.tolist()):
        own = (out[i] - targets[label]).abs().mean()
        other = (out[i] - targets[1 - label]).abs().mean()
        assert own < other, (i, label, own.item(), other.item())
        assert own < 0.25


# ----------------------------------------------------------------------------------------------
# Stage 2's validation: diversity (what alpha1 buys), realism (what alpha2 buys), the sweep objective


def test_sample_diversity_is_the_mean_pairwise_l1():
    from neuroimagen.stages.saliency import sample_diversity

    x = torch.zeros(2, 3, 3, 4, 4)  # (M, S, 3, R, R)
    x[0, 1] = 0.6
    x[0, 2] = 0.9  # item 0: pairs |0 - .6|, |0 - .9|, |.6 - .9| -> mean 0.6
    x[1] = 0.25  # item 1: G ignores z -> 0
    assert sample_diversity(x) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at least 2 images"):
        sample_diversity(x[:, :1])


def test_random_conv_features_are_fixed_seeded_and_centred_on_the_reference():
    from neuroimagen.stages.saliency import RandomConvFeatures

    g = torch.Generator().manual_seed(0)
    ref, other = torch.rand(20, 3, 32, 32, generator=g), torch.rand(5, 3, 32, 32, generator=g)
    a, b = RandomConvFeatures(seed=3).fit_reference(ref), RandomConvFeatures(seed=3).fit_reference(ref)
    assert torch.equal(a(other), b(other)) and not torch.equal(a(other), RandomConvFeatures(seed=4).fit_reference(ref)(other))
    f = a(ref)  # (20, 64)
    assert f.shape == (20, 64) and f.mean(0).abs().max() < 1e-5 and f.pow(2).mean() == pytest.approx(1.0, rel=1e-4)
    assert not any(p.requires_grad for p in a.parameters())


@pytest.fixture(scope="module")
def saliency_stage(saliency_parts):
    from neuroimagen.stages import build_stage
    from neuroimagen.training.context import RunContext

    cfg, inputs = saliency_parts
    return build_stage("saliency", cfg, RunContext(), inputs)


def test_validation_reports_diversity_realism_and_the_sweep_objective(saliency_stage):
    from neuroimagen.metrics.fid import frechet_distance
    from neuroimagen.stages.saliency import SaliencyStage

    st = saliency_stage
    v = st.validate()
    assert {"val_ssim", "val_diversity", "val_kid", "val_kid_mean_image", "val_objective"} <= set(v)
    assert len(st.div_items) == min(len(st.f_val), 256)
    sc = st.sc
    k = max(v["val_kid"], 0.0)
    assert v["val_objective"] == pytest.approx(v["val_ssim"] + sc.objective_diversity * v["val_diversity"]
                                               - sc.objective_kid * k / (k + v["val_kid_mean_image"]))
    assert st.validate() == v  # every z and every KID subset is fixed: the same G scores the same
    # realism is measured against the validation images on the embedded features: they themselves have FID 0
    assert frechet_distance(st.features(st.img_val), st.feat_val) == pytest.approx(0.0, abs=1e-6)
    assert v["val_kid_mean_image"] > 0.1
    # selection on a number a constant or condition-independent G cannot win; the objective is for sweeps
    assert SaliencyStage.select_metric == "val_condition_gain" and "selected on val_condition_gain" in SaliencyStage.protocol
    assert v["val_condition_gain"] == pytest.approx(v["val_ssim"] - v["val_ssim_shuffled"], abs=1e-6)
    assert "random-conv" in st.describe_data()["realism_features"] and "NOT Inception-v3" in SaliencyStage.protocol


def test_diversity_is_zero_when_g_ignores_z_and_grows_when_it_does_not(saliency_stage):
    st = saliency_stage
    G = st.G

    class IgnoresZ(nn.Module):
        def __init__(self, g, scale):
            super().__init__()
            self.g, self.scale = g, scale

        def forward(self, z, c):
            return self.g(z * self.scale, c)

    try:
        st.G = IgnoresZ(G, 0.0)
        flat = st.validate()["val_diversity"]
        st.G = IgnoresZ(G, 1.0)
        varied = st.validate()["val_diversity"]
    finally:
        st.G = G
    assert flat == pytest.approx(0.0, abs=1e-7) and varied > 1e-4, (flat, varied)


# ----------------------------------------------------------------------------------------------
# CondNorm: G and D read the EEG feature standardised on the training features


def test_cond_norm_is_identity_until_stats_then_standardises_and_reloads():
    from neuroimagen.models.saliency_gan import CondNorm

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 6, generator=g) * 0.02 + 3.0  # small spread around a large offset
    n = CondNorm(6)
    assert torch.equal(n(feats), feats)  # identity before set_stats
    out = n.set_stats(feats)(feats)
    assert out.mean(0).abs().max() < 1e-5
    assert out.pow(2).sum(1).mean() == pytest.approx(1.0, rel=1e-4)  # mean squared distance from the mean 1
    # one scalar scale: the relative sizes of the entries survive
    ratio = feats.std(0) / out.std(0)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    m = CondNorm(6)
    m.load_state_dict(n.state_dict())  # the statistics travel with the weights
    assert torch.equal(m(feats), out)
    with pytest.raises(ValueError, match=r"feats: expected shape \(N, 6\)"):
        n.set_stats(torch.zeros(4, 5))
    assert torch.equal(CondNorm(6).set_stats(feats[:1]).scale, torch.ones(()))  # one item: no spread to measure


@pytest.mark.parametrize("factor", [0.01, 100.0])
def test_generator_and_discriminator_are_invariant_to_the_feature_scale(factor):
    """An encoder whose features are 100x smaller (or larger) gives G and D the same input once normalised: a
    small-scale condition is no longer drowned by z (the collapse on band-power EEG)."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(40, 8, generator=g)
    z = sample_z(40, 16, generator=g)
    img = torch.rand(40, 3, 32, 32, generator=g) * 2 - 1
    outs = []
    for f in (feats, feats * factor + 0.5):
        torch.manual_seed(0)
        G, D = Generator(z_dim=16, cond_dim=8, resolution=32, width=8), Discriminator(cond_dim=8, resolution=32, width=8)
        G.cond_norm.set_stats(f)
        D.cond_norm.set_stats(f)
        G.eval()
        with torch.no_grad():
            outs.append((G(z, f), D(img, f)))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-4)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-3, rtol=1e-4)


def test_saliency_stage_sets_the_cond_norm_from_the_training_features(saliency_stage):
    from neuroimagen.training.context import unwrap

    for net in (unwrap(saliency_stage.G), unwrap(saliency_stage.D)):
        assert net.cond_norm.scale.item() != 1.0 and net.cond_norm.shift.abs().sum() > 0
    state = unwrap(saliency_stage.G).state_dict()
    assert {"cond_norm.shift", "cond_norm.scale"} <= set(state)
