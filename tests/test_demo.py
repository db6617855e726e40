"""The demo on the embedded default: runs, writes the report, and its numbers make sense."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_demo(tmp_path, run_cli):
    out = tmp_path / "demo"
    res = run_cli("demo", "--quick", "--out", out, "--set", "train.backend=local")
    assert res.code == 0, res
    for name in ("report.md", "config.yaml", "inspect.json", "probe.json", "stimuli.png"):
        assert (out / name).is_file(), name
    probe = json.loads((out / "probe.json").read_text())
    assert probe["test"]["accuracy"] >= 2 * probe["test"]["chance"]
    assert probe["test_shuffled"]["accuracy"] < probe["test"]["accuracy"]
    report = (out / "report.md").read_text()
    assert "Protocol:" in report and "| test |" in report
    assert "Look at:" in res.out
    assert "| encoder | val_knn_acc |" in report and "| saliency | val_ssim |" in report
    for stage in ("encoder", "saliency", "semantic"):
        assert (out / stage / "metrics.json").is_file() and (out / stage / "curves.png").is_file()
    # a second run into the same folder needs --overwrite
    res = run_cli("demo", "--quick", "--out", out)
    assert res.code == 2 and "--overwrite" in res.err
