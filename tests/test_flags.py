"""Variant-level flags of the scoring reduction (neuroimagen.metrics.flags): a collapsed variant, a variant equal
to the other-class control and a healthy one, on synthetic per-image tables; the flag in summary.csv, protocol.json,
the warning line and the report's ablation table."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuroimagen.metrics.flags import (
    COLLAPSED,
    EQUALS_CONTROL,
    FlagRules,
    feature_spread,
    flag_warning,
    mode_share,
    variant_flags,
    whole_set_is,
)
from neuroimagen.runs.reports import ablation_table, flag_marker

C = 4  # classes


def _table(n_trials: int = 16, samples: int = 3, seed: int = 0) -> pd.DataFrame:
    """Four variants on the same trials: ``healthy`` (generations judged as their trial's class, hits, features
    near the ground truth), ``collapsed`` (one probability vector and one feature vector for every image),
    ``other-class`` (the control: another class's look) and ``copy`` (the control's scores plus noise)."""
    g = np.random.default_rng(seed)
    gts = {(s, t): g.normal(size=6) for s in ("1", "2") for t in range(n_trials)}
    constant_probs, constant_feats = list(g.dirichlet(np.ones(C))), list(g.normal(size=6))
    rows = []
    for s in ("1", "2"):
        for t in range(n_trials):
            label = t % C
            other = (label + 1) % C
            for k in range(samples):
                def onehot(c, sharp=8.0):
                    logits = g.normal(size=C) * 0.3
                    logits[c] += sharp
                    p = np.exp(logits - logits.max())
                    return list(p / p.sum())

                base = {"subject": s, "item": t, "sample": k, "label": label, "acc_n": C,
                        "fid_gt": list(gts[(s, t)])}
                ctrl = {"acc_hit": float(g.random() < 0.1), "pixcorr": float(g.normal(0.0, 0.05)),
                        "twoway_judge": float(g.random() < 0.5)}
                rows.append({**base, "variant": "other-class", **ctrl, "probs": onehot(other),
                             "fid_feats": list(g.normal(size=6))})
                rows.append({**base, "variant": "copy", "probs": onehot(other), "fid_feats": list(g.normal(size=6)),
                             **{key: val + (0.0 if key != "pixcorr" else float(g.normal(0, 0.005)))
                                for key, val in ctrl.items()}})
                rows.append({**base, "variant": "healthy", "acc_hit": float(g.random() < 0.8),
                             "pixcorr": float(g.normal(0.4, 0.05)), "twoway_judge": float(g.random() < 0.9),
                             "probs": onehot(label), "fid_feats": list(gts[(s, t)] + g.normal(0, 0.3, size=6))})
                rows.append({**base, "variant": "collapsed", "acc_hit": float(label == 0), "pixcorr": 0.3,
                             "twoway_judge": float(g.random() < 0.5), "probs": constant_probs,
                             "fid_feats": constant_feats})
    return pd.DataFrame(rows)


def _flags(out: pd.DataFrame, variant: str, subject: str = "all") -> str:
    return out[(out.variant == variant) & (out.subject == subject)].iloc[0]["flags"]


def test_measures_match_their_definitions():
    same = np.tile([0.7, 0.2, 0.1], (5, 1))
    assert whole_set_is(same) == pytest.approx(1.0)
    assert whole_set_is(np.eye(3)) == pytest.approx(3.0)  # each image certain of its own class: IS = C
    assert mode_share(np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])) == 0.75
    assert feature_spread(np.ones((4, 3))) == 0.0
    assert feature_spread(np.array([[0.0, 0.0], [2.0, 2.0]])) == pytest.approx(1.0)


def test_identical_probs_fire_collapse_a_copy_of_the_control_fires_equal_a_healthy_variant_fires_none():
    out = variant_flags(_table(), FlagRules(n_perm=2000))
    assert set(out.subject) == {"1", "2", "all"} and len(out) == 4 * 3
    for s in ("1", "2", "all"):
        assert COLLAPSED in _flags(out, "collapsed", s), out
        assert _flags(out, "copy", s) == EQUALS_CONTROL, out
        assert _flags(out, "healthy", s) == "", out
        assert _flags(out, "other-class", s) == ""  # the control is not tested against itself
    ev = out[(out.variant == "collapsed") & (out.subject == "all")].iloc[0]["evidence"]
    assert ev["is_whole"] == pytest.approx(1.0) and ev["mode_share"] == 1.0 and ev["spread_ratio"] == 0.0
    healthy = out[(out.variant == "healthy") & (out.subject == "all")].iloc[0]["evidence"]
    assert healthy["is_whole"] > 2.0 and healthy["spread_ratio"] > 0.5
    assert set(healthy["vs_control"]) == {"acc", "pixcorr", "twoway_judge"}
    assert all(not d["equal"] and d["p_value"] < 0.05 for k, d in healthy["vs_control"].items() if k != "twoway_judge")
    copy = out[(out.variant == "copy") & (out.subject == "all")].iloc[0]["evidence"]["vs_control"]
    assert all(d["equal"] and d["p_value"] > 0.05 and abs(d["diff"]) <= d["tolerance"] for d in copy.values())
    assert copy["acc"]["tolerance"] == pytest.approx(1 / C)  # one chance level of the 4-way ACC


def test_each_collapse_criterion_fires_on_its_own():
    df = _table()
    healthy = df[df.variant == "healthy"].copy()
    one_class = healthy.copy()  # varied distributions, all with the same top-1
    one_class["probs"] = [list(np.r_[0.55 + 0.4 * (i % 2), np.full(C - 1, (0.45 - 0.4 * (i % 2)) / (C - 1))])
                          for i in range(len(one_class))]
    one_class["variant"] = "one-class"
    frozen = healthy.copy()  # well classified, but every generation has the same features
    frozen["fid_feats"] = [[0.5] * 6] * len(frozen)
    frozen["variant"] = "frozen"
    out = variant_flags(pd.concat([healthy, one_class, frozen]), FlagRules(n_perm=500))
    assert _flags(out, "healthy") == ""
    one = out[(out.variant == "one-class") & (out.subject == "all")].iloc[0]["evidence"]
    assert _flags(out, "one-class") == COLLAPSED and one["mode_share"] == 1.0 and one["is_whole"] >= 1.05
    assert _flags(out, "frozen") == COLLAPSED
    assert "vs_control" not in one  # no control in the table: only the collapse measures


def test_thresholds_are_the_rule_the_protocol_states():
    rules = FlagRules(max_is=1.2)
    text = rules.describe()
    for fragment in ("< 1.2", ">= 0.95", "< 0.05 x", "p > 0.05", "ACC 1 x chance (top-1 / N)", "pixcorr 0.1",
                     "twoway_* 0.15", "'other-class'"):
        assert fragment in text, fragment
    assert rules.as_dict()["max_is"] == 1.2 and rules.tolerance("twoway_alexnet2") == 0.15
    assert rules.tolerance("acc_hit", chance=0.125) == 0.125 and rules.tolerance("ssim") is None


def test_warning_names_every_flagged_variant_in_one_line():
    out = variant_flags(_table(), FlagRules(n_perm=500))
    line = flag_warning(out)
    assert "\n" not in line and line.startswith("evaluate: WARNING: flagged variants: ")
    assert "collapsed collapsed (subject 1; subject 2; pooled)" in line
    assert "copy = other-class (subject 1; subject 2; pooled)" in line and "healthy" not in line
    assert flag_warning(out[out.variant == "healthy"]) == ""


def test_the_ablation_table_marks_a_flagged_row_and_explains_it_below():
    summary = pd.DataFrame([
        {"subject": "all", "variant": "I", "acc": 0.5, "acc_max": 0.6, "acc_chance": 0.25, "is": 1.0, "ssim": 0.3,
         "n": 10, "flags": "collapsed; = other-class"},
        {"subject": "all", "variant": "L+I", "acc": 0.6, "acc_max": 0.7, "acc_chance": 0.25, "is": 2.0, "ssim": 0.4,
         "n": 10, "flags": ""},
        {"subject": "1", "variant": "L+I", "acc": 0.6, "acc_max": 0.7, "acc_chance": 0.25, "is": 2.0, "ssim": 0.4,
         "n": 10, "flags": "= other-class"},
    ])
    table = ablation_table(summary, {"flags": {"rule": "THE RULE", "thresholds": {"max_is": 1.05}}})
    row_i = next(line for line in table.splitlines() if line.startswith("| 1 (I)"))
    row_li = next(line for line in table.splitlines() if line.startswith("| 5 (L+I)"))
    assert "⚠ collapsed ⚠ = other-class" in row_i and "⚠" not in row_li
    assert "⚠ Flagged by the scoring reduction" in table and "Per subject: = other-class: L+I (subject 1)." in table
    assert "(judge IS < 1.05)" in table and "results/protocol.json `flags`" in table
    clean = ablation_table(summary.assign(flags=""))
    assert "⚠" not in clean and "Flagged" not in clean
    assert flag_marker(float("nan")) == "" and flag_marker("") == ""


def _scored_run(root: Path) -> Path:
    """A run directory as ``reconstruct`` leaves it, for ``evaluate``: the synthetic table's variants renamed to
    the pipeline's (L+I healthy, I collapsed, L a copy of the control), one shard per (subject, variant)."""
    import json

    from neuroimagen.runs.evaluation import STATE, _shard_name

    names = {"healthy": "L+I", "collapsed": "I", "copy": "L", "other-class": "other-class"}
    df = _table()
    df["variant"] = df["variant"].map(names)
    df = df.assign(ssim=0.3, judge_gt_top1=df["label"], class_name=df["label"].astype(str),
                   image=[f"results/images/{i}.png" for i in range(len(df))], saliency="", gt=str(root / "gt.png"),
                   eeg_item=df["item"], seed=df["sample"])
    df = df.drop(columns=["fid_feats", "fid_gt", "pixcorr", "twoway_judge"])  # the scores of a run without the suite
    run = root / "run"
    fp = "f" * 12
    shards = {}
    for (s, v), sub in df.groupby(["subject", "variant"]):
        path = run / "results" / "shards" / fp / _shard_name(s, v)
        path.parent.mkdir(parents=True, exist_ok=True)
        sub.to_parquet(path, index=False)
        shards[path.name] = len(sub)
    state = {"fingerprint": fp, "variants": list(names.values()), "subjects": ["1", "2"], "shards": shards,
             "ldm": {"kind": "tiny", "identity": "tiny", "strength": 0.75, "guidance_scale": 7.5,
                     "num_inference_steps": 10, "samples_per_eeg": 3},
             "classifier": {"kind": "judge", "identity": "judge"}, "is_network": {},
             "eval": {"top_k": 1, "n_way": C, "trials": 50, "is_splits": 10, "ssim_convention": "dreamdiffusion",
                      "ssim_resolution": None},
             "seed": 0, "data": {"format": "eeg-imagenet", "eeg": "/data/eeg_5_95_std.pth", "split": "test",
                                 "split_file": "/data/block_splits_by_image_all.pth", "split_num": 0},
             "variant_definitions": {v: {"description": v} for v in names.values()}, "resolution": 32}
    (run / STATE).write_text(json.dumps(state))
    return run


def test_evaluate_writes_the_flags_column_the_protocol_and_one_warning(tmp_path, caplog):
    """The whole reduction on a scored run: flags in summary.csv (pooled and per subject, empty for a healthy
    variant), the rule and the evidence in protocol.json, one warning line, the marked row of the ablation table."""
    from neuroimagen.runs.evaluation import evaluate
    from neuroimagen.runs.reports import load_protocol, load_summary, summary_table

    run = _scored_run(tmp_path)
    with caplog.at_level(logging.WARNING):
        evaluate(run, log=lambda m: None)
    raw = pd.read_csv(run / "results" / "summary.csv", dtype={"subject": str}, keep_default_na=False)
    flags = raw.set_index(["subject", "variant"])["flags"]
    for s in ("1", "2", "all"):
        assert COLLAPSED in flags[(s, "I")] and flags[(s, "L")] == EQUALS_CONTROL, flags
        assert flags[(s, "L+I")] == "" and flags[(s, "other-class")] == ""
    assert load_summary(run).set_index(["subject", "variant"]).loc[("all", "L+I"), "flags"] == ""
    warnings = [r.getMessage() for r in caplog.records if "flagged variants" in r.getMessage()]
    assert len(warnings) == 1 and "I collapsed" in warnings[0] and "L = other-class" in warnings[0], warnings
    assert all(r.levelno == logging.WARNING for r in caplog.records if "flagged variants" in r.getMessage())
    protocol = load_protocol(run)
    assert protocol["flags"]["thresholds"]["max_is"] == 1.05 and "p > 0.05" in protocol["flags"]["rule"]
    assert "I (pooled): collapsed" in " ".join(protocol["flags"]["flagged"])
    groups = {(g["subject"], g["variant"]): g for g in protocol["flags"]["groups"]}
    assert groups[("all", "I")]["is_whole"] == pytest.approx(1.0) and groups[("all", "L+I")]["flags"] == ""
    assert groups[("all", "L")]["vs_control"]["acc"]["equal"]
    assert protocol["cards"]["flags"]["rule"] == protocol["flags"]["rule"]
    table = summary_table(run)
    assert "| 1 (I): I ⚠ collapsed" in table and "| 2 (L): L ⚠ = other-class" in table
    assert "| 5 (L+I): L+I |" in table and "⚠ Flagged by the scoring reduction" in table
