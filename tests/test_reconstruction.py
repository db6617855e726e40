"""Reconstruction and scoring: rows, the three batch callables without Ray, resumable shards, the Ray Data
pipeline against the plain loop, and the commands."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_one_line_error
from neuroimagen.config import load_config, override, to_dict
from neuroimagen.data.datasets import load_recording

pytestmark = pytest.mark.slow

KEY = ["subject", "variant", "item", "sample"]


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("report", "images"))
    return dst


def _shards(run):
    state = json.loads((run / "results" / "state.json").read_text())
    return run / "results" / "shards" / state["fingerprint"], state


def _same_results(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a, b = a.sort_values(KEY).reset_index(drop=True), b.sort_values(KEY).reset_index(drop=True)
    cols = KEY + ["seed_z", "seed_noise", "seed_nway", "judge_gt_top1"]
    assert a[cols].equals(b[cols])
    np.testing.assert_allclose(a["ssim"], b["ssim"], atol=2e-4)
    np.testing.assert_allclose(np.stack(a["probs"]), np.stack(b["probs"]), atol=2e-3)


def test_rows_pair_variants_and_pick_other_class_trials(demo_run):
    from neuroimagen.reconstruction.rows import build_rows

    run, _, _ = demo_run
    cfg = load_config(run / "config.yaml")
    rec = load_recording(cfg.data, check_images=False)
    rows = build_rows(cfg, rec, ["L+I", "other-class"], subjects=[2])
    assert len(rows) == 2 * 12 * 3 and {r["subject"] for r in rows} == {"2"}
    by = {(r["variant"], r["item"], r["sample"]): r for r in rows}
    for (v, item, k), r in by.items():
        for c in ("seed_z", "seed_noise", "seed_nway"):  # every variant of (trial, sample) starts from the same noise
            assert r[c] == by[("L+I", item, k)][c]
        assert r["seed_z"] == by[(v, item, 0)]["seed_z"]  # and every sample of a trial from the same saliency z
        if v == "other-class":
            assert rec.labels[r["eeg_item"]] != rec.labels[item] and rec.subjects[r["eeg_item"]] == 2
        else:
            assert r["eeg_item"] == item
        v_def = cfg.eval.variant(v)  # the variant is resolved into the row once
        assert (r["init_kind"], r["semantics"], r["eeg_source"]) == (v_def.init, v_def.semantics, v_def.eeg)
    assert len({r["seed_noise"] for r in rows if r["variant"] == "L+I"}) == 36
    assert len({r["seed_z"] for r in rows if r["variant"] == "L+I"}) == 12
    from neuroimagen.errors import ConfigError

    with pytest.raises(ConfigError, match="subject 9 has no trials"):
        build_rows(cfg, rec, ["I"], subjects=[9])


def test_the_callables_run_without_ray(demo_run):
    from neuroimagen.reconstruction.factory import (ReconstructFromRun, RunSources, load_decode, load_generate,
                                                    load_score, stage_models)
    from neuroimagen.reconstruction.rows import build_rows, needed_stages, rows_to_batch
    from neuroimagen.runs.training import read_run

    run, _, _ = demo_run
    cfg = load_config(run / "config.yaml")
    _, state = _shards(run)
    variants = ["I", "L", "oracle"]
    src = RunSources(run_dir=str(run), snapshot=state["ldm"]["path"], classifier=state["classifier"]["spec"],
                     models=stage_models(run, read_run(run), needed_stages(cfg, variants)), write_images=False)
    decode = load_decode(cfg, src)
    rows = build_rows(cfg, load_recording(cfg.data, check_images=False), variants, subjects=[1])
    rows = [r for r in rows if r["sample"] == 0 and r["item"] == rows[0]["item"]]  # one trial, three variants
    batch = decode(rows_to_batch(rows))
    assert batch["init"].shape == (3, 3, 32, 32) and batch["prompt"].shape[0] == 3
    kinds = dict(zip(batch["variant"], batch["init_kind"]))
    assert kinds == {"I": "saliency", "L": "noise", "oracle": "gt"}
    i_row = list(batch["variant"]).index("I")
    assert np.allclose(batch["prompt"][i_row], decode.empty.numpy())  # variant I: the empty caption
    assert np.all(batch["init"][list(batch["variant"]).index("L")] == 0)
    out = load_generate(cfg, src)(batch)
    assert out["image"].shape == (3, 3, 32, 32) and "prompt" not in out
    scored = load_score(cfg, src)(out)
    assert scored["probs"].shape == (3, 6) and np.allclose(scored["probs"].sum(1), 1, atol=1e-5)
    assert ((scored["acc_hit"] >= 0) & (scored["acc_hit"] <= 1)).all() and (scored["acc_n"] == 6).all()
    per = pd.read_parquet(run / "results" / "per_sample.parquet")
    ref = per.set_index(KEY).loc[[("1", v, int(i), 0) for v, i in zip(scored["variant"], scored["item"])]]
    np.testing.assert_allclose(scored["ssim"], ref["ssim"], atol=2e-4)  # same numbers as the demo's batches
    # the fused Ray Data stage (and the local loop) is the same three callables in one Ray-free class, built
    # from the config as the driver serialises it
    fused = ReconstructFromRun(to_dict(cfg), src.to_dict())(rows_to_batch(rows))
    np.testing.assert_allclose(fused["ssim"], scored["ssim"], atol=1e-6)
    assert list(fused["acc_hit"]) == list(scored["acc_hit"])


def test_rerun_reuses_finished_shards_and_recomputes_missing_or_damaged_ones(demo_run, tmp_path):
    from neuroimagen.runs.evaluation import evaluate, reconstruct

    run = _copy(demo_run[0], tmp_path)
    before = pd.read_parquet(run / "results" / "per_sample.parquet")
    shard_dir, state = _shards(run)
    (shard_dir / "s1__L+I.parquet").unlink()
    (shard_dir / "s2__B.parquet").write_bytes((shard_dir / "s2__B.parquet").read_bytes()[:100])  # truncated
    cfg = load_config(run / "config.yaml", ["train.progress=false"])
    logs = []
    info = reconstruct(cfg, run, log=logs.append)
    assert info["computed"] == 2 * 12 * 3 and info["reused"] == 12, logs
    assert "tiny LDM: reusing" in " ".join(logs) and "judge classifier: reusing" in " ".join(logs)
    evaluate(run, log=lambda m: None)
    _same_results(pd.read_parquet(run / "results" / "per_sample.parquet"), before)
    # nothing left to do: a third run computes nothing
    assert reconstruct(cfg, run, log=lambda m: None)["computed"] == 0


def test_changed_settings_never_reuse_old_shards(demo_run, tmp_path):
    from neuroimagen.runs.evaluation import reconstruct

    run = _copy(demo_run[0], tmp_path)
    cfg = override(load_config(run / "config.yaml"), ["train.progress=false", "eval.trials=7"])
    info = reconstruct(cfg, run, variants=["other-class"], subjects=[1], log=lambda m: None)
    assert info["computed"] == 36 and info["reused"] == 0


def test_shards_drawn_with_another_seed_derivation_are_never_reused(monkeypatch):
    from neuroimagen.config import Config
    from neuroimagen.runs import evaluation

    def fp():
        return evaluation.fingerprint(Config(), {"stages": {}}, "ldm", "classifier", [])

    now = fp()
    monkeypatch.setattr(evaluation, "SEEDING", "one row seed (seed, trial, sample) for z, noise and distractors")
    assert fp() != now


@pytest.mark.parametrize("pipeline", ["fused", "staged"])
def test_ray_data_pipeline_matches_the_plain_loop(demo_run, tmp_path, ray_session, pipeline):
    from neuroimagen.backends import reconstruct
    from neuroimagen.runs.evaluation import evaluate

    run = _copy(demo_run[0], tmp_path)
    before = pd.read_parquet(run / "results" / "per_sample.parquet")
    shard_dir, _ = _shards(run)
    for name in ("s1__I.parquet", "s2__L+I.parquet", "s1__B.parquet"):
        (shard_dir / name).unlink()
    cfg = override(load_config(run / "config.yaml"), ["train.progress=false", "eval.backend=ray", "eval.batch_size=12",
                                                        f"eval.pipeline={pipeline}"])
    info = reconstruct(cfg, run, log=lambda m: None)
    assert info["computed"] == 3 * 36 and info["reused"] == 11
    evaluate(run, log=lambda m: None)
    after = pd.read_parquet(run / "results" / "per_sample.parquet")
    assert len(after) == len(before) and not after.duplicated(KEY).any()
    _same_results(after, before)
    assert (run / after.loc[after["variant"] == "I", "image"].iloc[0]).is_file()  # PNGs written by the Score actor


def test_summary_reduces_is_once_per_group(demo_run):
    from neuroimagen.metrics.inception_score import inception_score, is_split_count

    run, _, _ = demo_run
    per = pd.read_parquet(run / "results" / "per_sample.parquet")
    s = pd.read_csv(run / "results" / "summary.csv", dtype={"subject": str}).set_index(["subject", "variant"])
    g = per[(per["subject"] == "2") & (per["variant"] == "L+I")].sort_values(["item", "sample"])
    splits = is_split_count(len(g), load_config(run / "config.yaml").eval.is_splits)
    is_mean, _ = inception_score(torch.tensor(np.stack(g["probs"]), dtype=torch.float64), splits=splits,
                                 generator=torch.Generator().manual_seed(load_config(run / "config.yaml").seed))
    assert s.loc[("2", "L+I"), "is"] == pytest.approx(is_mean, rel=1e-5)
    assert s.loc[("2", "L+I"), "is_splits"] == splits and s.loc[("2", "L+I"), "is_n"] == len(g)
    acc_max = g.groupby("item")["acc_hit"].max().mean()
    assert s.loc[("2", "L+I"), "acc_max"] == pytest.approx(acc_max, rel=1e-5)
    pooled = per[per["variant"] == "L+I"]
    assert s.loc[("all", "L+I"), "acc"] == pytest.approx(pooled["acc_hit"].mean(), rel=1e-5)
    assert s.loc[("all", "L+I"), "n"] == len(pooled) == 72


def test_commands(demo_run, tmp_path, run_cli):
    run = _copy(demo_run[0], tmp_path)
    res = run_cli("evaluate", "--run", run)
    assert res.code == 0 and "| 5 (L+I)" in res.out
    res = run_cli("report", str(run))
    assert res.code == 0 and (run / "report" / "report.md").is_file()
    assert_one_line_error(run_cli("reconstruct", "--run", tmp_path / "nothing"), "not a run directory")
    assert_one_line_error(run_cli("reconstruct", "--run", run, "--variants", "L+I,XL"), "unknown variant 'XL'")
    assert_one_line_error(run_cli("reconstruct", "--run", run, "--subjects", "1,x"), "--subjects")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert_one_line_error(run_cli("evaluate", "--run", fresh), "state.json: not found")
    assert_one_line_error(run_cli("report", str(fresh)), "not found")


def test_a_run_without_per_image_captions_computes_the_default_variants_it_can(demo_run, tmp_path):
    """No semantic_image stage (real EEG-ImageNet ships no captions): the default list skips B and B+I in one line
    and computes the rest; asking for B by name stays an error naming the stage."""
    from neuroimagen.errors import ConfigError
    from neuroimagen.runs.evaluation import reconstruct

    run = _copy(demo_run[0], tmp_path)
    record = json.loads((run / "run.json").read_text())
    del record["stages"]["semantic_image"]
    (run / "run.json").write_text(json.dumps(record))
    # without per-image captions the tiny LDM's key changes (it is trained on the label captions only): a few
    # steps suffice here, where only which variants are computed is checked
    cfg = override(load_config(run / "config.yaml"), ["train.progress=false", "data.captions=null",
                                                      'eval.variants=["I", "B", "B+I"]', "ldm.vae_steps=10",
                                                      "ldm.unet_steps=10"])
    logs = []
    info = reconstruct(cfg, run, subjects=[1], log=logs.append)
    assert info["state"]["variants"] == ["I"] and info["rows"] == 12 * 3
    skip = [m for m in logs if "skipping" in m]
    assert skip == ["reconstruct: skipping variant(s) B, B+I: they need stage(s) semantic_image, not trained "
                    "(data.captions is not set); computing I"], logs
    with pytest.raises(ConfigError, match=r"variant\(s\) B need trained stage\(s\) semantic_image"):
        reconstruct(cfg, run, variants=["I", "B"], subjects=[1], log=lambda m: None)
