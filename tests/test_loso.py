"""Leave-one-subject-out (``eval.protocol: loso``, ``data.holdout_subject``): the split invariants on both dataset
layouts, the config errors, stage 1's validation on a fold, and a tiny end-to-end run (folds, the summary of both
protocols, resume, the CLI, the report's side-by-side table)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from conftest import assert_one_line_error
from neuroimagen.config import load_config, override
from neuroimagen.errors import ConfigError
from test_determinism import TINY  # the tiny everything of the determinism test

# ----------------------------------------------------------------------------------------------
# The split


@pytest.mark.parametrize("layout", ["twin", "things_twin"])
def test_a_held_out_subject_is_only_in_test_with_all_its_test_trials(layout, request):
    from neuroimagen.data.datasets import load_recording, load_splits, subjects_of

    cfg = load_config(request.getfixturevalue(layout) / "config.yaml")
    within = load_recording(cfg.data, check_images=False)
    subjects = subjects_of(within)
    assert subjects == [1, 2]
    for s in subjects:
        splits = load_splits(override(cfg, [f"data.holdout_subject={s}"]).data, image_mode="none")
        for name in ("train", "val"):
            assert s not in subjects_of(splits[name])
            own = within.splits[name][within.subjects[within.splits[name]] != s]
            np.testing.assert_array_equal(splits[name].indices, own)  # every other subject's trials, in order
            assert len(splits[name]) > 0
        assert subjects_of(splits["test"]) == [s]
        np.testing.assert_array_equal(splits["test"].indices, within.splits["test"][within.subjects[within.splits["test"]] == s])
        assert not set(splits["test"].indices) & (set(splits["train"].indices) | set(splits["val"].indices))
        assert any("subject " + str(s) + " held out" in n for n in splits["train"].recording.notes)


def test_subjects_of_a_recording_are_those_its_splits_keep(twin):
    from neuroimagen.data.datasets import hold_out_subject, load_recording, subjects_of

    cfg = load_config(twin / "config.yaml", ["data.subjects=[2]"])
    rec = load_recording(cfg.data, check_images=False)
    assert sorted(set(rec.subjects.tolist())) == [1, 2]  # the file's segments, subject 1's included
    assert subjects_of(rec) == [2]
    with pytest.raises(ConfigError, match=r"data\.holdout_subject: holding out subject 2 leaves no training subject"):
        hold_out_subject(rec, 2)


def test_holdout_and_protocol_errors_name_the_key(twin, run_cli):
    from neuroimagen.data.datasets import load_splits

    with pytest.raises(ConfigError, match=r"^--set eval\.protocol=lsoo: eval\.protocol: expected one of 'within', "
                                          r"'loso', got 'lsoo'$"):
        load_config(None, ["eval.protocol=lsoo"])
    with pytest.raises(ConfigError, match=r"data\.holdout_subject: expected integer >= 1 or null, got 0"):
        load_config(None, ["data.holdout_subject=0"])
    with pytest.raises(ConfigError, match=r"data\.holdout_subject: subject 3 is not among data\.subjects \[1, 2\]"):
        load_config(None, ["data.subjects=[1,2]", "data.holdout_subject=3"])
    with pytest.raises(ConfigError, match=r"data\.holdout_subject: holding out subject 1 leaves no training subject"):
        load_config(None, ["data.subjects=[1]", "data.holdout_subject=1"])
    for key in ("eval.protocol=loso", "data.holdout_subject=1"):
        with pytest.raises(ConfigError, match=r"eval\.split: 'val' with leave-one-subject-out .* has only test trials"):
            load_config(None, [key, "eval.split=val"])
    cfg = load_config(twin / "config.yaml", ["data.holdout_subject=9"])
    with pytest.raises(ConfigError, match=r"^data\.holdout_subject: subject 9 is not among the dataset's subjects \[1, 2\]"):
        load_splits(cfg.data, image_mode="none")
    assert_one_line_error(run_cli("config", "show", "--set", "eval.protocol=xyz"),
                          "eval.protocol: expected one of 'within', 'loso', got 'xyz'")
    assert_one_line_error(run_cli("config", "show", "--set", "data.holdout_subject=abc"), "data.holdout_subject")


def test_protocol_does_not_change_the_shard_fingerprint():
    from neuroimagen.runs.evaluation import fingerprint

    record = {"stages": {}}
    a = fingerprint(load_config(None), record, "ldm", "clf", [])
    assert fingerprint(load_config(None, ["eval.protocol=loso"]), record, "ldm", "clf", []) == a
    assert fingerprint(load_config(None, ["data.holdout_subject=1"]), record, "ldm", "clf", []) != a


def test_stage1_kmeans_uses_the_validation_classes_of_a_fold(things_twin):
    """THINGS-EEG2's labels include the test concepts: a fold's validation split holds fewer trials than labels,
    and k-means with K = every label could not run."""
    from neuroimagen.data.datasets import load_splits
    from neuroimagen.stages import build_stage
    from neuroimagen.training.context import RunContext

    cfg = load_config(things_twin / "config.yaml", ["data.holdout_subject=1", "stages.encoder.embed_dim=8"])
    splits = load_splits(cfg.data, image_mode="none")
    assert len(splits["val"]) < splits["val"].num_classes  # 4 validation trials, 7 labels
    stage = build_stage("encoder", cfg, RunContext(), {"splits": splits})
    metrics = stage.validate()
    assert 0.0 <= metrics["val_kmeans_acc"] <= 1.0 and 0.0 <= metrics["val_knn_acc"] <= 1.0
    assert stage.val_classes == len(set(splits["val"].labels.tolist())) == 4


@pytest.mark.parametrize("layout", ["twin", "things_twin"])
def test_a_stage_that_loads_its_own_data_validates_on_the_training_subjects(layout, request):
    """Ray Train workers and every Ray Tune trial build their stage from the config alone (no splits passed in):
    with data.holdout_subject, its selection metric is measured on the other subjects' validation trials."""
    from neuroimagen.stages import build_stage
    from neuroimagen.training.context import RunContext

    cfg = load_config(request.getfixturevalue(layout) / "config.yaml", ["data.holdout_subject=1", "stages.encoder.embed_dim=8"])
    data = build_stage("encoder", cfg, RunContext(), {}).describe_data()
    assert data["train"]["subjects"] == [2] and data["val"]["subjects"] == [2] and data["val"]["n"] > 0


# ----------------------------------------------------------------------------------------------
# End to end on the tiny embedded twin (eeg-imagenet layout)

FAST = TINY + ["stages.encoder.epochs=1", "stages.saliency.epochs=1", "stages.semantic.epochs=1",
               "eval.suite.bootstrap=50", "eval.suite.bootstrap_whole_set=10", "eval.suite.permutations=100",
               "eval.protocol=loso"]


@pytest.fixture(scope="module")
def loso_run(tmp_path_factory):
    from neuroimagen.runs.loso import run_loso

    out = tmp_path_factory.mktemp("loso") / "run"
    lines: list[str] = []
    res = run_loso(load_config(None, FAST), out, ["L+I"], log=lines.append)
    return out, res, lines


@pytest.mark.slow
def test_loso_writes_one_fold_per_subject_trained_without_it(loso_run):
    out, res, lines = loso_run
    assert res["skipped"] == [] and sorted(res["folds"]) == [1, 2]
    for s in (1, 2):
        fold = out / "loso" / f"sub-{s:02d}"
        assert res["folds"][s] == fold
        assert load_config(fold / "config.yaml").data.holdout_subject == s
        for stage in ("encoder", "saliency", "semantic"):
            data = json.loads((fold / stage / "metrics.json").read_text())["data"]
            assert data["train"]["subjects"] == [3 - s] and data["val"]["subjects"] == [3 - s]
        fold_summary = pd.read_csv(fold / "results" / "summary.csv", dtype={"subject": str})
        assert set(fold_summary["subject"]) == {str(s), "all"}
        assert json.loads((fold / "loso.json").read_text())["variants"] == ["L+I"]
        assert (fold / "report" / "report.md").is_file()
    assert any("fold 2/2: training on subjects [1], testing on subject 2" in ln for ln in lines)
    protocol = json.loads((out / "results" / "loso.json").read_text())
    assert protocol["folds"]["1"]["trained_on_subjects"] == [2]
    assert protocol["pooled_whole_set"].startswith("IS, FID and KID of the pooled LOSO rows")
    from neuroimagen.rundir import kind_of

    assert kind_of(out / "loso" / "sub-01") == "run"
    assert (out / "loso" / "sub-01" / "ldm").resolve() == (out / "ldm").resolve()  # the shared, content-addressed cache


@pytest.mark.slow
def test_summary_loso_has_both_protocols_per_subject_and_pooled(loso_run):
    out, res, _ = loso_run
    table = pd.read_csv(out / "results" / "summary_loso.csv", dtype={"subject": str})
    assert list(table.columns[:3]) == ["protocol", "subject", "variant"]
    assert sorted(zip(table["protocol"], table["subject"])) == sorted(
        (p, s) for p in ("within", "loso") for s in ("1", "2", "all"))
    within = pd.read_csv(out / "results" / "summary.csv", dtype={"subject": str}).set_index("subject")
    loso = table[table["protocol"] == "loso"].set_index("subject")
    for s in ("1", "2"):
        fold = pd.read_csv(out / "loso" / f"sub-0{s}" / "results" / "summary.csv", dtype={"subject": str}).set_index("subject")
        # the held-out subject is scored on the same test trials as within subject, and its row is the fold's own
        assert loso.loc[s, "n_eeg"] == within.loc[s, "n_eeg"] > 0
        for col in ("acc", "ssim", "pixcorr", "ssim_lo", "ssim_hi"):
            assert math.isclose(loso.loc[s, col], fold.loc[s, col], rel_tol=1e-5, abs_tol=1e-6), col
    # pooled LOSO: the mean over every held-out trial (both folds), with an interval around it
    assert loso.loc["all", "n_eeg"] == loso.loc["1", "n_eeg"] + loso.loc["2", "n_eeg"]
    n = loso.loc[["1", "2"], "n"]
    assert math.isclose(loso.loc["all", "ssim"], float((loso.loc[["1", "2"], "ssim"] * n).sum() / n.sum()), rel_tol=1e-5)
    assert loso.loc["all", "ssim_lo"] <= loso.loc["all", "ssim"] <= loso.loc["all", "ssim_hi"]
    pd.testing.assert_frame_equal(res["summary"].reset_index(drop=True), table, check_dtype=False, atol=1e-5)


@pytest.mark.slow
def test_retrieval_rows_carry_their_protocol(loso_run):
    out, _, _ = loso_run
    assert set(pd.read_csv(out / "results" / "retrieval.csv")["protocol"]) == {"within"}
    assert set(pd.read_csv(out / "loso" / "sub-01" / "results" / "retrieval.csv")["protocol"]) == {"loso"}
    table = pd.read_csv(out / "results" / "retrieval_loso.csv", dtype={"subject": str})
    eeg = table[(table["control"] == "eeg") & (table["top"] == 1)]
    for p in ("within", "loso"):
        assert set(eeg[eeg["protocol"] == p]["subject"]) == {"1", "2", "all"}
    loso = eeg[eeg["protocol"] == "loso"]
    for k, g in loso.groupby("k"):
        per = g[g["subject"] != "all"]
        pooled = g[g["subject"] == "all"].iloc[0]
        assert pooled["n_queries"] == per["n_queries"].sum()
        assert math.isclose(pooled["accuracy"], float((per["accuracy"] * per["n_queries"]).sum() / per["n_queries"].sum()),
                            rel_tol=1e-5)


@pytest.mark.slow
def test_report_shows_within_and_loso_side_by_side(loso_run):
    out, _, _ = loso_run
    text = (out / "report" / "report.md").read_text()
    section = text[text.index("## Within subject vs leave-one-subject-out"):]
    header = next(ln for ln in section.splitlines() if ln.startswith("| subject | trials (within / LOSO)"))
    assert "| SSIM within | SSIM LOSO |" in header and "PixCorr within | PixCorr LOSO" in header
    rows = [ln for ln in section.splitlines() if ln.startswith(("| subj 1 ", "| subj 2 ", "| all (pooled) "))]
    assert len(rows) >= 3 and all(ln.count("[") >= 4 for ln in rows[:3])  # every number with its interval
    assert "within vs LOSO" in section


@pytest.mark.slow
def test_rerun_skips_finished_folds_and_the_cli_prints_both_protocols(loso_run, run_cli):
    out, _, _ = loso_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("loso/sub-*/results/summary.csv")}
    shards = {p: p.stat().st_mtime_ns for p in out.glob("results/shards/*/*.parquet")}
    assert len(before) == 2 and shards
    res = run_cli("ablation", "--config", out / "config.yaml", "--out", out, "--variants", "L+I")
    assert res.code == 0, res
    assert "Within subject vs leave-one-subject-out" in res.out and "SSIM LOSO" in res.out
    fold_report = run_cli("report", out / "loso" / "sub-02")  # a fold is a run like any other
    assert fold_report.code == 0, fold_report
    assert {p: p.stat().st_mtime_ns for p in out.glob("loso/sub-*/results/summary.csv")} == before  # not redone
    assert {p: p.stat().st_mtime_ns for p in out.glob("results/shards/*/*.parquet")} == shards  # within shards reused


@pytest.mark.slow
def test_evaluate_refreshes_the_loso_summary_from_the_finished_folds(loso_run, run_cli):
    from neuroimagen.runs.loso import finished_folds

    out, _, _ = loso_run
    assert finished_folds(out) == [1, 2]
    path = out / "results" / "summary_loso.csv"
    before = pd.read_csv(path, dtype={"subject": str})
    path.unlink()
    res = run_cli("evaluate", "--run", out)
    assert res.code == 0, res
    assert "Within subject vs leave-one-subject-out" in res.out and "| subj 2 |" in res.out
    pd.testing.assert_frame_equal(pd.read_csv(path, dtype={"subject": str}), before)


@pytest.mark.slow
def test_a_fold_config_is_one_fold_not_a_new_protocol(loso_run):
    from neuroimagen.runs.loso import run_loso

    out, _, _ = loso_run
    with pytest.raises(ConfigError, match=r"^data\.holdout_subject: 1 is one fold's setting"):
        run_loso(load_config(out / "loso" / "sub-01" / "config.yaml"), out / "x", ["L+I"])


@pytest.mark.slow
def test_loso_on_the_things_layout_is_zero_shot_and_withholds_acc(tmp_path):
    """One fold (subject 2) on a THINGS-EEG2 twin: the held-out subject's test concepts are unseen, ACC is
    withheld in both protocols (the judge cannot cover them), the judge-free numbers and retrieval stand."""
    from neuroimagen.runs.loso import run_loso

    things = ["synth.format=things-eeg", "synth.test_classes=3", "synth.train_repetitions=2",
              "synth.test_repetitions=2", "synth.times=64"]
    out = tmp_path / "run"
    res = run_loso(load_config(None, FAST + things), out, ["L+I"], subjects=[2], log=lambda m: None)
    assert sorted(res["folds"]) == [2] and not (out / "loso" / "sub-01").exists()
    table = res["summary"]
    assert sorted(zip(table["protocol"], table["subject"])) == [("loso", "2"), ("loso", "all"), ("within", "2"),
                                                                ("within", "all")]
    assert table["acc"].isna().all() and table["ssim"].notna().all() and table["pixcorr"].notna().all()
    fold_retrieval = json.loads((out / "loso" / "sub-02" / "results" / "retrieval.json").read_text())
    assert fold_retrieval["zero_shot"] is True and fold_retrieval["gallery"] == 3
    text = (out / "report" / "report.md").read_text()
    section = text[text.index("## Within subject vs leave-one-subject-out"):]
    assert "| subj 2 |" in section and "ACC (%) within" not in section  # withheld, so not a column


@pytest.mark.slow
def test_a_fold_trains_on_ray_train_without_the_held_out_subject(ray_session, twin, tmp_path):
    """Ray Train workers rebuild the config from a dict and load the data themselves: the held-out subject stays
    out of their training and validation splits."""
    from neuroimagen import backends
    from neuroimagen.runs.training import train

    sets = [f"data.eeg={twin / 'eeg_5_95_std.pth'}", f"data.splits={twin / 'block_splits_by_image_all.pth'}",
            f"data.images={twin / 'images'}", "train.backend=ray", "train.progress=false", "train.threads_per_worker=1",
            "stages.encoder.epochs=1", "stages.encoder.embed_dim=8", "data.holdout_subject=2"]
    metrics = train(load_config(None, sets), tmp_path / "fold", ["encoder"], log=lambda m: None,
                    fit=backends.fit_stage)["encoder"]
    assert metrics["data"]["train"]["subjects"] == [1] and metrics["data"]["val"]["subjects"] == [1]
    assert metrics["world_size"] == 1 and 0.0 <= metrics["val_kmeans_acc"] <= 1.0
