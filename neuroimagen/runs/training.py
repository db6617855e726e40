"""Train the stages of a run in dependency order: the function behind ``neuroimagen train`` and
``jobs/train.py``.

A run directory holds::

    config.yaml               the resolved config (data paths absolute)
    run.json                  which stages finished, and where each one's outputs are (the hand-offs)
    twin/                     the synthetic twin, when data.eeg is unset (the embedded default)
    text_encoder/             the tiny text encoder, when no pretrained one is configured
    <stage>/model/            best-on-validation weights + model.json (builder + kwargs)
    <stage>/metrics.json      final validation metrics with chance levels, protocol and guards (stages.stage_guards)
    <stage>/history.json      every epoch's metrics;  <stage>/curves.png  the same, drawn
    tensorboard/<stage>/      TensorBoard event files (train.tensorboard): per-epoch scalars, saliency sample grids
    checkpoints/<stage>/      local backend checkpoints;  ray/<stage>/  Ray Train storage

Stages hand off through explicit paths recorded in run.json, never "the latest file".

How a stage is fitted is the caller's choice: ``train(..., fit=...)`` takes a ``FitStage`` (``fit_local`` below
runs ``fit()`` in this process; ``neuroimagen.distributed.train.fit_on_ray`` on Ray Train;
``neuroimagen.backends.fit_stage`` picks one of them from ``train.backend``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from matplotlib.figure import Figure

from neuroimagen.atomic import atomic_path, make_dir, write_text
from neuroimagen.config import Config, load_config, write_config
from neuroimagen.data.datasets import load_splits
from neuroimagen.data.synthetic import synthesize
from neuroimagen.errors import ConfigError, DataError
from neuroimagen.logs import get_logger
from neuroimagen.provenance import provenance
from neuroimagen.rundir import TENSORBOARD, tensorboard_dir
from neuroimagen.stages import STAGE_ORDER, epochs_of, fit_stage, protocol_of, stage_class, stage_enabled, stage_guards
from neuroimagen.stages.clip_image import build_image_targets
from neuroimagen.stages.semantic import build_targets
from neuroimagen.training.checkpoint import export_model, load_model_dir
from neuroimagen.training.context import RunContext, perf_options, set_threads
from neuroimagen.training.loop import LocalReporter
from neuroimagen.training.tracking import available as tracking_available
from neuroimagen.training.tracking import say_missing

_log = get_logger(__name__)


class FitStage(Protocol):
    """Fit stage ``name`` with ``inputs`` (earlier stages' weights, targets) for the run ``run_dir``; returns the
    final checkpoint payload (``fit()``'s last report)."""

    def __call__(self, name: str, cfg: Config, inputs: dict, run_dir: Path, log: Callable[[str], None]) -> dict: ...

RUN_FILE = "run.json"


def resolve_stages(requested: Optional[Sequence[str]]) -> list[str]:
    """Requested stage names (comma list or sequence) in dependency order; all when None."""
    if requested is None:
        return list(STAGE_ORDER)
    names = [s.strip() for s in requested if s.strip()]
    bad = [s for s in names if s not in STAGE_ORDER]
    if bad:
        raise ConfigError(f"--stages: unknown stage '{bad[0]}' (known: {', '.join(STAGE_ORDER)})")
    if not names:
        raise ConfigError(f"--stages: expected at least one of {', '.join(STAGE_ORDER)}")
    return [s for s in STAGE_ORDER if s in names]


def default_stages(cfg: Config) -> list[str]:
    """The stages ``train`` runs when none are named: every stage but the optional ones not enabled
    (``clip_image`` without ``stages.clip_image.enabled``)."""
    return [s for s in STAGE_ORDER if stage_enabled(cfg, s)]


def read_run(run_dir: Path) -> dict:
    p = run_dir / RUN_FILE
    if not p.is_file():
        return {"stages": {}}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: unreadable run record ({exc.__class__.__name__}); it is rewritten by a finished stage") from None


def _write_run(run_dir: Path, record: dict) -> None:
    write_text(run_dir / RUN_FILE, json.dumps(record, indent=1))


def prepare_data(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> Config:
    """The embedded default: with ``data.eeg`` unset, synthesise the twin into ``<run>/twin`` once."""
    if cfg.data.eeg is not None:
        return cfg
    twin = run_dir / "twin"
    if not (twin / "config.yaml").is_file():
        log(f"data.eeg is unset: synthesising the twin into {twin} ({cfg.synth.classes} classes x "
            f"{cfg.synth.images_per_class} images, {cfg.synth.subjects} subjects, {cfg.synth.channels} channels)")
        synthesize(twin, cfg.synth, overwrite=True, show_progress=cfg.train.progress)
    twin_data = load_config(twin / "config.yaml").data
    keep = {f.name: getattr(cfg.data, f.name) for f in dataclasses.fields(cfg.data)
            if f.name not in ("format", "eeg", "splits", "images", "captions")}
    return dataclasses.replace(cfg, data=dataclasses.replace(twin_data, **keep))


def stage_inputs(name: str, cfg: Config, run_dir: Path, record: dict, splits: Optional[dict] = None) -> dict:
    """What stage ``name`` needs from earlier stages (weights, targets), read from recorded paths."""
    cls = stage_class(name)
    inputs: dict = {}
    if splits is not None:
        inputs["splits"] = splits
    enc = record["stages"].get("encoder")
    if enc is not None:
        doc, states = load_model_dir(run_dir / enc["model"])
        inputs.update(encoder_spec=doc["modules"]["encoder"], encoder_state=states["encoder"],
                      encoder_path=str(run_dir / enc["model"]))
    elif cls.requires:
        raise ConfigError(f"--stages: stage '{name}' needs a finished '{cls.requires[0]}' stage in {run_dir} "
                          f"(run --stages {','.join(cls.requires + (name,))})")
    if cls.caption_kind is not None:
        sp = splits if splits is not None else load_splits(cfg.data, image_mode="none")
        inputs["targets"] = build_targets(cfg, sp, run_dir, cls.caption_kind)
    if name == "clip_image":  # the stimuli's CLIP image embeddings, computed once here (frozen)
        sp = splits if splits is not None else load_splits(cfg.data, image_mode="path")
        inputs["clip_targets"] = build_image_targets(cfg, sp, run_dir)
    return inputs


def _plot_history(history: list[dict], path: Path, title: str) -> None:
    train_keys = sorted({k for h in history for k in h if k.startswith("train_")})
    val_keys = sorted({k for h in history for k in h if k.startswith("val_")})
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
    for ax, keys, label in ((axes[0], train_keys, "training (mean per epoch)"), (axes[1], val_keys, "validation")):
        for k in keys:
            pts = [(h["epoch"] + 1, h[k]) for h in history if k in h]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=2, label=k)
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def export_stage(name: str, cfg: Config, run_dir: Path, payload: dict) -> dict:
    """Write ``<run>/<stage>/{model/, metrics.json, history.json, curves.png}`` from the final checkpoint; a guard
    that fires (``stages.stage_guards``: did not learn, collapsed, ignores the EEG) is one warning line."""
    meta = payload["meta"]
    best = meta["best"]
    if not payload["best"]:
        raise DataError(f"{name}: no validation metric improved during training (validation split empty?)")
    out = run_dir / name
    export_names = list(payload["best"])
    export_model(out / "model", {k: meta["specs"][k] for k in export_names}, payload["best"],
                 extra={"stage": name, "best_epoch": best["epoch"], "selected_on": best["metric"]})
    metrics = {
        "stage": name,
        **best["metrics"],
        **stage_class(name).chance(meta["data"], best["metrics"]),
        "untrained": best.get("untrained", {}),
        "best_epoch": best["epoch"],
        "epochs": meta["epochs"],
        "selected_on": f"{best['metric']} ({best['mode']}) on the validation split",
        "final_epoch": meta["metrics"],
        "resumed_at_epochs": meta.get("resumes", []),
        "world_size": meta["world_size"],
        "data": meta["data"],
        "protocol": protocol_of(cfg, name),
        "guards": stage_guards(name, best, meta["history"], meta["data"]),
    }
    write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=str))
    if metrics["guards"]["warning"]:
        _log.warning(metrics["guards"]["warning"])  # whatever `log` the caller passed: a user must see this one
    write_text(out / "history.json", json.dumps(meta["history"], indent=1))
    _plot_history(meta["history"], out / "curves.png", f"{name}: {best['metric']} best {best['value']:.4g} at epoch {best['epoch'] + 1}")
    return metrics


def summary_line(name: str, metrics: dict, run_dir: Path) -> str:
    keys = [k for k in metrics if k.startswith("val_")]
    shown = " ".join(f"{k}={metrics[k]:.3f}" for k in keys if isinstance(metrics[k], float))
    extra = f" (chance {metrics['chance']:.3f})" if "chance" in metrics else (
        f" (mean-image SSIM {metrics['baseline_mean_image_ssim']:.3f})" if metrics.get("baseline_mean_image_ssim") is not None else "")
    resumed = f", resumed at epoch(s) {metrics['resumed_at_epochs']}" if metrics["resumed_at_epochs"] else ""
    return (f"[{name}] done: {shown}{extra}; best epoch {metrics['best_epoch'] + 1}/{metrics['epochs']}{resumed} "
            f"-> {run_dir / name}")


def train(cfg: Config, out: str | Path, stages: Optional[Sequence[str]] = None,
          log: Optional[Callable[[str], None]] = None, fit: Optional[FitStage] = None) -> dict:
    """Train ``stages`` (default: all) into the run directory ``out``; returns {stage: metrics}.

    ``fit`` fits one stage (see ``FitStage``); by default ``fit_local``, which needs ``train.backend: local``
    (Ray Train is the edge's: ``neuroimagen.backends.fit_stage`` or ``neuroimagen.distributed.train.fit_on_ray``).
    Re-running the same command resumes: finished stages are retrained only when requested, and an
    interrupted stage continues from its last checkpoint.
    """
    log = log or _log.info
    if fit is None:
        if cfg.train.backend != "local":
            raise ConfigError(f"train.backend: '{cfg.train.backend}' needs its fitter passed in "
                              "(neuroimagen.backends.fit_stage); this call only has the in-process one")
        fit = fit_local
    run_dir = Path(out).resolve()
    names = resolve_stages(stages)
    make_dir(run_dir)
    cfg = prepare_data(cfg, run_dir, log)
    if stages is None and cfg.data.captions is None and "semantic_image" in names:
        names.remove("semantic_image")
        log("[semantic_image] skipped: data.captions is not set (variants B and B+I need per-image captions)")
    if stages is None:
        names = [n for n in names if n in default_stages(cfg)]
    write_config(cfg, run_dir)
    if cfg.train.tensorboard and tracking_available():
        log(f"TensorBoard: tensorboard --logdir {run_dir / TENSORBOARD}")
    elif cfg.train.tensorboard:
        say_missing(log)
    record = read_run(run_dir)
    record.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    splits = None
    if cfg.train.backend == "local":
        set_threads(cfg.train.threads_per_worker)
    results = {}
    for name in names:
        t0 = time.perf_counter()
        if cfg.train.backend == "local":
            splits = splits if splits is not None else load_splits(cfg.data, image_mode="path")
        inputs = stage_inputs(name, cfg, run_dir, record, splits)
        epochs, _ = epochs_of(cfg, name)
        log(f"[{name}] training {epochs} epochs ({cfg.train.backend} backend, "
            f"{cfg.train.num_workers if cfg.train.backend == 'ray' else 1} worker(s))")
        payload = fit(name, cfg, inputs, run_dir, log)
        metrics = export_stage(name, cfg, run_dir, payload)
        record["stages"][name] = {"model": f"{name}/model", "metrics": f"{name}/metrics.json",
                                  "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  "seconds": round(time.perf_counter() - t0, 1), "provenance": provenance()}
        _write_run(run_dir, record)
        log(summary_line(name, metrics, run_dir))
        results[name] = metrics
    return results


def fit_local(name: str, cfg: Config, inputs: dict, run_dir: Path, log: Callable[[str], None]) -> dict:
    """``FitStage`` in this process (``train.backend: local``); returns the final checkpoint payload."""
    ctx = RunContext(**perf_options(cfg.train))
    reporter = LocalReporter(run_dir / "checkpoints" / name, keep=cfg.train.checkpoints_to_keep)
    fit_stage(name, cfg, ctx, reporter, inputs, fault_marker=run_dir / "checkpoints" / name / "fault-injected",
              log=log if cfg.train.progress else None, tensorboard=tensorboard_dir(run_dir, name))
    payload = reporter.restore()
    if payload is None:
        raise DataError(f"{name}: training produced no checkpoint")
    return payload
