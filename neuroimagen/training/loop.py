"""One training loop for every stage: ``fit()``.

A stage (``neuroimagen.stages``) supplies its modules, optimizers, a batch loader, ``train_step`` and
``validate``; ``fit`` owns epochs, seeding, validation cadence, best-on-validation selection,
checkpoint save/resume and progress. It runs unchanged in one process (``LocalReporter``) and in
every Ray Train worker (``neuroimagen.distributed.train.RayReporter``).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

from neuroimagen.atomic import PARTIAL_TAG, atomic_dir, remove_partials
from neuroimagen.logs import get_logger
from neuroimagen.training.checkpoint import complete_epoch, load_checkpoint, save_checkpoint, state_to_cpu
from neuroimagen.training.context import RunContext, seed_everything, unwrap
from neuroimagen.training.tracking import Tracker

_log = get_logger(__name__)


class Reporter(Protocol):
    """Where metrics and checkpoints go, and where a resumed run finds its last checkpoint."""

    def restore(self) -> Optional[dict]: ...

    def report(self, metrics: dict, payload: Optional[dict]) -> None: ...


class LocalReporter:
    """Checkpoints in ``<dir>/epoch-NNNN`` (atomic rename), the newest ``keep`` retained."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    def _complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("epoch-*") if PARTIAL_TAG not in p.name and complete_epoch(p) is not None)

    def restore(self) -> Optional[dict]:
        remove_partials(self.dir)  # a checkpoint interrupted mid-write is never resumed; drop its staging dir
        done = self._complete()
        return load_checkpoint(done[-1]) if done else None

    def report(self, metrics: dict, payload: Optional[dict]) -> None:
        if payload is None:
            return
        with atomic_dir(self.dir / f"epoch-{int(metrics['epoch']):04d}", overwrite=True) as stage:
            save_checkpoint(stage, payload)
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class FitResult:
    history: list[dict]
    best: dict
    resumed_from_epoch: Optional[int]
    final_payload: Optional[dict] = field(default=None, repr=False)

    @property
    def learning(self) -> dict:
        """``learning_guard`` of this fit: did the exported epoch beat the untrained model and the first epoch?"""
        return learning_guard(self.best, self.history)


def _better(value: float, best: Optional[float], mode: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value >= best if mode == "max" else value <= best  # a tie keeps the later, longer-trained epoch


LEARNING_TOLERANCE = 1e-6  # "no gain": the selected metric moved less than this (relative to max(1, |untrained|))


def learning_guard(best: dict, history: list[dict]) -> dict:
    """Did the stage learn? Stage-agnostic: compares the exported (best) epoch with the untrained model and with
    the first validated epoch, on the stage's selection metric and its direction (``best`` as ``fit()`` keeps it).

    Fires when the best value is no better than the untrained model's (gain, signed so that
    positive is better, at most ``LEARNING_TOLERANCE * max(1, |untrained|)``), or when, with at least two
    validations, the best epoch is the first validated one (no later epoch beat it). Returns the numbers,
    ``fired`` and, when it fires, a one-line ``reason``.
    """
    metric, mode = best["metric"], best["mode"]
    value, epoch = best.get("value"), best.get("epoch")
    untrained = (best.get("untrained") or {}).get(metric)
    validated = [h["epoch"] for h in history if metric in h]
    out = {"metric": metric, "mode": mode, "best": value, "best_epoch": epoch, "untrained": untrained,
           "gain": None, "validations": len(validated), "fired": False, "reason": ""}
    if value is None:
        return out
    reasons = []
    if untrained is not None and not math.isnan(untrained):
        out["gain"] = gain = (value - untrained) if mode == "max" else (untrained - value)
        tol = LEARNING_TOLERANCE * max(1.0, abs(untrained))
        if gain <= tol:
            reasons.append(f"no gain over the untrained model ({metric} {value:.4g} vs untrained {untrained:.4g}, "
                           f"{'higher' if mode == 'max' else 'lower'} is better)")
    if len(validated) >= 2 and epoch == validated[0]:
        reasons.append(f"best epoch is the first validated one (epoch {epoch + 1}: no later epoch beat it)")
    if reasons:
        out["fired"] = True
        out["reason"] = "; ".join(reasons)
    return out


def kill_once(marker: Optional[Path]) -> None:
    """Testing hook: SIGKILL this process the first time (a marker file makes it fire once).

    Also used by reconstruction's ``eval.fault_injection_*`` hooks."""
    if marker is None or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("fault injected\n")
    os.kill(os.getpid(), signal.SIGKILL)


def fit(stage, ctx: RunContext, reporter: Reporter, *, epochs: int, val_every: int, seed: int,
        fault_epoch: Optional[int] = None, fault_marker: Optional[Path] = None,
        log: Optional[Callable[[str], None]] = _log.info, tracker: Optional[Tracker] = None) -> FitResult:
    """Train ``stage`` for ``epochs``, resuming from the reporter's latest checkpoint if any.

    Every epoch: seed from (seed, epoch, rank) so a resumed epoch replays exactly; one pass over the
    stage's loader; validation every ``val_every`` epochs and after the last; the best epoch by
    ``stage.select_metric`` (validation data only) is kept, the later of equal scores (a coarse metric on a
    small validation split saturates early, and the first of equal epochs is the least trained); metrics and a checkpoint are reported
    (every rank reports, rank 0 attaches the checkpoint).

    ``tracker`` (``neuroimagen.training.tracking``; pass one on rank 0 only) gets the untrained model's validation
    metrics as step 0, every epoch's metrics as step epoch + 1 after that epoch's checkpoint, and the stage's sample
    images (``stage.images``) when it has any: a resumed run tracks the epochs it trains, from the checkpoint on.
    """
    history: list[dict] = []
    best: dict = {"metric": stage.select_metric, "mode": stage.select_mode, "value": None, "epoch": None, "metrics": {}}
    best_states: dict = {}
    start, resumed, resumes = 0, None, []
    state = reporter.restore()
    if state is not None:
        stage.load_state(state)
        meta = state["meta"]
        start, resumed = int(meta["epoch"]) + 1, int(meta["epoch"])
        history, best, best_states = list(meta["history"]), dict(meta["best"]), state["best"]
        resumes = list(meta.get("resumes", [])) + [resumed]
        if log and ctx.is_main:
            log(f"[{stage.name}] resumed from the checkpoint of epoch {resumed}")
    if state is None:
        # The untrained model on validation data: the reference every stage must beat.
        seed_everything(seed, -1, ctx.rank)
        untrained = stage.validate()
        best["untrained"] = untrained
        if log and ctx.is_main:
            log(f"[{stage.name}] untrained: " + " ".join(f"{k}={v:.4g}" for k, v in untrained.items()))
        if tracker is not None and ctx.is_main:
            tracker.scalars(untrained, 0)
    payload = None
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        seed_everything(seed, epoch, ctx.rank)
        stage.set_epoch(epoch)
        sums: dict[str, float] = {}
        n = 0
        for step, batch in enumerate(stage.loader):
            out = stage.train_step(batch)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            if fault_epoch is not None and epoch == fault_epoch and step == 0 and ctx.is_main:
                kill_once(fault_marker)
        train = ctx.mean({f"train_{k}": v / max(n, 1) for k, v in sums.items()})
        validate = (epoch + 1) % val_every == 0 or epoch == epochs - 1
        val = stage.validate() if validate else {}
        metrics = {"epoch": epoch, **train, **val, "epoch_seconds": time.perf_counter() - t0}
        if validate and _better(val.get(stage.select_metric), best["value"], stage.select_mode):
            best = {**best, "value": val[stage.select_metric], "epoch": epoch, "metrics": val}
            best_states = {name: state_to_cpu(unwrap(m).state_dict()) for name, m in stage.export_modules().items()}
        history.append(metrics)
        payload = None
        if ctx.is_main:
            payload = {
                "meta": {"stage": stage.name, "epoch": epoch, "epochs": epochs, "metrics": metrics, "history": history,
                         "best": best, "specs": stage.specs(), "data": stage.describe_data(), "seed": seed,
                         "world_size": ctx.world_size, "resumes": resumes},
                "modules": {name: state_to_cpu(unwrap(m).state_dict()) for name, m in stage.modules().items()},
                "optimizers": {name: state_to_cpu(o.state_dict()) for name, o in stage.optimizers().items()},
                "best": best_states,
            }
        reporter.report(metrics, payload)
        if tracker is not None and ctx.is_main:
            tracker.scalars(metrics, epoch + 1)
            images = stage.summary_images(epoch, epochs)
            if images:
                tracker.images(images, epoch + 1)
        if log and ctx.is_main:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("epoch",) and isinstance(v, float))
            log(f"[{stage.name}] epoch {epoch + 1}/{epochs} {shown}")
    return FitResult(history=history, best=best, resumed_from_epoch=resumed, final_payload=payload)
