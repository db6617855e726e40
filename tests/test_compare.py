"""neuroimagen compare: two runs side by side, numbers whose protocols differ marked."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_one_line_error
from neuroimagen.runs.compare import card_differences, compare_runs, format_comparison, metric_card

PROTOCOL = {
    "data": {"format": "eeg_imagenet", "split": "test", "split_num": 0, "n_trials": 24, "eeg": "/a/eeg.pth"},
    "classifier": {"kind": "judge", "identity": "judge-abc", "path": "/a/run/judge/judge-abc", "num_classes": 6},
    "acc": {"n": 50, "k": 1, "trials": 50, "n_eff": 6},
    "is": {"splits": 1, "network": "judge"},
    "ssim": {"convention": "dreamdiffusion", "resolution": 32},
    "ldm": {"kind": "tiny", "identity": "tiny-ldm-1", "strength": 0.75, "seconds": 12.0},
    "provenance": {"evaluate": {"packages": {"torch": "2.14.1"}, "cpu_capability": "AVX512", "cuda": False}},
}


def make_run(root: Path, acc: float, protocol: dict) -> Path:
    (root / "results").mkdir(parents=True)
    pd.DataFrame([{"subject": "all", "variant": "I", "acc": acc, "is": 2.0, "ssim": 0.3},
                  {"subject": "1", "variant": "I", "acc": acc - 0.1, "is": 1.9, "ssim": 0.31},
                  {"subject": "all", "variant": "L+I", "acc": acc + 0.1, "is": 2.5, "ssim": 0.35}]).to_csv(
        root / "results" / "summary.csv", index=False)
    (root / "results" / "protocol.json").write_text(json.dumps(protocol))
    return root


def variant(protocol: dict, **changes) -> dict:
    out = json.loads(json.dumps(protocol))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        out[section][key] = value
    return out


def test_same_protocol_is_comparable_and_paths_or_timings_do_not_count(tmp_path):
    other = variant(PROTOCOL, data__eeg="/elsewhere/eeg.pth", classifier__path="/b/judge", ldm__seconds=99.0)
    res = compare_runs(make_run(tmp_path / "a", 0.4, PROTOCOL), make_run(tmp_path / "b", 0.5, other))
    assert res["differing"] == {}
    by = {(r["variant"], r["metric"]): r for r in res["rows"]}
    assert set(by) == {("I", "acc"), ("I", "is"), ("I", "ssim"), ("L+I", "acc"), ("L+I", "is"), ("L+I", "ssim")}
    assert by["I", "acc"]["delta"] == pytest.approx(0.1) and by["I", "acc"]["comparable"]


def test_a_changed_protocol_marks_exactly_the_metrics_it_changes(tmp_path):
    other = variant(PROTOCOL, ssim__convention="mindeye", ssim__resolution=425)
    res = compare_runs(make_run(tmp_path / "a", 0.4, PROTOCOL), make_run(tmp_path / "b", 0.4, other))
    assert res["differing"] == {"ssim": ["ssim.convention", "ssim.resolution"]}
    text = format_comparison(res, "a", "b")
    assert "| all | I | ssim ‡ |" in text and "| all | I | acc | 0.4 | 0.4 | 0 |" in text
    assert "- ssim: ssim.convention, ssim.resolution" in text


def test_a_different_classifier_marks_acc_and_is_but_not_ssim(tmp_path):
    other = variant(PROTOCOL, classifier__identity="torchvision:vit_h_14@w.pth")
    res = compare_runs(make_run(tmp_path / "a", 0.4, PROTOCOL), make_run(tmp_path / "b", 0.4, other))
    assert set(res["differing"]) == {"acc", "is"}


def test_written_cards_win_over_derived_ones():
    proto = {**PROTOCOL, "cards": {"acc": {"network": "vit_h_14", "n": 50}}}
    assert metric_card(proto, "acc") == {"network": "vit_h_14", "n": 50}
    assert metric_card(proto, "ssim")["ssim.convention"] == "dreamdiffusion"
    assert card_differences({"a": 1, "b": 2}, {"a": 1, "c": 2}) == ["b", "c"]


def test_per_subject_rows_and_software_differences(tmp_path):
    other = json.loads(json.dumps(PROTOCOL))
    other["provenance"]["evaluate"]["packages"]["torch"] = "2.13.0"
    res = compare_runs(make_run(tmp_path / "a", 0.4, PROTOCOL), make_run(tmp_path / "b", 0.4, other), subjects=None)
    assert {r["subject"] for r in res["rows"]} == {"all", "1"}
    assert res["provenance"] == ["torch 2.14.1 vs 2.13.0"]


def test_cli_compare_prints_and_writes_the_table(tmp_path, run_cli):
    a, b = make_run(tmp_path / "a", 0.4, PROTOCOL), make_run(tmp_path / "b", 0.45, PROTOCOL)
    out = tmp_path / "cmp.md"
    res = run_cli("compare", a, b, "--out", out)
    assert res.code == 0, res
    assert "| all | I | acc | 0.4 | 0.45 | 0.05 |" in res.out and out.read_text() == res.out


def test_cli_compare_a_run_without_results_is_one_line(tmp_path, run_cli):
    a = make_run(tmp_path / "a", 0.4, PROTOCOL)
    (tmp_path / "b").mkdir()
    assert_one_line_error(run_cli("compare", a, tmp_path / "b"), "summary.csv", "not found", "neuroimagen evaluate")


def test_intervals_ride_with_their_metric_and_a_changed_suite_network_marks_only_its_numbers(tmp_path):
    cards = {"pixcorr": {"metric": "PixCorr", "protocol": "MindEye"},
             "twoway_alexnet2": {"metric": "two-way identification", "weights_sha256": "aaa"}}
    proto_a = {**PROTOCOL, "cards": cards}
    proto_b = {**PROTOCOL, "cards": {**cards, "twoway_alexnet2": {**cards["twoway_alexnet2"], "weights_sha256": "bbb"}}}
    for root, proto, shift in ((tmp_path / "a", proto_a, 0.0), (tmp_path / "b", proto_b, 0.02)):
        (root / "results").mkdir(parents=True)
        pd.DataFrame([{"subject": "all", "variant": "I", "acc": 0.3, "pixcorr": 0.3 + shift, "pixcorr_lo": 0.2,
                       "pixcorr_hi": 0.4 + shift, "twoway_alexnet2": 0.7, "twoway_alexnet2_lo": 0.6,
                       "twoway_alexnet2_hi": 0.8}]).to_csv(root / "results" / "summary.csv", index=False)
        (root / "results" / "protocol.json").write_text(json.dumps(proto))
    res = compare_runs(tmp_path / "a", tmp_path / "b")
    by = {r["metric"]: r for r in res["rows"]}
    assert set(by) == {"acc", "pixcorr", "twoway_alexnet2"}  # no *_lo / *_hi rows of their own
    assert by["pixcorr"]["a_ci"] == (0.2, 0.4) and by["pixcorr"]["b_ci"] == pytest.approx((0.2, 0.42))
    assert by["pixcorr"]["comparable"] and not by["twoway_alexnet2"]["comparable"]
    assert res["differing"]["twoway_alexnet2"] == ["weights_sha256"]
    text = format_comparison(res, "a", "b")
    assert "| all | I | pixcorr | 0.3 [0.2, 0.4] | 0.32 [0.2, 0.42] | 0.02 |" in text
    assert "twoway_alexnet2 ‡" in text
