"""Ray Train: run a stage's ``fit()`` in a ``TorchTrainer`` with DDP (gloo on CPU, nccl on GPU).

The worker loop builds the stage from the config (plain data), wires a ``RunContext`` from the Ray
Train context and a ``RayReporter`` (``ray.train.report`` every epoch, rank 0 attaching the
checkpoint directory), and calls the same ``fit()`` the local backend uses. After a worker failure
Ray restarts the group (``FailureConfig(max_failures)``) and ``fit()`` resumes from
``ray.train.get_checkpoint()``; re-running a stage with the same run directory resumes the same way.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import ray
import ray.train
import ray.train.torch
from ray._private.ray_logging import global_worker_stdstream_dispatcher
from ray._private.worker import filter_autoscaler_events
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from neuroimagen.config import Config, from_dict, to_dict
from neuroimagen.errors import DataError
from neuroimagen.logs import get_logger
from neuroimagen.rundir import tensorboard_dir
from neuroimagen.stages import fit_stage
from neuroimagen.training.checkpoint import complete_epoch, load_checkpoint, save_checkpoint
from neuroimagen.training.context import RunContext, perf_options, set_threads

WORKER_TAG = "neuroimagen-log|"  # a worker's own log lines on its stderr: WORKER_TAG + "<levelno>|<logger>|<message>"
RAY_LOGGER = "neuroimagen.ray"  # what Ray itself says, on the driver and forwarded from its processes: DEBUG
_ROUTE = "neuroimagen_worker_logs"
_RAY_PRINTER = "ray_print_logs"  # the handler ray.init(log_to_driver=True) installs: prints every line on the terminal


class _TaggedFormatter(logging.Formatter):
    """A worker's records as tagged lines (every line of a multi-line message tagged), for ``route_worker_line``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return "\n".join(f"{WORKER_TAG}{record.levelno}|{record.name}|{line}" for line in text.split("\n"))


def worker_logging() -> None:
    """In a Ray Train worker: every record of the package goes, tagged, to this worker's stderr (which Ray forwards
    to the driver, where ``route_worker_line`` turns it back into a record), and not to Ray's root console handler
    (which printed each line a second time)."""
    root = logging.getLogger("neuroimagen")
    for h in list(root.handlers):
        if getattr(h, "_neuroimagen_worker", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._neuroimagen_worker = True  # type: ignore[attr-defined]
    handler.setFormatter(_TaggedFormatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # the driver's handlers decide what is shown (-q, -v) and the run's log keeps all
    root.propagate = False


def route_worker_line(line: str, source: str = "") -> None:
    """One line a Ray process printed, as a record on the driver: a package line (``WORKER_TAG``) under its own
    logger and level, so the terminal shows it as if it were the driver's; anything else (Ray's own messages:
    "Reporting training result ...", checkpoints, worker-group start-up) at DEBUG under ``RAY_LOGGER`` with its
    source: in the run's log, on the terminal only with ``-v``."""
    if line.startswith(WORKER_TAG):
        level, name, message = line[len(WORKER_TAG):].split("|", 2)
        logging.getLogger(name).log(int(level), message)
    else:
        logging.getLogger(RAY_LOGGER).debug(f"({source}) {line}" if source else line)


def _route_batch(data: dict) -> None:
    """``ray_logging``'s stdstream dispatcher calls this with a batch of forwarded lines (pid, actor or task name)."""
    name = data.get("actor_name") or data.get("task_name") or ""
    source = f"{name} pid={data.get('pid')}".strip()
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # as Ray's printer: of the autoscaler's monitor log, only its events
        lines = list(filter_autoscaler_events(lines))
    for line in lines:
        route_worker_line(line, source)


class _ToRayLogger(logging.Handler):
    """Ray's own driver-side messages (logger ``ray``) re-logged under ``RAY_LOGGER``: below WARNING at DEBUG."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelno if record.levelno >= logging.WARNING else logging.DEBUG
        logging.getLogger(RAY_LOGGER).log(level, f"{record.name}: {record.getMessage()}")


def route_ray_output() -> None:
    """Ray's output goes through the package's logging instead of straight to the terminal: the lines its
    processes print (forwarded to the driver by ``log_to_driver``) and its driver-side ``ray`` logger. The command
    line then shows only the package's lines (``-v`` adds Ray's) and the run's log file records everything.

    Ray 2.60 (pinned): the forwarded lines reach the terminal through ``ray._private.ray_logging``'s
    ``global_worker_stdstream_dispatcher`` handler ``ray_print_logs``; it is replaced by ``_route_batch``."""
    global_worker_stdstream_dispatcher.remove_handler(_RAY_PRINTER)
    global_worker_stdstream_dispatcher.remove_handler(_ROUTE)
    global_worker_stdstream_dispatcher.add_handler(_ROUTE, _route_batch)
    ray_logger = logging.getLogger("ray")
    for h in list(ray_logger.handlers):
        if not isinstance(h, _ToRayLogger):
            ray_logger.removeHandler(h)
    if not any(isinstance(h, _ToRayLogger) for h in ray_logger.handlers):
        ray_logger.addHandler(_ToRayLogger())
    ray_logger.propagate = False


def init_ray(cfg: Config) -> None:
    """Join ``train.ray_address`` / ``RAY_ADDRESS`` if set (a cluster, or a job's own cluster), else
    start a local instance with ``train.ray_num_cpus`` logical CPUs (default max(4, cores): CPUs are
    scheduling tokens, and a 2-core machine needs headroom to avoid resource deadlocks). Ray's output is
    routed through logging (``route_ray_output``)."""
    if ray.is_initialized():
        return
    route_ray_output()
    # Ray Train V2 acknowledges every ``report`` on the controller's health-check tick (2 s by default),
    # which made a 30-epoch CPU stage spend 60 s waiting; 0.1 s brings a report to ~0.1 s (bench/RESULTS.md).
    # Workers of a local instance inherit this; a cluster's nodes need it in their own environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.train.ray_num_cpus or max(4, os.cpu_count() or 1))
    route_ray_output()  # again: ray.init installs its printer of forwarded lines


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
    # this worker's lines go, tagged, to its stderr, which Ray forwards to the driver: route_ray_output shows them there
    worker_logging()
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
