"""The quick defaults carry signal on every member of the twin family, not only on the twin they were first
written for: `demo --quick --member NAME` with nothing else changed (the default member, sources-objects, is the
quick demo that `demo_run` runs and tests/test_demo.py checks).

Per member (slow: a quick demo each, 3-6 minutes on two shared cores): every stage learned and no guard fired,
G's images depend on the EEG, and the I and L+I reconstructions reach 1.5x chance ACC, above the other-class
control and with no flag in the summary table.
"""

from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import pytest

from neuroimagen.data.synthetic import TWIN_FAMILY

SETS = ["train.backend=local", "eval.backend=local", "train.progress=false", "eval.variants=[I,L+I,other-class]"]
MEMBERS = [m for m in TWIN_FAMILY if m != "sources-objects"]


@pytest.fixture(scope="module", params=MEMBERS)
def member_run(request, tmp_path_factory):
    from neuroimagen.config import load_config
    from neuroimagen.runs.demo import run_demo

    out = tmp_path_factory.mktemp(request.param) / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        run_demo(load_config(None, SETS), str(out), quick=True, user_overrides=SETS, member=request.param)
    return request.param, out


def _pooled(run) -> pd.DataFrame:
    d = pd.read_csv(run / "results" / "summary.csv")
    d = d[d["subject"].astype(str) == "all"].set_index("variant")
    d["flags"] = d["flags"].astype("string").fillna("")
    return d


@pytest.mark.slow
def test_every_stage_learns_and_no_guard_fires(member_run):
    member, run = member_run
    for stage in ("encoder", "saliency", "semantic"):
        m = json.loads((run / stage / "metrics.json").read_text())
        assert m["guards"]["fired"] == [], (member, stage, m["guards"])
        learned = m["guards"]["did_not_learn"]
        assert learned["gain"] > 0 and learned["best_epoch"] > 0, (member, stage, learned)
    sal = json.loads((run / "saliency" / "metrics.json").read_text())["guards"]["collapsed"]
    assert sal["condition_gain"] > sal["tolerance"], (member, sal)  # G's images depend on the EEG
    sem = json.loads((run / "semantic" / "metrics.json").read_text())
    assert sem["val_nearest_class_acc"] > sem["val_nearest_class_shuffled"], (member, sem)


@pytest.mark.slow
def test_reconstructions_carry_the_class_on_every_member(member_run):
    member, run = member_run
    d = _pooled(run)
    chance = float(d.loc["I", "acc_chance"])
    assert chance == pytest.approx(1 / TWIN_FAMILY[member].get("classes", 6), abs=1e-6)  # summary.csv keeps 6 digits
    for v in ("I", "L+I"):
        acc = float(d.loc[v, "acc"])
        assert acc >= 1.5 * chance, (member, v, acc, chance)
        assert acc > float(d.loc["other-class", "acc"]), (member, v, d["acc"].to_dict())
        assert d.loc[v, "flags"] == "", (member, v, d.loc[v, "flags"])
