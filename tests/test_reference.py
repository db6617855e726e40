"""The README's results block and the reference it is checked against (runs/reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from neuroimagen.errors import DataError
from neuroimagen.runs.reference import (BEGIN, END, check_against, make_reference, readme_block, save_reference,
                                        update_readme)

PROV = {"packages": {"torch": "2.14.1", "diffusers": "0.42.1"}, "cpu_capability": "AVX512", "cuda": False}


def make_run(root: Path, acc_i: float = 0.40, torch_version: str = "2.14.1") -> Path:
    (root / "results").mkdir(parents=True)
    rows = []
    for s in ("1", "2", "all"):
        for v, acc in (("I", acc_i), ("L+I", 0.45)):
            rows.append({"subject": s, "variant": v, "n": 72, "n_eeg": 24, "acc": acc, "acc_max": acc + 0.1,
                         "acc_chance": 1 / 6, "is": 1.5, "ssim": 0.3, "judge_gt_acc": 1.0})
    pd.DataFrame(rows).to_csv(root / "results" / "summary.csv", index=False)
    prov = json.loads(json.dumps(PROV))
    prov["packages"]["torch"] = torch_version
    protocol = {"data": {"dataset": "eeg_imagenet `eeg.pth` (synthetic twin)", "subjects": ["1", "2"], "n_trials": 24,
                         "split": "test"},
                "classifier": {"kind": "judge", "identity": "judge-x", "gt_accuracy": 1.0},
                "acc": {"n": 50, "n_eff": 6, "k": 1, "trials": 50}, "is": {"splits": 1},
                "ssim": {"convention": "dreamdiffusion", "resolution": 32},
                "ldm": {"kind": "tiny", "resolution": 32, "samples_per_eeg": 3},
                "provenance": {"evaluate": prov}}
    (root / "results" / "protocol.json").write_text(json.dumps(protocol))
    return root


def test_reference_records_pooled_numbers_block_and_provenance(tmp_path):
    ref = make_reference(make_run(tmp_path / "a"), "neuroimagen demo --quick")
    assert ref["pooled"]["I"]["acc"] == pytest.approx(0.40) and ref["pooled"]["L+I"]["ssim"] == pytest.approx(0.3)
    assert ref["provenance"] == PROV
    assert "What `neuroimagen demo --quick` reports" in ref["block"] and "| variant | ACC (%)" in ref["block"]
    assert "top-1 on the ground-truth test images: 100.0 %" in ref["block"]


def test_a_run_within_tolerance_matches(tmp_path):
    ref = make_reference(make_run(tmp_path / "a"), "demo")
    assert check_against(make_run(tmp_path / "b", acc_i=0.45), ref) == []


def test_a_mismatch_names_the_number_and_the_versions_that_differ(tmp_path):
    ref = make_reference(make_run(tmp_path / "a"), "demo")
    lines = check_against(make_run(tmp_path / "b", acc_i=0.6, torch_version="2.13.0"), ref)
    assert lines[0] == "I acc: 0.6, reference 0.4 (tolerance ±0.1)"
    assert lines[-1] == "differs from the reference's environment in: torch 2.14.1 vs 2.13.0"


def test_update_readme_rewrites_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    assert update_readme(readme, "new table\n")
    assert readme.read_text() == f"# title\n\nbefore\n{BEGIN}\nnew table\n{END}\nafter\n"
    assert readme_block(readme) == "new table"
    assert not update_readme(readme, "new table")  # unchanged: not rewritten
    readme.write_text("no markers\n")
    with pytest.raises(DataError, match="no '<!-- results:begin -->'"):
        update_readme(readme, "x")


def test_cli_report_writes_reference_and_readme(tmp_path, run_cli, monkeypatch):
    import neuroimagen.runs.reports as reports

    from neuroimagen.rundir import mark

    run = make_run(tmp_path / "a")
    mark(run, "run", "neuroimagen test")
    monkeypatch.setattr(reports, "write_report", lambda r: Path(r) / "report" / "report.md")  # figures need a real run
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    res = run_cli("report", run, "--reference", tmp_path / "ref.json", "--readme", readme)
    assert res.code == 0, res
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert readme_block(readme) == ref["block"].strip()
    assert save_reference(ref, tmp_path / "again.json").read_text() == (tmp_path / "ref.json").read_text()
