"""Ray Tune: sweep one stage's hyperparameters (``neuroimagen tune --space tune_spaces/gan.yaml``).

The pattern current Ray recommends for Train + Tune: one *driver function* per trial that builds and fits
its own ``TorchTrainer`` (``ray.tune.integration.ray_train.TuneReportCallback`` forwards every epoch's
report to Tune, so ASHA can stop weak trials after any epoch). ``trainer: local`` in the space file runs the
same ``fit()`` inside the trial instead (no nested worker group: the fast path on a laptop).

Layout of a sweep directory::

    base/          the stages the swept stage needs (trained once, shared by every trial), and the twin
    sweep/         Ray Tune's experiment folder (``--resume`` restores it)
    trials/<id>/   each trial's Ray Train storage and exported stage
    results.csv / results.parquet   one row per trial: parameters, best and last metric, epochs run, status
    best.yaml      the base config with the best trial's parameters: ``neuroimagen train --config best.yaml``
    trials.png     the metric per trial over epochs
    space.json     the validated space

Tracking (``sweep_callbacks``): Ray Tune's own logger callbacks, all passed explicitly: CSV and JSON (the per-trial
records the results table is read from), ``TBXLoggerCallback`` (``train.tensorboard``: every trial's reports and
parameters as TensorBoard event files in ``sweep/<trial>/``; ``tensorboard --logdir <out>/sweep``) and
``MLflowLoggerCallback`` (``train.mlflow``, when the ``mlflow`` package is installed: one MLflow run per trial).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from neuroimagen.atomic import atomic_path, write_text
from neuroimagen.config import Config, from_dict, to_dict, write_config
from neuroimagen.distributed.train import init_ray, trainer_for, worker_logging
from neuroimagen.errors import ConfigError
from neuroimagen.logs import get_logger
from neuroimagen.rundir import tensorboard_dir
from neuroimagen.runs.sweeps import Space, apply_values, best_row, plot_trials
from neuroimagen.runs.training import FitStage, export_stage, prepare_data, read_run, stage_inputs, train
from neuroimagen.stages import epochs_of, fit_stage, stage_class
from neuroimagen.training.checkpoint import load_checkpoint, save_checkpoint
from neuroimagen.training.context import RunContext, set_threads

_log = get_logger(__name__)


def _distribution(dist: str, args: tuple):
    if dist == "uniform":
        return tune.uniform(*args)
    if dist == "loguniform":
        return tune.loguniform(*args)
    if dist == "quniform":
        return tune.quniform(*args)
    if dist == "randint":
        return tune.randint(int(args[0]), int(args[1]))
    if dist == "choice":
        return tune.choice(list(args))
    return tune.grid_search(list(args))


def param_space(space: Space) -> dict:
    """Tune's flat param space: dotted config keys -> Tune distributions."""
    return {k: _distribution(d, a) for k, (d, a) in space.params.items()}


def _search_alg(space: Space):
    if space.search["type"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # noqa: PLC0415 - optional dependency

        return OptunaSearch(seed=space.search["seed"])
    if space.search["type"] == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch  # noqa: PLC0415 - optional dependency

        return HyperOptSearch(random_state_seed=space.search["seed"])
    return None  # Tune's default random/grid generator honours max_concurrent_trials (an explicit one would not)


AUTO_LOGGERS_ENV = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # "1": Tune adds no CSV/JSON/TBX logger of its own
MLFLOW_MISSING = "MLflow logging is off: train.mlflow is set but mlflow is not installed (pip install mlflow-skinny)"


def sweep_callbacks(cfg: Config, out: Path, log: Callable[[str], None]) -> list:
    """Ray Tune's logger callbacks of a sweep into ``out`` (see the module doc), in the order Tune runs them."""
    callbacks = [CSVLoggerCallback(), JsonLoggerCallback()]
    if cfg.train.tensorboard:
        callbacks.append(TBXLoggerCallback())
    if cfg.train.mlflow:
        if importlib.util.find_spec("mlflow") is None:
            log(MLFLOW_MISSING)
        else:
            from ray.air.integrations.mlflow import MLflowLoggerCallback  # noqa: PLC0415 - needs the optional mlflow

            uri = cfg.train.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if uri is None:  # the default, a file store in the sweep: MLflow 3 refuses one unless opted in
                uri = (out / "mlruns").as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            _check_mlflow_store(uri)
            callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=f"neuroimagen-{out.name}",
                                                  tags={"sweep": str(out)}))
            log(f"tune: MLflow logging to {uri} (experiment neuroimagen-{out.name})")
    return callbacks


def _check_mlflow_store(uri: str) -> None:
    """Open the MLflow tracking store ``uri`` now: a store MLflow cannot use is one error line before any trial
    starts, not a traceback from inside Tune."""
    import mlflow  # noqa: PLC0415 - optional

    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - whatever the store raises, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(f"train.mlflow_tracking_uri: MLflow cannot use {uri}: {first}") from None


@contextlib.contextmanager
def _only_our_loggers():
    """While Tune runs: it adds no logger callback of its own (``sweep_callbacks`` passes every one it needs)."""
    before = os.environ.get(AUTO_LOGGERS_ENV)
    os.environ[AUTO_LOGGERS_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(AUTO_LOGGERS_ENV, None)
        else:
            os.environ[AUTO_LOGGERS_ENV] = before


class _TuneReporter:
    """``fit()``'s reporter inside a trial (trainer: local): metrics and checkpoint to Tune every epoch."""

    def restore(self):
        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_checkpoint(d)

    def report(self, metrics: dict, payload) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if payload is None:
            tune.report(scalars)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, payload)
            tune.report(scalars, checkpoint=tune.Checkpoint.from_directory(tmp))


def trial_fn(config: dict, base: dict, inputs: dict, stage: str, trainer: str, root: str, threads: int) -> None:
    """One trial: the base config with this trial's values; fits ``stage`` (its own TorchTrainer, or in-process)."""
    worker_logging()  # this trial's messages reach the driver's logging as records (route_ray_output)
    cfg = apply_values(from_dict(Config, base), config)
    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(root) / "trials" / trial_id
    if trainer == "ray":
        result = trainer_for(stage, cfg, inputs, trial_dir, run_name=f"{stage}-{trial_id}",
                             callbacks=[TuneReportCallback()]).fit()
        if getattr(result, "error", None) is not None:
            raise result.error
        payload = None
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                payload = load_checkpoint(d)
    else:
        set_threads(threads)
        reporter = _TuneReporter()
        fit_stage(stage, cfg, RunContext(), reporter, inputs, tensorboard=tensorboard_dir(trial_dir, stage))
        payload = reporter.restore()
    if payload is not None and payload.get("best"):
        export_stage(stage, cfg, trial_dir, payload)


def new_tuner(space: Space, cfg: Config, out: Path, trainable, epochs: int, log: Callable[[str], None]) -> tune.Tuner:
    """The ``Tuner`` of a new sweep of ``space`` into ``out`` (scheduler, search, trial limits, logger callbacks)."""
    sched = space.scheduler
    if sched["type"] == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=int(sched["max_epochs"] or epochs),
                                  grace_period=sched["grace_period"], reduction_factor=sched["reduction_factor"])
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        trainable, param_space=param_space(space),
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, scheduler=scheduler,
                                    search_alg=_search_alg(space), num_samples=space.num_samples,
                                    max_concurrent_trials=space.max_concurrent_trials),
        run_config=tune.RunConfig(name="sweep", storage_path=str(out), verbose=1,
                                  callbacks=sweep_callbacks(cfg, out, log)),
    )
    log(f"tune: {space.num_samples} trial(s) of stage {space.stage}, {space.metric} ({space.mode}) on the "
        f"validation split, {sched['type']} scheduler, {space.search['type']} search, up to "
        f"{space.max_concurrent_trials} at a time ({space.trainer} trainer)")
    return tuner


def run_sweep(space: Space, cfg: Config, out: str | Path, resume: bool = False,
              log: Optional[Callable[[str], None]] = None, *, fit: FitStage) -> dict:
    """Run (or resume) a sweep into ``out``; returns {'results': DataFrame, 'best': dict, 'best_config': path}.

    ``fit`` fits the stages the swept one needs, once, into ``<out>/base`` (``neuroimagen.backends.fit_stage``)."""
    log = log or _log.info
    out = Path(out).resolve()
    exp = out / "sweep"
    if resume and not (exp / "tuner.pkl").is_file():
        raise ConfigError(f"--resume {out}: no sweep to resume there (expected {exp}/tuner.pkl)")
    if not resume and exp.exists():
        raise ConfigError(f"{out}: a sweep already exists there; use --resume {out} to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "base"
    need = [s for s in stage_class(space.stage).requires if s not in read_run(base_dir)["stages"]]
    if need:
        log(f"tune: training {', '.join(need)} once for every trial -> {base_dir}")
        train(cfg, base_dir, need, log=log, fit=fit)
    cfg = prepare_data(cfg, base_dir, log)
    inputs = stage_inputs(space.stage, cfg, base_dir, read_run(base_dir))
    epochs, _ = epochs_of(cfg, space.stage)
    write_text(out / "space.json", json.dumps({**space.describe(), "epochs": epochs}, indent=1))
    init_ray(cfg)
    threads = cfg.train.threads_per_worker or max(1, int(cfg.train.cpus_per_worker))
    fn = tune.with_parameters(trial_fn, base=to_dict(cfg), inputs=inputs, stage=space.stage, trainer=space.trainer,
                              root=str(out), threads=threads)
    # trainer=ray: the trial function only waits for its TorchTrainer, whose workers hold the CPUs;
    # trainer=local: the trial itself trains. Either way trials queue instead of deadlocking on 2 cores.
    fn = tune.with_resources(fn, {"cpu": 0.5} if space.trainer == "ray" else {"cpu": space.cpu, "gpu": space.gpu})
    if resume:
        log(f"tune: resuming {exp}")
        tuner = tune.Tuner.restore(str(exp), trainable=fn, resume_errored=True)
    else:
        tuner = new_tuner(space, cfg, out, fn, epochs, log)
    if cfg.train.tensorboard:
        log(f"TensorBoard: tensorboard --logdir {exp}")
    # a resumed sweep keeps the callbacks it was started with (tuner.pkl); Tune adds any logger they lack (a sweep
    # started before they were passed explicitly has none, and its results table needs the CSV and JSON ones)
    with contextlib.nullcontext() if resume else _only_our_loggers():
        grid = tuner.fit()
    rows, histories = [], {}
    for r in grid:
        tid = (r.metrics or {}).get("trial_id") or Path(r.path).name
        df = r.metrics_dataframe
        hist = []
        if df is not None and space.metric in df:
            # by the stage's own epoch counter: a trial resumed after an interruption re-reports epochs under
            # new training_iteration numbers; the last report of each epoch wins
            ep = df["epoch"] if "epoch" in df else df["training_iteration"] - 1
            last = {int(e): float(v) for e, v in zip(ep, df[space.metric]) if v == v}
            hist = sorted(last.items())
        histories[tid] = hist
        vals = [v for _, v in hist]
        best = (max(vals) if space.mode == "max" else min(vals)) if vals else float("nan")
        row = {"trial_id": tid, **{k: r.config.get(k) for k in space.params}, f"best_{space.metric}": best,
               f"last_{space.metric}": vals[-1] if vals else float("nan"), "epochs_run": len(hist),
               "stopped_early": bool(r.error is None and 0 < len(hist) < epochs), "error": str(r.error) if r.error else ""}
        rows.append(row)
    results = pd.DataFrame(rows).sort_values("trial_id").reset_index(drop=True)
    with atomic_path(out / "results.csv") as tmp:
        results.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out / "results.parquet") as tmp:
        results.to_parquet(tmp, index=False)
    best = best_row(results, space.metric, space.mode)
    best_values = {k: (best[k].item() if hasattr(best[k], "item") else best[k]) for k in space.params}
    best_cfg = apply_values(cfg, best_values)
    path = write_config(best_cfg, out, name="best.yaml")
    plot_trials(histories, space.metric, out / "trials.png",
                f"{space.stage}: {space.metric} per trial ({space.scheduler['type']}; short lines were stopped early)")
    summary = {"best_trial": best["trial_id"], "best_value": float(best[f"best_{space.metric}"]),
               "best_params": best_values, "metric": space.metric, "mode": space.mode,
               "stopped_early": int(results["stopped_early"].sum()), "trials": len(results)}
    write_text(out / "best.json", json.dumps(summary, indent=1, default=str))
    return {"results": results, "best": summary, "best_config": path}
