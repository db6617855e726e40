"""Which implementation runs the work: the one place that maps ``train.backend`` / ``eval.backend`` to local or Ray.

The runs layer (``neuroimagen.runs``) never chooses: it takes these callables as parameters. The CLI and the
jobs pass them in; a notebook can call the runs functions with the local implementations directly.

    fit_stage   a ``FitStage``: ``fit()`` in this process (``train.backend: local``) or on Ray Train (``ray``)

Ray is imported only when a Ray backend is asked for, so the CLI starts fast and ``local`` runs without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from neuroimagen.config import Config
from neuroimagen.runs import training


def fit_stage(name: str, cfg: Config, inputs: dict, run_dir: Path, log: Callable[[str], None]) -> dict:
    """Fit one stage with the backend ``cfg.train.backend`` names (see ``neuroimagen.runs.training.FitStage``)."""
    if cfg.train.backend == "local":
        return training.fit_local(name, cfg, inputs, run_dir, log)
    from neuroimagen.distributed.train import fit_on_ray  # noqa: PLC0415 - the Ray edge, only when asked for

    return fit_on_ray(name, cfg, inputs, run_dir, log)


def train(cfg: Config, out: str | Path, stages: Optional[Sequence[str]] = None,
          log: Optional[Callable[[str], None]] = None) -> dict:
    """``neuroimagen.runs.training.train`` with the configured backend."""
    return training.train(cfg, out, stages, log=log, fit=fit_stage)
