"""Zero-shot evaluation on THINGS-EEG2: the judge's classes do not cover the unseen test concepts, so N-way ACC
(and the judge's IS and GT accuracy) are withheld with the reason, while the judge-free metrics stay."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from conftest import TINY_THINGS
from neuroimagen.config import load_config
from neuroimagen.data.datasets import load_splits
from neuroimagen.runs.evaluation import ablation, acc_unavailable, prepare_classifier
from test_determinism import TINY  # every stage, the LDM and the judge at their smallest


def test_the_judge_on_the_things_twin_does_not_cover_its_test_concepts(things_twin, tmp_path):
    cfg = load_config(things_twin / "config.yaml")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, judge_steps=2, judge_width=4),
                              train=dataclasses.replace(cfg.train, progress=False))
    splits = load_splits(cfg.data)
    _, desc = prepare_classifier(cfg, tmp_path, splits, 16, log=lambda m: None)
    K, Kt = TINY_THINGS["classes"], TINY_THINGS["test_classes"]
    assert desc["covered_labels"] == list(range(K)) and desc["coverage"].startswith(f"the labels with training images ({K} of {K + Kt})")
    test_labels = splits["test"].recording.labels[splits["test"].indices]
    why = acc_unavailable(desc, test_labels, "test")
    assert why.startswith(f"not available: the judge is trained on the training images only, and {Kt} of the {Kt} "
                          f"test concepts have none (labels {', '.join(map(str, range(K, K + Kt)))}: zero-shot")
    # validation images are of training concepts: covered
    assert acc_unavailable(desc, splits["val"].recording.labels[splits["val"].indices], "val") is None


@pytest.mark.slow
def test_a_things_twin_run_reports_why_acc_is_absent(tmp_path):
    """End to end on a tiny THINGS twin (local backends, a few steps per stage): the report says why ACC is absent
    and still shows SSIM, PixCorr and two-way identification."""
    extra = ["data.format=things-eeg", "synth.format=things-eeg", "synth.test_classes=3", "synth.test_repetitions=4",
             "synth.train_repetitions=2", "synth.times=50"]
    lines: list[str] = []
    report = ablation(load_config(None, TINY + extra), tmp_path / "run", ["L+I"], log=lines.append).read_text()
    results = tmp_path / "run" / "results"
    protocol = json.loads((results / "protocol.json").read_text())
    summary = pd.read_csv(results / "summary.csv", dtype={"subject": str})
    why = protocol["acc"]["unavailable"]
    assert "the judge is trained on the training images only, and 3 of the 3 test concepts have none" in why
    assert summary["acc"].isna().all() and summary["judge_gt_acc"].isna().all() and summary["is"].isna().all()
    assert summary["ssim"].notna().all() and summary["pixcorr"].notna().all()
    assert summary[[c for c in summary.columns if c.startswith("twoway_") and not c.endswith(("_lo", "_hi", "_chance"))]
                   ].notna().all().all()
    assert f"> **ACC n/a:** {why}" in report
    assert sum("ACC withheld" in m for m in lines) == 1
    # retrieval of the unseen test concepts from stage 3's caption embedding: zero-shot by construction
    retrieval = json.loads((results / "retrieval.json").read_text())
    table = pd.read_csv(results / "retrieval.csv", dtype={"subject": str})
    assert retrieval["zero_shot"] and retrieval["gallery"] == 3 and retrieval["unseen_concepts"] == 3
    pooled = table[table["subject"] == "all"]
    assert set(pooled["control"]) == {"eeg", "shuffled"} and set(pooled["k"]) == {2, 3}
    assert ((pooled["chance"] - pooled["top"] / pooled["k"]).abs() < 1e-6).all() and pooled["accuracy"].between(0, 1).all()
    assert "## Retrieval from stage 3's caption embedding" in report and "zero-shot: no evaluated concept" in report


def test_the_shuffled_retrieval_control_moves_every_trial():
    from neuroimagen.runs.retrieval import _shuffled

    for n in (2, 3, 10, 57):
        p = _shuffled(n, 5)
        assert sorted(p.tolist()) == list(range(n)) and bool((p != torch.arange(n)).all())
    assert _shuffled(10, 5).tolist() == _shuffled(10, 5).tolist()


def test_the_dataset_line_of_a_things_run_names_the_zero_shot_protocol():
    from neuroimagen.runs.evaluation import _dataset_name

    assert _dataset_name({"format": "things-eeg", "eeg": "/r/run/twin"}) == (
        "things-eeg `twin` (synthetic twin), test concepts disjoint from the training ones (zero-shot)")
    assert _dataset_name({"format": "things-eeg", "eeg": "/data/things-eeg2/preprocessed"}).startswith(
        "things-eeg `preprocessed`, test concepts")
    assert _dataset_name({"format": "eeg-imagenet", "eeg": "/d/twin/eeg_5_95_std.pth", "split_file": "/d/s.pth",
                          "split_num": 0}) == "eeg-imagenet `eeg_5_95_std.pth` (synthetic twin), split file `s.pth` #0"


def test_uncovered_labels_and_withhold():
    from neuroimagen.metrics.summary import uncovered_labels, withhold

    assert uncovered_labels([3, 0, 4, 3], [0, 1, 2]) == [3, 4]
    assert uncovered_labels([0, 1], [0, 1, 2]) == [] and uncovered_labels([7], None) == []
    s = pd.DataFrame({"acc": [0.5], "acc_lo": [0.4], "acc_hi": [0.6], "acc_chance": [0.02], "ssim": [0.3],
                      "is": [2.0], "is_std": [0.1]})
    out = withhold(s, ["acc", "is"])
    assert out[["acc", "acc_lo", "acc_hi", "is", "is_std"]].isna().all().all()
    assert out.loc[0, "acc_chance"] == 0.02 and out.loc[0, "ssim"] == 0.3 and s.loc[0, "acc"] == 0.5  # a copy


def test_retrieval_without_a_trained_stage_3_is_one_line(tmp_path, run_cli):
    from conftest import assert_one_line_error
    from neuroimagen.config import Config, write_config

    run = tmp_path / "run"
    run.mkdir()
    write_config(Config(), run)
    (run / "run.json").write_text(json.dumps({"stages": {}}))  # a run with no stage trained yet
    res = run_cli("retrieval", "--run", str(run))
    assert_one_line_error(res, "retrieval needs the trained stage-3 label regressor",
                          f"neuroimagen train --out {run} --stages semantic")
