"""Sweeps: space files validated strictly before anything starts; ASHA sweeps of the GAN weights and the
triplet margin on 2 CPUs; the best config retrained by `neuroimagen train` reproduces its validation metric."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import REPO, assert_one_line_error
from neuroimagen.config import load_config
from neuroimagen.errors import ConfigError
from neuroimagen.runs.sweeps import load_space

GAN = {
    "base": str(REPO / "configs" / "quick.yaml"), "stage": "saliency", "metric": "val_condition_gain", "mode": "max",
    "params": {"stages.saliency.alpha1": {"loguniform": [1.0e-3, 1.0]},
               "stages.saliency.alpha2": {"loguniform": [1.0e-2, 1.0]},
               "stages.saliency.alpha3": {"uniform": [0.25, 2.0]}},
    "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
    "search": {"type": "random", "seed": 0}, "num_samples": 8, "max_concurrent_trials": 2,
    "resources_per_trial": {"cpu": 1}, "trainer": "local",
    "set": ["stages.saliency.epochs=8", "stages.encoder.epochs=6", "train.backend=local", "train.progress=false"],
}


def _write(tmp_path, doc, name="space.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize("change, fragment", [
    ({"params": {"stages.saliency.alpha9": {"uniform": [0, 1]}}}, "stages.saliency.alpha9: unknown key"),
    ({"params": {"stages.saliency.alpha1": {"gaussian": [0, 1]}}}, "unknown distribution 'gaussian'"),
    ({"params": {"stages.saliency.alpha1": {"loguniform": [0, 1]}}}, "loguniform: expected low > 0"),
    ({"params": {"stages.saliency.alpha1": {"uniform": [-1, 1]}}}, "uniform value -1 is not valid"),
    ({"params": {"stages.encoder.mining": {"choice": ["semi_hard", "hardest"]}}}, "choice value 'hardest' is not valid"),
    ({"metric": "test_ssim"}, "validation data only"),
    ({"stage": "decoder"}, "unknown stage 'decoder'"),
    ({"search": {"type": "optuna"}}, "needs the optuna package"),
    ({"schedular": {"type": "asha"}}, "schedular: unknown key (did you mean 'scheduler'?)"),
    ({"num_samples": 0}, "num_samples: expected an integer >= 1"),
    ({"set": ["stages.saliency.epochs=-3"]}, "base config: --set stages.saliency.epochs=-3"),
])
def test_space_files_are_validated_before_anything_starts(tmp_path, change, fragment):
    doc = {**GAN, **change}
    with pytest.raises(ConfigError) as exc:
        load_space(_write(tmp_path, doc))
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_shipped_spaces_sweep_what_the_paper_leaves_open():
    gan, _ = load_space(REPO / "tune_spaces" / "gan.yaml")
    assert {"stages.saliency.alpha1", "stages.saliency.alpha2", "stages.saliency.alpha3"} <= set(gan.params)
    # SSIM alone would drive alpha1 (mode seeking) and alpha2 (adversarial) to their minimum
    assert (gan.metric, gan.mode) == ("val_objective", "max")
    enc, _ = load_space(REPO / "tune_spaces" / "encoder.yaml")
    assert "stages.encoder.margin" in enc.params and enc.metric.startswith("val_")
    sem, _ = load_space(REPO / "tune_spaces" / "semantic.yaml")
    # the training objective's own scale (standardised MSE), not raw MSE that CLIP-L's huge channels dominate
    assert (sem.metric, sem.mode) == ("val_std_mse", "min")


def test_cli_errors_are_one_line(tmp_path, run_cli):
    assert_one_line_error(run_cli("tune"), "--space: required")
    assert_one_line_error(run_cli("tune", "--resume", tmp_path), "no sweep there")
    bad = _write(tmp_path, {**GAN, "params": {"stages.nope": {"uniform": [0, 1]}}})
    assert_one_line_error(run_cli("tune", "--space", bad), "stages.nope: unknown key")


def _check_sweep(out, n, metric):
    results = pd.read_parquet(out / "results.parquet")  # full precision; results.csv keeps 6 significant digits
    assert len(pd.read_csv(out / "results.csv")) == len(results)
    best = json.loads((out / "best.json").read_text())
    assert len(results) == n and (results["error"].isna() | (results["error"] == "")).all()
    assert results["stopped_early"].sum() >= 1, results  # ASHA stopped weak trials before the last epoch
    assert (out / "trials.png").is_file() and (out / "results.parquet").is_file()
    assert best["best_value"] == pytest.approx(results[f"best_{metric}"].max())
    return results, best


@pytest.mark.slow
def test_gan_sweep_with_asha_and_the_best_config_reproduces(tmp_path, ray_session):
    from neuroimagen.backends import fit_stage
    from neuroimagen.distributed.tune import run_sweep
    from neuroimagen.backends import train

    space, cfg = load_space(_write(tmp_path, GAN))
    out = tmp_path / "sweep"
    res = run_sweep(space, cfg, out, log=lambda m: None, fit=fit_stage)
    results, best = _check_sweep(out, 8, "val_condition_gain")
    assert results["epochs_run"].max() == 8 and results["epochs_run"].min() < 8
    best_cfg = load_config(out / "best.yaml")  # what `neuroimagen train --config best.yaml` reads
    assert best_cfg.stages.saliency.alpha3 == pytest.approx(best["best_params"]["stages.saliency.alpha3"])
    metrics = train(best_cfg, tmp_path / "retrain", ["encoder", "saliency"], log=lambda m: None)
    # the retrain exports the epoch its selection metric (the sweep's metric) picks: the sweep's best value again
    assert metrics["saliency"]["val_condition_gain"] == pytest.approx(best["best_value"], abs=0.02)
    assert res["best_config"] == out / "best.yaml"


@pytest.mark.slow
def test_triplet_margin_sweep_each_trial_fits_its_own_torch_trainer(tmp_path, ray_session, run_cli):
    from neuroimagen.backends import train

    doc = {**GAN, "stage": "encoder", "metric": "val_knn_acc",
           "params": {"stages.encoder.margin": {"uniform": [0.05, 1.0]},
                      "stages.encoder.mining": {"choice": ["batch_all", "semi_hard", "batch_hard"]}},
           "trainer": "ray", "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
           "set": ["stages.encoder.epochs=6", "train.progress=false"]}
    out = tmp_path / "sweep"
    res = run_cli("tune", "--space", _write(tmp_path, doc), "--out", out)
    assert res.code == 0, res
    results, best = _check_sweep(out, 8, "val_knn_acc")
    assert "best config:" in res.out and "stopped early" in res.out
    trial_dirs = list((out / "trials").iterdir())
    assert trial_dirs and any((d / "ray").is_dir() for d in trial_dirs)  # each trial's own Ray Train storage
    best_cfg = load_config(out / "best.yaml")
    metrics = train(best_cfg, tmp_path / "retrain", ["encoder"], log=lambda m: None)
    assert metrics["encoder"]["val_knn_acc"] == pytest.approx(best["best_value"], abs=0.05)
    # an existing sweep is never overwritten silently
    assert_one_line_error(run_cli("tune", "--space", _write(tmp_path, doc), "--out", out), "--resume")


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_with_the_same_trial_set(tmp_path, ray_session):
    """`neuroimagen tune` killed (SIGKILL) after its first finished trial; `--resume` finishes the same trials."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from neuroimagen.backends import fit_stage
    from neuroimagen.distributed.tune import run_sweep

    doc = {**GAN, "stage": "encoder", "metric": "val_knn_acc", "num_samples": 4, "max_concurrent_trials": 1,
           "params": {"stages.encoder.margin": {"uniform": [0.05, 1.0]}}, "scheduler": {"type": "fifo"},
           "set": ["stages.encoder.epochs=4", "train.backend=local", "train.progress=false"]}
    space_path = _write(tmp_path, doc)
    out = tmp_path / "sweep"
    address = ray_session.get_runtime_context().gcs_address  # the driver dies; the cluster (and its logs) stay
    proc = subprocess.Popen([sys.executable, "-m", "neuroimagen.cli", "tune", "--space", str(space_path), "--out",
                             str(out), "--set", f"train.ray_address={address}"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((out / "trials").glob("*/encoder/metrics.json")):
        assert time.time() < deadline and proc.poll() is None, "no trial finished"
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.csv").exists()  # it really was interrupted
    space, cfg = load_space(space_path, extra_sets=[f"train.ray_address={address}"])
    res = run_sweep(space, cfg, out, resume=True, log=lambda m: None, fit=fit_stage)
    results = res["results"]
    assert len(results) == 4 and results["trial_id"].is_unique
    assert (results["error"].isna() | (results["error"] == "")).all() and (results["epochs_run"] == 4).all()
