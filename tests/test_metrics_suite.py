"""The MindEye reconstruction suite (PixCorr, two-way identification, correlation distance, feature networks)
and its statistics (bootstrap CI, paired permutation test), each checked against an independent computation."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from neuroimagen.errors import ConfigError
from neuroimagen.metrics.pixcorr import pixcorr, pixcorr_scores
from neuroimagen.metrics.stats import bootstrap_ci, paired_permutation_test
from neuroimagen.metrics.twoway import correlation_distance, two_way_identification


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=gen(seed))


# ----------------------------------------------------------------------------------------------- PixCorr


def test_pixcorr_matches_mindeye_numpy_loop():
    """Reference: MindEye's cells verbatim - torchvision Resize((256, 256)), Resize(425, BILINEAR) on tensors
    (antialias off, as torchvision 0.15/0.16 did for tensors), flatten, np.corrcoef per pair, mean."""
    transforms = pytest.importorskip("torchvision.transforms")
    pred, gt = images(3, 40, seed=1), images(3, 40, seed=2)
    pred[0, :, :5] = 1.7  # out of range: MindEye clamps reconstructions to [0, 1]
    base = transforms.Resize((256, 256), antialias=False)
    pre = transforms.Resize(425, interpolation=transforms.InterpolationMode.BILINEAR, antialias=False)
    p = pre(base(pred.clamp(0, 1))).reshape(3, -1).numpy()
    g = pre(base(gt)).reshape(3, -1).numpy()
    ref = [np.corrcoef(g[i], p[i])[0][1] for i in range(3)]
    assert p.shape[1] == 3 * 425 * 425
    np.testing.assert_allclose(pixcorr_scores(pred, gt).numpy(), ref, rtol=0, atol=1e-6)
    assert pixcorr(pred, gt) == pytest.approx(np.mean(ref), abs=1e-6)


def test_pixcorr_without_base_step_and_downscaling_matches_loop():
    pred, gt = images(2, 500, seed=3), images(2, 500, seed=4)
    x = torch.nn.functional.interpolate(pred.double(), size=(425, 425), mode="bilinear", align_corners=False)
    y = torch.nn.functional.interpolate(gt.double(), size=(425, 425), mode="bilinear", align_corners=False)
    ref = [np.corrcoef(x[i].flatten().numpy(), y[i].flatten().numpy())[0, 1] for i in range(2)]
    np.testing.assert_allclose(pixcorr_scores(pred, gt, base_resolution=None).numpy(), ref, atol=1e-10)


def test_pixcorr_invariants():
    x = images(2, 16, seed=5) * 0.5 + 0.25
    assert pixcorr(x, x) == pytest.approx(1.0, abs=1e-12)
    assert pixcorr(x, 1 - x) == pytest.approx(-1.0, abs=1e-12)  # bilinear weights sum to 1: resize(1-x) = 1-resize(x)
    assert pixcorr(x, 0.5 * x + 0.1) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("pred, gt, frag", [
    (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), "(B, 3, H, W)"),
    (torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8), "equal shapes"),
    (torch.full((1, 3, 8, 8), 0.5), torch.rand(1, 3, 8, 8), "pred image 0 is constant"),
    (torch.zeros(0, 3, 8, 8), torch.zeros(0, 3, 8, 8), "at least one"),
])
def test_pixcorr_errors(pred, gt, frag):
    with pytest.raises(ValueError, match=frag.replace("(", r"\(").replace(")", r"\)")):
        pixcorr(pred, gt)


# ----------------------------------------------------------------------------------------------- two-way


def two_way_loop(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Brute force: for each reconstruction j, count the other gt i whose r(gt_i, pred_j) < r(gt_j, pred_j)."""
    n = len(pred)
    out = []
    for j in range(n):
        own = np.corrcoef(gt[j], pred[j])[0, 1]
        wins = sum(np.corrcoef(gt[i], pred[j])[0, 1] < own for i in range(n) if i != j)
        out.append(wins / (n - 1))
    return np.array(out)


def test_two_way_matches_brute_force_loop_and_mindeye_vectorised_code():
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(12, 5, 3, generator=g)
    pred = gt + 1.5 * torch.randn(12, 5, 3, generator=g)  # noisy reconstructions: scores strictly inside (0, 1)
    scores, mean = two_way_identification(pred, gt)
    p, t = pred.flatten(1).numpy(), gt.flatten(1).numpy()
    ref = two_way_loop(p, t)
    np.testing.assert_array_equal(scores.numpy(), ref)
    # MindEye's own code (src/Reconstruction_Metrics.py, two_way_identification)
    r = np.corrcoef(t, p)[:12, 12:]
    success_cnt = np.sum(r < np.diag(r), 0)
    assert mean == pytest.approx(np.mean(success_cnt) / 11, abs=1e-15)
    assert 0 < mean < 1 and len(set(ref)) > 2


def test_two_way_perfect_chance_and_ties():
    gt = torch.randn(6, 10, generator=gen(1))
    assert two_way_identification(gt.clone(), gt)[1] == 1.0
    scores, _ = two_way_identification(gt[[1, 0, 2, 3, 4, 5]], gt)  # items 0 and 1 swapped
    assert scores[0] < 1 and scores[1] < 1 and bool((scores[2:] == 1).all())
    dup = gt.clone()
    dup[1] = dup[0]  # two identical ground truths: a tie counts as a failure (strict <)
    scores, _ = two_way_identification(dup.clone(), dup)
    assert scores[0] == pytest.approx(4 / 5) and scores[1] == pytest.approx(4 / 5)
    rand = torch.randn(400, 8, generator=gen(2))
    assert two_way_identification(torch.randn(400, 8, generator=gen(3)), rand)[1] == pytest.approx(0.5, abs=0.03)


def test_two_way_errors():
    with pytest.raises(ValueError, match="at least 2 items"):
        two_way_identification(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="equal shapes"):
        two_way_identification(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="gt_feats row 1 is constant"):
        two_way_identification(torch.randn(3, 4), torch.tensor([[1.0, 2, 3, 4], [2, 2, 2, 2], [0, 1, 0, 1]]))


def test_correlation_distance_matches_scipy():
    distance = pytest.importorskip("scipy.spatial.distance")
    gt = torch.randn(5, 7, 2, generator=gen(4), dtype=torch.float64)
    pred = gt + torch.randn(5, 7, 2, generator=gen(5), dtype=torch.float64)
    d, mean = correlation_distance(pred, gt)
    ref = [distance.correlation(gt[i].flatten().numpy(), pred[i].flatten().numpy()) for i in range(5)]
    np.testing.assert_allclose(d.numpy(), ref, atol=1e-12)
    assert mean == pytest.approx(np.mean(ref), abs=1e-12)
    assert correlation_distance(gt, gt)[1] == pytest.approx(0.0, abs=1e-12)
    assert correlation_distance(-gt, gt)[1] == pytest.approx(2.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_coverage_of_the_mean_of_normal_samples():
    rng = np.random.default_rng(0)
    g = gen(0)
    hits = 0
    for _ in range(500):  # nominal 0.95; the percentile interval of a mean undercovers slightly at n = 50
        x = rng.normal(1.0, 2.0, size=50)
        ci = bootstrap_ci(x, n_boot=1000, generator=g)
        hits += ci.low <= 1.0 <= ci.high
        assert ci.low < ci.estimate < ci.high and ci.estimate == pytest.approx(x.mean())
    assert 0.9 <= hits / 500 <= 0.99


def test_bootstrap_groups_resample_trials_together():
    """Samples of one trial share a trial effect: only resampling whole trials keeps the nominal coverage."""
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), 4)  # 30 trials x 4 generated images
    grouped = naive = 0
    for _ in range(200):
        x = np.repeat(rng.normal(0.0, 1.0, 30), 4) + rng.normal(0.0, 0.3, 120)
        ci = bootstrap_ci(x, n_boot=500, groups=groups, seed=int(rng.integers(1 << 30)))
        grouped += ci.low <= 0.0 <= ci.high
        ci = bootstrap_ci(x, n_boot=500, seed=int(rng.integers(1 << 30)))
        naive += ci.low <= 0.0 <= ci.high
    assert 0.9 <= grouped / 200 <= 0.99
    assert naive / 200 < 0.8  # treating the 4 images of a trial as independent makes the interval too narrow
    assert ci.n_units == 120 and not ci.grouped


def test_bootstrap_general_stat_uses_the_same_draws_as_the_mean_fast_path():
    x = np.random.default_rng(2).normal(size=25)
    groups = np.arange(25) // 2
    fast = bootstrap_ci(x, n_boot=300, groups=groups, seed=7)
    slow = bootstrap_ci(x, stat=lambda v: float(np.sum(v) / len(v)), n_boot=300, groups=groups, seed=7)
    assert (fast.low, fast.high) == pytest.approx((slow.low, slow.high), abs=1e-12)
    assert fast.n_units == 13 and fast.grouped
    med = bootstrap_ci(x, stat=np.median, n_boot=300, seed=7)
    assert med.estimate == pytest.approx(np.median(x)) and med.low < med.high
    again = bootstrap_ci(torch.tensor(x), n_boot=300, groups=groups, seed=7)
    assert again == fast  # seeded: the same call gives the same interval, whatever the input type
    assert bootstrap_ci(x, n_boot=300, groups=groups, seed=8) != fast


@pytest.mark.parametrize("kw, frag", [
    (dict(values=[1.0]), "at least 2 resampling units"),
    (dict(values=[1.0, 2.0], groups=[0, 0]), "at least 2 resampling units"),
    (dict(values=[1.0, np.nan]), "non-finite"),
    (dict(values=[1.0, 2.0], level=1.0), "level must lie in"),
    (dict(values=[1.0, 2.0], n_boot=0), "n_boot must be"),
    (dict(values=[[1.0, 2.0]]), "must be 1-D"),
    (dict(values=[1.0, 2.0], groups=[0]), "one id per value"),
])
def test_bootstrap_errors(kw, frag):
    with pytest.raises(ValueError, match=frag):
        bootstrap_ci(**kw)


# ----------------------------------------------------------------------------------------------- permutation


def exact_sign_flip_p(d: np.ndarray) -> float:
    """Independent reference: every sign vector, two-sided on |mean|."""
    obs = abs(d.mean())
    stats = [abs(np.mean(np.array(s) * d)) for s in itertools.product([1, -1], repeat=len(d))]
    return float(np.mean([s >= obs - 1e-12 for s in stats]))


def test_permutation_exact_enumeration_matches_reference():
    rng = np.random.default_rng(3)
    for n in (1, 3, 6, 9):
        a, b = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
        res = paired_permutation_test(a, b, n_perm=2 ** n)
        assert res.exact and res.n_perm == 2 ** n
        assert res.p_value == pytest.approx(exact_sign_flip_p(a - b), abs=1e-12)
        assert res.statistic == pytest.approx(np.mean(a - b))
    d = np.ones(5)  # every flip changes |sum| except the identity and its negation: p = 2 / 32
    assert paired_permutation_test(d, np.zeros(5), n_perm=32).p_value == pytest.approx(2 / 32)
    assert paired_permutation_test(d, d, n_perm=32).p_value == 1.0


def test_permutation_matches_scipy_permutation_test():
    stats = pytest.importorskip("scipy.stats")
    if not hasattr(stats, "permutation_test"):
        pytest.skip("scipy.stats.permutation_test needs scipy >= 1.8")
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.5, 1, 10), rng.normal(0, 1, 10)
    ref = stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                                 permutation_type="samples", alternative="two-sided", n_resamples=np.inf)
    res = paired_permutation_test(a, b, n_perm=2 ** 10)
    assert res.exact and res.p_value == pytest.approx(ref.pvalue, abs=1e-12)


def test_permutation_monte_carlo_is_close_to_exact_and_seeded():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.4, 1, 15), rng.normal(0, 1, 15)
    exact = paired_permutation_test(a, b, n_perm=2 ** 15)
    mc = paired_permutation_test(a, b, n_perm=4000, seed=1)
    assert not mc.exact and mc.n_perm == 4000
    se = np.sqrt(exact.p_value * (1 - exact.p_value) / 4000)
    assert abs(mc.p_value - exact.p_value) < 4 * se + 1 / 4001
    assert paired_permutation_test(a, b, n_perm=4000, seed=1) == mc
    assert paired_permutation_test(a, b, n_perm=4000, generator=gen(2)).p_value != mc.p_value
    assert paired_permutation_test(np.ones(40), np.zeros(40), n_perm=99).p_value == pytest.approx(1 / 100)


@pytest.mark.parametrize("a, b, kw, frag", [
    ([1.0, 2.0], [1.0], {}, "paired"),
    ([], [], {}, "at least one pair"),
    ([1.0], [np.inf], {}, "non-finite"),
    ([1.0], [0.0], dict(n_perm=0), "n_perm must be"),
])
def test_permutation_errors(a, b, kw, frag):
    with pytest.raises(ValueError, match=frag):
        paired_permutation_test(a, b, **kw)


# ----------------------------------------------------------------------------------------------- feature nets


@pytest.fixture(scope="module")
def tv():
    return pytest.importorskip("torchvision")


def at(path) -> str:
    """A file path as a regular expression, for matching error messages that start with it."""
    return re.escape(str(path))


def save_state(model: torch.nn.Module, path, keep=lambda k: True, prefix: str = "", extra=None):
    state = {prefix + k: v for k, v in model.state_dict().items() if keep(k)}
    state.update(extra or {})
    torch.save(state, path)
    return path


def test_alexnet_features_shapes_and_values(tv, tmp_path):
    from neuroimagen.models.feature_nets import load_alexnet

    torch.manual_seed(0)
    ref = tv.models.alexnet(weights=None).eval()
    net = load_alexnet(save_state(ref, tmp_path / "alexnet.pth", keep=lambda k: k.startswith("features.")))
    torch.save({k: v.half() for k, v in ref.features.state_dict(prefix="features.").items()}, tmp_path / "a16.pth")
    half = load_alexnet(tmp_path / "a16.pth")
    x = images(2, 64, seed=6)
    out = net(x)
    assert out["alexnet2"].shape == (2, 192 * 31 * 31) and out["alexnet5"].shape == (2, 256 * 15 * 15)
    # independent: MindEye's preprocessing and the torchvision module run by hand up to ReLU 2 / ReLU 5
    t = tv.transforms
    pre = t.Compose([t.Resize((256, 256), antialias=False), t.Resize(256, antialias=False),
                     t.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        h2 = ref.features[:5](pre(x))
        h5 = ref.features[5:12](h2.clone())
    torch.testing.assert_close(out["alexnet2"], h2.flatten(1))
    torch.testing.assert_close(out["alexnet5"], h5.flatten(1))
    torch.testing.assert_close(net.extract(x, batch_size=1)["alexnet5"], out["alexnet5"])
    assert half(x)["alexnet2"].dtype == torch.float32  # an fp16 file runs in float32


def test_feature_net_errors_name_the_file(tv, tmp_path):
    from neuroimagen.models.feature_nets import load_alexnet, load_clip_vision

    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=f"{at((missing))}: no such file .*nothing is downloaded"):
        load_alexnet(missing)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=f"{at((junk))}: cannot read a state dict"):
        load_alexnet(junk)
    wrong = save_state(tv.models.squeezenet1_0(weights=None), tmp_path / "squeezenet.pth")
    with pytest.raises(ConfigError, match=f"{at((wrong))}: state dict does not fit torchvision alexnet") as err:
        load_alexnet(wrong)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"{at((tmp_path / 'clip'))}: no such directory"):
        load_clip_vision(tmp_path / "clip")


@pytest.mark.parametrize("loader", ["load_alexnet", "load_inception_v3", "load_efficientnet_b1",
                                    "load_swav_resnet50"])
def test_every_torchvision_loader_names_a_missing_or_wrong_file(tv, tmp_path, loader):
    from neuroimagen.models import feature_nets

    load = getattr(feature_nets, loader)
    with pytest.raises(ConfigError, match=f"{at((tmp_path / 'w.pth'))}: no such file"):
        load(tmp_path / "w.pth")
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "tiny.pth")
    with pytest.raises(ConfigError, match=f"{at((tmp_path / 'tiny.pth'))}: state dict does not fit .*missing keys"):
        load(tmp_path / "tiny.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match=f"{at((tmp_path / 'list.pth'))}: expected a state dict"):
        load(tmp_path / "list.pth")


def test_resnet_family_rejects_a_deeper_network(tv, tmp_path):
    """A resnet101 file holds every resnet50 key with the right shape; its extra blocks must not be ignored."""
    from neuroimagen.models.feature_nets import load_swav_resnet50

    with torch.device("meta"):
        deeper, resnet50 = tv.models.resnet101(weights=None), tv.models.resnet50(weights=None)
    state = {k: torch.zeros(v.shape) for k, v in deeper.state_dict().items() if k.startswith("layer3.")}
    ok = {k: torch.zeros(v.shape) for k, v in resnet50.state_dict().items()}
    torch.save({**ok, **state}, tmp_path / "r101.pth")
    with pytest.raises(ConfigError, match="keys foreign to the architecture, e.g. layer3.6"):
        load_swav_resnet50(tmp_path / "r101.pth")


def test_inception_effnet_swav_features(tv, tmp_path):
    """Real architectures, random weights; MindEye's input sizes are checked, the forward runs at 75 px."""
    from neuroimagen.models.feature_nets import load_efficientnet_b1, load_inception_v3, load_swav_resnet50

    torch.manual_seed(0)
    x = images(2, 32, seed=7)
    inc = tv.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False).eval()
    eff = tv.models.efficientnet_b1(weights=None).eval()
    res = tv.models.resnet50(weights=None).eval()
    # SwAV's checkpoint layout: DataParallel "module." prefix, projection head and prototypes, no fc
    swav_file = save_state(res, tmp_path / "swav_800ep_pretrain.pth.tar", keep=lambda k: not k.startswith("fc."),
                           prefix="module.", extra={"module.projection_head.0.weight": torch.zeros(8, 2048),
                                                    "module.prototypes.weight": torch.zeros(30, 8)})
    nets = {"inception": load_inception_v3(save_state(inc, tmp_path / "inception.pth")),
            "effnet": load_efficientnet_b1(save_state(eff, tmp_path / "effnet.pth")),
            "swav": load_swav_resnet50(swav_file)}
    assert {k: (n.resolution, n.base_resolution) for k, n in nets.items()} == {
        "inception": (342, 256), "effnet": (255, 256), "swav": (224, 256)}
    for net in nets.values():
        net.resolution = 75  # small inputs: the architectures pool adaptively
    out = {k: net(x)[k] for k, net in nets.items()}
    assert {k: tuple(v.shape) for k, v in out.items()} == {"inception": (2, 2048), "effnet": (2, 1280),
                                                           "swav": (2, 2048)}
    # independent: torchvision's transforms and the modules run by hand
    t = tv.transforms
    pre = t.Compose([t.Resize((256, 256), antialias=False), t.Resize(75, antialias=False),
                     t.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        r = pre(x)
        r = res.layer4(res.layer3(res.layer2(res.layer1(res.maxpool(res.relu(res.bn1(res.conv1(r))))))))
        torch.testing.assert_close(out["swav"], res.avgpool(r).flatten(1))
        torch.testing.assert_close(out["effnet"], eff.avgpool(eff.features(pre(x))).flatten(1))
        inc.fc = torch.nn.Identity()  # eval-mode forward up to avgpool + flatten (dropout is off)
        torch.testing.assert_close(out["inception"], inc(pre(x)))


def test_clip_vision_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from neuroimagen.models.feature_nets import load_clip_vision

    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=224, patch_size=14, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    net = load_clip_vision(tmp_path / "clip")
    x = images(2, 32, seed=8)
    out = net(x)["clip"]
    assert out.shape == (2, 16) and "patch 14, 224 px" in net.identity
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    px = torch.nn.functional.interpolate(torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear"),
                                         size=(224, 224), mode="bilinear")
    with torch.no_grad():
        ref = model(pixel_values=(px - mean) / std).image_embeds
    torch.testing.assert_close(out, ref)
    # a folder without the projection (a plain CLIPVisionModel) is not what the suite needs
    transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path / "noproj")
    with pytest.raises(ConfigError, match="noproj: does not hold CLIP vision weights with a projection"):
        load_clip_vision(tmp_path / "noproj")
