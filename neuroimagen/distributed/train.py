"""Ray Train: run a stage's ``fit()`` in a ``TorchTrainer`` with DDP (gloo on CPU, nccl on GPU).

The worker loop builds the stage from the config (plain data), wires a ``RunContext`` from the Ray
Train context and a ``RayReporter`` (``ray.train.report`` every epoch, rank 0 attaching the
checkpoint directory), and calls the same ``fit()`` the local backend uses. After a worker failure
Ray restarts the group (``FailureConfig(max_failures)``) and ``fit()`` resumes from
``ray.train.get_checkpoint()``; re-running a stage with the same run directory resumes the same way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from neuroimagen.config import Config, from_dict, to_dict
from neuroimagen.errors import DataError
from neuroimagen.logs import configure_cli, get_logger
from neuroimagen.rundir import tensorboard_dir
from neuroimagen.stages import fit_stage
from neuroimagen.training.checkpoint import complete_epoch, load_checkpoint, save_checkpoint
from neuroimagen.training.context import RunContext, perf_options, set_threads


def init_ray(cfg: Config) -> None:
    """Join ``train.ray_address`` / ``RAY_ADDRESS`` if set (a cluster, or a job's own cluster), else
    start a local instance with ``train.ray_num_cpus`` logical CPUs (default max(4, cores): CPUs are
    scheduling tokens, and a 2-core machine needs headroom to avoid resource deadlocks)."""
    if ray.is_initialized():
        return
    # Ray Train V2 acknowledges every ``report`` on the controller's health-check tick (2 s by default),
    # which made a 30-epoch CPU stage spend 60 s waiting; 0.1 s brings a report to ~0.1 s (bench/RESULTS.md).
    # Workers of a local instance inherit this; a cluster's nodes need it in their own environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.train.ray_num_cpus or max(4, os.cpu_count() or 1))


class RayReporter:
    """``fit()``'s reporter inside Ray Train: metrics every epoch, rank 0 attaches the checkpoint.

    ``restore`` takes the newer of Ray's registered checkpoint and the newest complete checkpoint in
    the run's storage folder (when it is a filesystem path). The controller registers a report
    asynchronously, so a worker killed right after reporting can leave a persisted checkpoint that
    Ray has not registered yet; without the scan the restarted group would start from scratch.
    """

    def __init__(self, storage_dir: Optional[str] = None):
        self.storage_dir = Path(storage_dir) if storage_dir else None

    def restore(self) -> Optional[dict]:
        found = []
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                found.append(load_checkpoint(d))
        if self.storage_dir is not None and self.storage_dir.is_dir():
            latest = latest_stored(self.storage_dir)
            if latest is not None:
                found.append(load_checkpoint(latest))
        return max(found, key=lambda p: int(p["meta"]["epoch"])) if found else None

    def report(self, metrics: dict, payload: Optional[dict]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if payload is None:
            ray.train.report(scalars)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, payload)
            ray.train.report(scalars, checkpoint=Checkpoint.from_directory(tmp))


def worker_loop(config: dict) -> None:
    """The per-worker training function (runs on every rank): the config crossed the boundary as one plain
    dict (``to_dict`` on the driver) and is rebuilt once here."""
    tctx = ray.train.get_context()
    cfg = from_dict(Config, config["cfg"])
    ctx = RunContext(rank=tctx.get_world_rank(), world_size=tctx.get_world_size(),
                     local_rank=tctx.get_local_rank(), device=ray.train.torch.get_device(), **perf_options(cfg.train))
    set_threads(config["threads"])
    # this worker's lines go to its stderr, which Ray forwards to the driver (and to the job's log)
    configure_cli(0 if cfg.train.progress else -1)
    fit_stage(config["stage"], cfg, ctx, RayReporter(config.get("storage_dir")), config["inputs"],
              fault_marker=Path(config["fault_marker"]) if config["fault_marker"] else None,
              log=get_logger(__name__).info if cfg.train.progress else None,
              tensorboard=Path(config["tensorboard"]) if config.get("tensorboard") else None)


def latest_stored(storage: Path) -> Optional[Path]:
    """The highest-epoch complete checkpoint (``meta.json`` present, every file it lists whole) under a Ray
    Train run folder."""
    best, best_epoch = None, -1
    for p in storage.glob("checkpoint_*"):
        epoch = complete_epoch(p)  # None: incomplete, cut short or foreign, never trusted
        if epoch is not None and epoch > best_epoch:
            best, best_epoch = p, epoch
    return best


def trainer_for(name: str, cfg: Config, inputs: dict, run_dir: Path, run_name: Optional[str] = None,
                callbacks: Optional[list] = None) -> TorchTrainer:
    """The ``TorchTrainer`` of stage ``name`` (fixed run name per stage, so re-runs resume).

    ``run_name``/``callbacks``: a Tune trial's own name and its ``TuneReportCallback``."""
    tc = cfg.train
    storage = tc.storage_path or str(run_dir / "ray")
    threads = tc.threads_per_worker or max(1, int(tc.cpus_per_worker))
    marker = str(run_dir / "ray" / f"{name}-fault-injected") if tc.fault_injection_epoch is not None else None
    return TorchTrainer(
        worker_loop,
        train_loop_config={"stage": name, "cfg": to_dict(cfg), "inputs": {k: v for k, v in inputs.items() if k != "splits"},
                           "threads": threads, "fault_marker": marker,
                           "tensorboard": str(tensorboard_dir(run_dir, name)),
                           "storage_dir": str(Path(storage) / name) if "://" not in storage else None},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=run_name or name, storage_path=storage, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep)),
    )


def fit_on_ray(name: str, cfg: Config, inputs: dict, run_dir: Path, log: Callable[[str], None]) -> dict:
    """Fit stage ``name`` on Ray Train; returns the final checkpoint payload."""
    init_ray(cfg)
    result = trainer_for(name, cfg, inputs, run_dir).fit()
    if getattr(result, "error", None) is not None:
        raise result.error
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            return load_checkpoint(d)
    # A re-run of a finished stage reports nothing new: use what the storage already holds.
    latest = latest_stored(Path(cfg.train.storage_path or run_dir / "ray") / name)
    if latest is None:
        raise DataError(f"{name}: Ray Train finished without a checkpoint")
    log(f"[{name}] already complete in {latest.parent}; using its last checkpoint")
    return load_checkpoint(latest)
