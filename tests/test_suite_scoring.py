"""The field's suite in the scoring pass: per-row columns of Score, their reduction in summarize (means, chance,
FID/KID, bootstrap intervals), the variant tests and the protocol cards, each against an independent computation."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.spatial.distance
import torch
from PIL import Image

from neuroimagen.data.datasets import load_image
from neuroimagen.metrics.fid import frechet_distance, kernel_inception_distance
from neuroimagen.metrics.pixcorr import pixcorr_scores
from neuroimagen.metrics.ssim import ssim
from neuroimagen.metrics.stats import bootstrap_ci
from neuroimagen.metrics.summary import Statistics, compare_variants, summarize
from neuroimagen.metrics.twoway import two_way_identification
from neuroimagen.models.classifier import Classifier, JudgeCNN
from neuroimagen.reconstruction.rows import row_seeds
from neuroimagen.reconstruction.score import Score
from neuroimagen.reconstruction.suite import Suite

R = 16


def _write_images(folder, n: int, seed: int) -> list[str]:
    g = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{seed}_{i}.png"
        Image.fromarray((g.random((R, R, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _projection(dim: int = 12):
    w = torch.randn(3 * R * R, dim, generator=torch.Generator().manual_seed(5))
    return lambda x: {"proj": torch.nn.functional.interpolate(x, size=(R, R)).flatten(1) @ w,
                      "proj2": torch.tanh(torch.nn.functional.interpolate(x, size=(R, R)).flatten(1) @ w[:, :6])}


@pytest.fixture
def gallery(tmp_path):
    return {"1": _write_images(tmp_path, 7, 1), "2": _write_images(tmp_path, 5, 2)}


def _suite(gallery):
    return Suite({"p": _projection()}, twoway=["proj"], distance=["proj2"], fid="proj", load_gt=load_image,
                 gallery=gallery)


def _preds(gts: list[str], seed: int) -> torch.Tensor:
    """Noisy versions of the ground truths: related to them, not equal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([load_image(p, R) for p in gts])
    return (0.6 * x + 0.4 * torch.rand(x.shape, generator=g)).clamp(0, 1)


def test_suite_two_way_equals_mindeye_per_item_scores_and_a_corrcoef_loop(gallery):
    suite = _suite(gallery)
    gts = gallery["1"]  # one generation per gallery image: exactly MindEye's setting
    pred = _preds(gts, 0)
    cols = suite(pred, ["1"] * len(gts), gts)
    feats = _projection()
    pf, gf = feats(pred)["proj"], feats(torch.stack([load_image(p, R) for p in gts]))["proj"]
    ref, _ = two_way_identification(pf, gf)
    np.testing.assert_allclose(cols["twoway_proj"], ref.numpy(), atol=1e-12)
    p64, g64 = pf.double().numpy(), gf.double().numpy()
    for j in range(len(gts)):  # brute force with np.corrcoef
        r = [np.corrcoef(g64[i], p64[j])[0, 1] for i in range(len(gts))]
        assert cols["twoway_proj"][j] == pytest.approx(sum(r[i] < r[j] for i in range(len(gts)) if i != j) / (len(gts) - 1))
    # correlation distance and its chance baseline against scipy
    pf2, gf2 = feats(pred)["proj2"].double().numpy(), feats(torch.stack([load_image(p, R) for p in gts]))["proj2"].double().numpy()
    for j in range(len(gts)):
        assert cols["dist_proj2"][j] == pytest.approx(scipy.spatial.distance.correlation(gf2[j], pf2[j]), abs=1e-9)
        others = [scipy.spatial.distance.correlation(gf2[i], pf2[j]) for i in range(len(gts)) if i != j]
        assert cols["dist_proj2_chance"][j] == pytest.approx(np.mean(others), abs=1e-9)
    np.testing.assert_allclose(cols["fid_gt"], gf.numpy(), rtol=1e-5)
    assert cols["fid_feats"].shape == (len(gts), 12)


def test_suite_rows_do_not_depend_on_the_batch_or_the_other_subjects(gallery):
    suite = _suite(gallery)
    subjects = ["1"] * 7 + ["2"] * 5
    gts = gallery["1"] + gallery["2"]
    pred = _preds(gts, 1)
    whole = suite(pred, subjects, gts)
    fresh = _suite({"2": gallery["2"]})  # subject 2 alone, in batches of 2
    parts = [fresh(pred[i:i + 2], subjects[i:i + 2], gts[i:i + 2]) for i in range(7, 12, 2)]
    for col in ("twoway_proj", "dist_proj2", "dist_proj2_chance"):
        np.testing.assert_allclose(whole[col][7:], np.concatenate([p[col] for p in parts]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="not in subject 1's gallery"):
        suite(pred[:1], ["1"], [gallery["2"][0]])


def test_mismatched_ground_truth_is_another_gallery_image_fixed_by_the_seed(gallery):
    suite = _suite(gallery)
    gts = gallery["1"] * 40
    seeds = [row_seeds(0, j, 0)["seed_mismatch"] for j in range(len(gts))]
    other = suite.mismatch_paths(["1"] * len(gts), gts, seeds)
    assert all(o != g and o in gallery["1"] for o, g in zip(other, gts))
    assert other == suite.mismatch_paths(["1"] * len(gts), gts, seeds)
    assert len(set(other)) == 7  # every other image gets drawn
    assert suite.mismatch_paths(["3"], ["x.png"], [1]) == ["x.png"]  # no gallery: nothing else to compare with


def test_score_writes_pixcorr_and_chance_baselines_against_the_mismatched_ground_truth(gallery):
    torch.manual_seed(0)
    clf = Classifier(JudgeCNN(3, width=4), num_classes=3, input_size=R, identity="judge-test", kind="judge")
    suite = Suite({"judge": lambda x: {"judge": clf.features(x)}}, twoway=["judge"], distance=[], fid="judge",
                  load_gt=load_image, gallery=gallery)
    score = Score(clf, n_way=3, top_k=1, trials=5, ssim_convention="dreamdiffusion", ssim_resolution=None,
                  suite=suite)
    gts = gallery["1"][:4]
    pred = _preds(gts, 2)
    seeds = [row_seeds(0, j, 0) for j in range(4)]
    batch = {"image": pred.numpy(), "gt": np.asarray(gts, dtype=object), "subject": np.asarray(["1"] * 4, dtype=object),
             "variant": np.asarray(["I"] * 4, dtype=object), "stem": np.asarray([f"s{j}" for j in range(4)], dtype=object),
             "item": np.arange(4), "eeg_item": np.arange(4), "sample": np.zeros(4, dtype=int), "label": np.zeros(4, dtype=int),
             "class_name": np.asarray(["a"] * 4, dtype=object), **{k: np.asarray([s[k] for s in seeds]) for k in seeds[0]}}
    out = score(batch)
    gt = torch.stack([load_image(p, R) for p in gts])
    np.testing.assert_allclose(out["pixcorr"], pixcorr_scores(pred, gt).numpy(), atol=1e-12)
    other = [suite.mismatch_paths(["1"], [g], [s["seed_mismatch"]])[0] for g, s in zip(gts, seeds)]
    og = torch.stack([load_image(p, R) for p in other])
    np.testing.assert_allclose(out["pixcorr_chance"], pixcorr_scores(pred, og).numpy(), atol=1e-12)
    np.testing.assert_allclose(out["ssim_chance"], ssim(pred.double(), og.double(), convention="dreamdiffusion",
                                                        resolution=None).numpy(), atol=1e-12)
    assert (out["pixcorr"] > out["pixcorr_chance"]).all()  # the noisy copies correlate with their own target
    assert out["twoway_judge"].shape == (4,) and ((out["twoway_judge"] >= 0) & (out["twoway_judge"] <= 1)).all()
    assert out["fid_feats"].shape == (4, 16) and out["fid_gt"].shape == (4, 16)


def test_pixcorr_of_a_constant_generation_is_nan_in_the_scoring_pass():
    pred = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pred[1] = 0.5
    s = pixcorr_scores(pred, torch.rand(2, 3, 8, 8), constant="nan")
    assert np.isfinite(float(s[0])) and np.isnan(float(s[1]))
    with pytest.raises(ValueError, match="pred image 1 is constant"):
        pixcorr_scores(pred, torch.rand(2, 3, 8, 8))


def _table(n_trials: int = 8, samples: int = 2, dim: int = 5) -> pd.DataFrame:
    g = np.random.default_rng(0)
    rows = []
    for v, shift in (("I", 0.0), ("L+I", 0.3), ("L", -0.2)):
        for s in ("1", "2"):
            for t in range(n_trials):
                gt = g.normal(size=dim) if v == "I" else None
                for k in range(samples):
                    rows.append({"subject": s, "variant": v, "item": t, "sample": k, "label": t % 3,
                                 "gt": f"/g/{s}_{t}.png", "acc_hit": float(g.random() < 0.5 + shift),
                                 "acc_n": 3, "ssim": g.random() + shift, "ssim_chance": g.random(),
                                 "pixcorr": g.normal() + shift, "pixcorr_chance": g.normal(),
                                 "twoway_judge": g.random(), "judge_gt_top1": t % 3,
                                 "probs": list(g.dirichlet(np.ones(3))),
                                 "fid_feats": list(g.normal(size=dim) + shift), "fid_gt": gt})
    df = pd.DataFrame(rows)
    gts = df[df.variant == "I"].groupby(["subject", "item"])["fid_gt"].first()
    df["fid_gt"] = [list(gts.loc[(s, t)]) for s, t in zip(df.subject, df.item)]
    return df


def test_summary_suite_columns_match_independent_computations():
    df = _table()
    st = Statistics(n_boot=500, n_boot_whole=50, kid_subsets=20, kid_subset_size=1000, seed=3)
    out = summarize(df, k=1, is_splits=10, is_seed=3, label_to_class=[0, 1, 2], stats=st)
    row = out[(out.subject == "1") & (out.variant == "L+I")].iloc[0]
    sub = df[(df.subject == "1") & (df.variant == "L+I")]
    assert row["pixcorr"] == pytest.approx(sub["pixcorr"].mean())
    assert row["pixcorr_chance"] == pytest.approx(sub["pixcorr_chance"].mean())
    assert row["twoway_judge_chance"] == 0.5
    ci = bootstrap_ci(sub["pixcorr"].to_numpy(), n_boot=500, groups=("1/" + sub["item"].astype(str)).to_numpy(), seed=3)
    assert (row["pixcorr_lo"], row["pixcorr_hi"]) == pytest.approx((ci.low, ci.high))
    assert row["acc_lo"] <= row["acc"] <= row["acc_hi"] and row["ssim_lo"] <= row["ssim"] <= row["ssim_hi"]
    assert row["is_lo"] <= row["is_hi"] and row["acc_max_lo"] <= row["acc_max"] <= row["acc_max_hi"]
    gen = torch.tensor(np.stack(sub["fid_feats"]), dtype=torch.float64)
    ref = torch.tensor(np.stack(sub.groupby("item")["fid_gt"].first()), dtype=torch.float64)
    assert row["fid"] == pytest.approx(frechet_distance(gen, ref))
    assert (row["fid_n"], row["fid_n_ref"], row["kid_subset_size"]) == (16, 8, 8)
    kid, kid_std = kernel_inception_distance(gen, ref, subsets=20, subset_size=8, generator=torch.Generator().manual_seed(3))
    assert (row["kid"], row["kid_std"]) == pytest.approx((kid, kid_std))
    assert row["fid_lo"] <= row["fid_hi"]
    pooled = out[(out.subject == "all") & (out.variant == "L+I")].iloc[0]
    assert pooled["fid_n_ref"] == 16  # one ground truth per (subject, trial)
    # without statistics: the old columns only
    plain = summarize(df, k=1, is_splits=10, is_seed=3, label_to_class=[0, 1, 2])
    assert "pixcorr" not in plain.columns and "acc_lo" not in plain.columns


def test_variant_tests_match_an_exact_sign_flip_enumeration():
    df = _table(n_trials=6, samples=2)
    st = Statistics(n_perm=100_000, seed=0)
    tests = compare_variants(df, [("L+I", "I"), ("L+I", "missing")], st)
    assert set(tests["subject"]) == {"1", "2", "all"} and set(tests["b"]) == {"I"}
    t = tests[(tests.subject == "1") & (tests.metric == "pixcorr")].iloc[0]
    a = df[(df.subject == "1") & (df.variant == "L+I")].groupby("item")["pixcorr"].mean().to_numpy()
    b = df[(df.subject == "1") & (df.variant == "I")].groupby("item")["pixcorr"].mean().to_numpy()
    d = a - b
    count = sum(abs(sum(s * x for s, x in zip(signs, d))) >= abs(d.sum()) - 1e-12
                for signs in itertools.product((1, -1), repeat=len(d)))
    assert t["exact"] and t["n_trials"] == 6 and t["p_value"] == pytest.approx(count / 2 ** 6)
    assert t["diff"] == pytest.approx(d.mean()) and t["mean_a"] == pytest.approx(a.mean())
    assert "pixcorr_chance" not in set(tests["metric"]) and "acc" in set(tests["metric"])
    pooled = tests[(tests.subject == "all") & (tests.metric == "pixcorr")].iloc[0]
    assert pooled["n_trials"] == 12 and pooled["exact"] and pooled["n_perm"] == 2 ** 12  # 2^12 <= n_perm


def test_statistics_settings_never_invalidate_shards_but_a_suite_network_does(tmp_path):
    from neuroimagen.config import Config, override
    from neuroimagen.runs.evaluation import fingerprint, galleries

    def fp(*sets):
        return fingerprint(override(Config(), list(sets)), {"stages": {}}, "ldm", "classifier", [])

    now = fp()
    assert fp("eval.suite.bootstrap=50", "eval.suite.permutations=500", "eval.suite.comparisons=[I:L]",
              "eval.suite.kid_subsets=3", "eval.suite.ci_level=0.9") == now  # read by evaluate only
    weights = tmp_path / "alexnet.pth"
    weights.write_bytes(b"x")
    assert fp(f"eval.suite.alexnet={weights}") != now and fp("eval.suite.judge_features=false") != now
    rows = [{"subject": "1", "gt": "/a.png"}, {"subject": "1", "gt": "/b.png"}, {"subject": "1", "gt": "/a.png"},
            {"subject": "2", "gt": "/b.png"}, {"subject": "2", "gt": ""}]
    assert galleries(rows) == {"1": ["/a.png", "/b.png"], "2": ["/b.png"]}


@pytest.mark.parametrize("sets, frag", [
    (["eval.suite.comparisons=[L+I]"], "eval.suite.comparisons: 'L+I' is not a pair"),
    (["eval.suite.fid_network=inception"], "eval.suite.fid_network: inception needs eval.suite.inception"),
    (["eval.suite.bootstrap=1"], "eval.suite.bootstrap"),
])
def test_suite_settings_are_checked_with_their_key(sets, frag):
    from neuroimagen.config import Config, override
    from neuroimagen.errors import ConfigError

    with pytest.raises(ConfigError, match=frag.replace("[", r"\[").replace("+", r"\+")):
        override(Config(), sets)
