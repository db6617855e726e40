"""Which implementation runs the work: the one place that maps ``train.backend`` / ``eval.backend`` to local or Ray.

The runs layer (``neuroimagen.runs``) never chooses: it takes these callables as parameters. The CLI and the
jobs pass them in; a notebook can call the runs functions with the local implementations directly.

    fit_stage   a ``FitStage``: ``fit()`` in this process (``train.backend: local``) or on Ray Train (``ray``)
    run_rows    a ``RunRows``: stage 4's callables in a loop here (``eval.backend: local``) or as Ray Data actors

Ray is imported only when a Ray backend is asked for, so the CLI starts fast and ``local`` runs without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from neuroimagen.config import Config
from neuroimagen.reconstruction.factory import RunSources
from neuroimagen.runs import evaluation, loso, training


def fit_stage(name: str, cfg: Config, inputs: dict, run_dir: Path, log: Callable[[str], None]) -> dict:
    """Fit one stage with the backend ``cfg.train.backend`` names (see ``neuroimagen.runs.training.FitStage``)."""
    if cfg.train.backend == "local":
        return training.fit_local(name, cfg, inputs, run_dir, log)
    from neuroimagen.distributed.train import fit_on_ray  # noqa: PLC0415 - the Ray edge, only when asked for

    return fit_on_ray(name, cfg, inputs, run_dir, log)


def run_rows(rows: list[dict], cfg: Config, sources: RunSources, on_batch: Callable[[dict], None],
             progress: bool = True) -> None:
    """Generate and score ``rows`` with the backend ``cfg.eval.backend`` names (``neuroimagen.runs.evaluation.RunRows``)."""
    if cfg.eval.backend == "local":
        return evaluation.run_local(rows, cfg, sources, on_batch, progress)
    from neuroimagen.distributed.data import run_on_ray  # noqa: PLC0415 - the Ray edge, only when asked for

    return run_on_ray(rows, cfg, sources, on_batch, progress)


def train(cfg: Config, out: str | Path, stages: Optional[Sequence[str]] = None,
          log: Optional[Callable[[str], None]] = None) -> dict:
    """``neuroimagen.runs.training.train`` with the configured backend."""
    return training.train(cfg, out, stages, log=log, fit=fit_stage)


def reconstruct(cfg: Config, run_dir: str | Path, variants: Optional[Sequence[str]] = None,
                subjects: Optional[Sequence[int]] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """``neuroimagen.runs.evaluation.reconstruct`` with the configured backend."""
    return evaluation.reconstruct(cfg, run_dir, variants, subjects, log=log, execute=run_rows)


def ablation(cfg: Config, out: str | Path, variants: Optional[Sequence[str]] = None,
             subjects: Optional[Sequence[int]] = None, log: Optional[Callable[[str], None]] = None) -> Path:
    """``neuroimagen.runs.evaluation.ablation`` with the configured backends; with ``eval.protocol: loso`` (and no
    ``data.holdout_subject``: a fold is one ablation) followed by a fold per subject (``neuroimagen.runs.loso``)."""
    if cfg.eval.protocol == "loso" and cfg.data.holdout_subject is None:
        return loso.run_loso(cfg, out, variants, subjects, log=log, fit=fit_stage, execute=run_rows)["report"]
    return evaluation.ablation(cfg, out, variants, subjects, log=log, fit=fit_stage, execute=run_rows)
