"""Experiment tracking: every stage writes TensorBoard event files (one value per epoch and tag, the untrained model
as step 0, the saliency GAN's sample grid), resumed runs append, the key turns it off, a missing writer library is
one line; sweeps pass Ray Tune's own logger callbacks (TensorBoard, MLflow when installed)."""

from __future__ import annotations

import dataclasses

import pytest

from neuroimagen.config import load_config


def _sets(twin, epochs=3):
    return ["train.backend=local", "train.progress=false", f"data.eeg={twin / 'eeg_5_95_std.pth'}",
            f"data.splits={twin / 'block_splits_by_image_all.pth'}", f"data.images={twin / 'images'}",
            "stages.encoder.embed_dim=16", "stages.encoder.classes_per_batch=3", "stages.encoder.samples_per_class=3",
            f"stages.encoder.epochs={epochs}"]


def test_tags_follow_the_metric_keys():
    from neuroimagen.training.tracking import tag

    assert [tag(k) for k in ("train_triplet", "val_knn_acc", "epoch_seconds")] == \
        ["train/triplet", "val/knn_acc", "time/epoch_seconds"]


def test_what_a_tracker_wrote_survives_a_kill(tmp_path):
    """A process killed right after an epoch (SIGKILL: no close, no exit handlers) has that epoch on disk: the resumed
    run starts after that epoch's checkpoint and never writes it again."""
    import os

    from neuroimagen.training.tracking import EventWriter, read_events

    pid = os.fork()
    if pid == 0:  # the child: track two epochs, then die at once
        try:
            w = EventWriter(tmp_path / "tb")
            w.scalars({"epoch": 0, "train_loss": 0.5, "val_acc": 0.25}, 1)
            w.images({"saliency/samples": __import__("torch").ones(3, 4, 6)}, 1)
            w.scalars({"epoch": 1, "train_loss": 0.25}, 2)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    ev = read_events(tmp_path / "tb")
    assert ev["scalars"] == {"train/loss": [(1, 0.5), (2, 0.25)], "val/acc": [(1, 0.25)]}
    assert ev["images"] == {"saliency/samples": [(1, 4, 6)]}


def test_a_stage_writes_one_value_per_epoch_and_a_resumed_run_appends(tmp_path, twin):
    from neuroimagen.backends import train
    from neuroimagen.training.tracking import read_events

    lines = []
    train(load_config(None, _sets(twin, 2)), tmp_path / "r", ["encoder"], log=lines.append)
    logdir = tmp_path / "r" / "tensorboard" / "encoder"
    assert f"TensorBoard: tensorboard --logdir {tmp_path / 'r' / 'tensorboard'}" in lines
    ev = read_events(logdir)["scalars"]
    assert {"train/triplet", "train/active", "val/knn_acc", "val/kmeans_acc", "time/epoch_seconds"} <= set(ev)
    assert [s for s, _ in ev["train/triplet"]] == [1, 2]
    assert [s for s, _ in ev["val/knn_acc"]] == [0, 1, 2]  # step 0: the untrained model
    # the values are the history's, epoch by epoch
    import json

    hist = json.loads((tmp_path / "r" / "encoder" / "history.json").read_text())
    assert [v for _, v in ev["train/triplet"]] == pytest.approx([h["train_triplet"] for h in hist], rel=1e-6)
    # resume to 4 epochs: a second event file holds epochs 3 and 4 only, never the first two again
    train(load_config(None, _sets(twin, 4)), tmp_path / "r", ["encoder"], log=lambda m: None)
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2
    ev = read_events(logdir)["scalars"]
    assert [s for s, _ in ev["train/triplet"]] == [1, 2, 3, 4]
    assert [s for s, _ in ev["val/knn_acc"]] == [0, 1, 2, 3, 4]


def test_disabled_tracking_writes_no_event_file(tmp_path, twin):
    from neuroimagen.backends import train

    lines = []
    train(load_config(None, _sets(twin, 1) + ["train.tensorboard=false"]), tmp_path / "r", ["encoder"], log=lines.append)
    assert not (tmp_path / "r" / "tensorboard").exists()
    assert not any("TensorBoard" in ln for ln in lines)
    assert (tmp_path / "r" / "encoder" / "metrics.json").is_file()


def test_without_tensorboardx_a_run_trains_and_says_so_once(tmp_path, twin, monkeypatch):
    from neuroimagen.backends import train
    from neuroimagen.training import tracking

    monkeypatch.setattr(tracking, "EventsWriter", None)
    monkeypatch.setattr(tracking, "_said_missing", False)
    lines = []
    train(load_config(None, _sets(twin, 1)), tmp_path / "r", ["encoder"], log=lines.append)
    said = [ln for ln in lines if "tensorboardX is not installed" in ln]
    assert said == [tracking.MISSING]
    assert not (tmp_path / "r" / "tensorboard").exists()
    assert (tmp_path / "r" / "encoder" / "metrics.json").is_file()


def test_the_gan_writes_its_sample_grid_every_n_epochs_and_after_the_last(tmp_path, saliency_parts):
    from neuroimagen.stages import fit_stage
    from neuroimagen.training.context import RunContext
    from neuroimagen.training.loop import LocalReporter
    from neuroimagen.training.tracking import read_events

    cfg, inputs = saliency_parts
    sc = dataclasses.replace(cfg.stages.saliency, epochs=3, image_every=2, batch_size=16)
    cfg = dataclasses.replace(cfg, stages=dataclasses.replace(cfg.stages, saliency=sc))
    fit_stage("saliency", cfg, RunContext(), LocalReporter(tmp_path / "ckpt"), inputs, tensorboard=tmp_path / "tb")
    ev = read_events(tmp_path / "tb")
    shots = ev["images"]["saliency/samples"]
    assert [s for s, _, _ in shots] == [2, 3]  # every 2 epochs, and the last
    m = min(8, len(inputs["splits"]["val"]))
    assert {(h, w) for _, h, w in shots} == {((1 + sc.val_samples) * (sc.resolution + 2), m * (sc.resolution + 2))}
    assert [s for s, _ in ev["scalars"]["val/condition_gain"]] == [0, 1, 2, 3]
    assert [s for s, _ in ev["scalars"]["train/g_total"]] == [1, 2, 3]


def test_the_sample_grid_shows_the_validation_images_then_g(saliency_parts):
    import torch

    from neuroimagen.stages import build_stage
    from neuroimagen.training.context import RunContext

    cfg, inputs = saliency_parts
    stage = build_stage("saliency", cfg, RunContext(), inputs)
    assert stage.summary_images(0, 30) == {}  # not an image epoch (every 10, and the last)
    grid = stage.summary_images(9, 30)["saliency/samples"]
    R = cfg.stages.saliency.resolution
    first = stage.guard_items[0]
    assert torch.equal(grid[:, 1:R + 1, 1:R + 1], stage.img_val[first])  # top-left: the first item's image
    g = stage.generate(stage.f_val[first:first + 1], stage.z_grid[:1])[0]
    assert torch.allclose(grid[:, R + 3:2 * R + 3, 1:R + 1], g, atol=1e-6)  # below it: G for the first z
    off = dataclasses.replace(cfg, stages=dataclasses.replace(cfg.stages, saliency=dataclasses.replace(
        cfg.stages.saliency, image_every=0)))
    assert build_stage("saliency", off, RunContext(), inputs).summary_images(29, 30) == {}


# ----------------------------------------------------------------------------------------------
# Sweeps


def _tuner(tmp_path, sets):
    from neuroimagen.distributed.tune import new_tuner
    from neuroimagen.runs.sweeps import load_space

    from test_tune import GAN, _write

    space, cfg = load_space(_write(tmp_path, {**GAN, "set": GAN["set"] + sets}))
    lines = []
    tuner = new_tuner(space, cfg, tmp_path / "out", lambda config: None, 2, lines.append)
    return tuner._local_tuner.get_run_config().callbacks, lines


def test_a_sweep_logs_every_trial_with_tunes_own_callbacks(tmp_path):
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    callbacks, _ = _tuner(tmp_path, [])
    kinds = [type(c) for c in callbacks]
    assert kinds[:3] == [CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback]
    callbacks, _ = _tuner(tmp_path, ["train.tensorboard=false"])
    assert TBXLoggerCallback not in [type(c) for c in callbacks]
    assert {CSVLoggerCallback, JsonLoggerCallback} <= {type(c) for c in callbacks}  # the results table reads them


def test_mlflow_is_one_line_when_not_installed_and_a_callback_when_it_is(tmp_path, monkeypatch):
    import importlib.util

    from neuroimagen.distributed import tune as tune_mod

    callbacks, lines = _tuner(tmp_path, [])
    assert not any("MLflow" in ln for ln in lines)  # off by default
    if importlib.util.find_spec("mlflow") is None:
        callbacks, lines = _tuner(tmp_path, ["train.mlflow=true"])
        assert [ln for ln in lines if "MLflow" in ln] == [tune_mod.MLFLOW_MISSING]
        assert not any("MLflow" in type(c).__name__ for c in callbacks)
    else:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        from neuroimagen.errors import ConfigError

        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the default store sets; undone after the test
        callbacks, lines = _tuner(tmp_path, ["train.mlflow=true"])
        ml = [c for c in callbacks if isinstance(c, MLflowLoggerCallback)]
        assert len(ml) == 1 and ml[0].tracking_uri == (tmp_path / "out" / "mlruns").as_uri()
        with pytest.raises(ConfigError, match="MLflow cannot use nosuchscheme://x") as exc:
            _tuner(tmp_path, ["train.mlflow=true", "train.mlflow_tracking_uri=nosuchscheme://x"])
        assert "\n" not in str(exc.value)
