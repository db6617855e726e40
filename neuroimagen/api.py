"""The Python API: a trained run as objects, and EEG tensors in, images out, without a dataset file.

    from neuroimagen import Run

    run = Run.load("demo-out")                         # the run's config, trained stages and diffusion model
    eeg, labels = run.eeg("test")                      # (N, C, T): the run's own EEG as the stages see it
    shown = run.images("test")                         # (N, 3, S, S): the images those trials showed
    images = run.reconstruct(eeg[:4], variant="L+I", seeds=[0, 1])  # (4, 2, 3, R, R) in [0, 1]
    maps = run.saliency(eeg[:4])                       # (4, 3, r, r): stage 2's G(z, f(x)), in [0, 1]

``reconstruct`` runs the same Decode and Generate callables as ``neuroimagen reconstruct`` (one code path): the
saliency map of EEG ``b`` is G(z, f(x_b)) with z drawn from ``z_seed`` (one map per EEG, as evaluation does),
the prompt embedding is what the variant's semantics ask for (stage 3's prediction, or the empty caption), and
image ``(b, s)`` is the frozen LDM's img2img (or text-to-image for ``init: noise``) from that map with its
noise seeded by ``seeds[s]``. Variants that need the ground truth (``oracle``: the true image or caption) or
another trial (``other-class``) need the dataset, not only EEG: they are refused with the reason.

The EEG is taken in the form the stages were trained on: ``(B, C, T)`` float, windowed to ``data.time_window``
and normalised as the run's reader does (``Recording.segment``); ``Run.eeg(split)`` returns the run's own data
in that form. A tensor of another shape is one ``ConfigError`` line naming the expected one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from neuroimagen.config import CONFIG_FILENAME, Config, load_config
from neuroimagen.data.datasets import load_splits
from neuroimagen.data.recording import load_image
from neuroimagen.errors import ConfigError
from neuroimagen.models.saliency_gan import sample_z
from neuroimagen.reconstruction.decode import Decode
from neuroimagen.reconstruction.factory import RunSources, check_text_encoder, load_generate, load_module, stage_models
from neuroimagen.reconstruction.rows import SEMANTIC_STAGE
from neuroimagen.runs.evaluation import prepare_ldm
from neuroimagen.runs.training import read_run
from neuroimagen.stages import STAGE_ORDER
from neuroimagen.stages.semantic import text_encoder_for

__all__ = ["Run"]


class Run:
    """A trained run directory: its config, stage modules (eval mode, no gradients) and diffusion model."""

    def __init__(self, run_dir: Path, cfg: Config, record: dict, device: str):
        self.run_dir, self.cfg, self.record, self.device = run_dir, cfg, record, device
        self.stages = [s for s in STAGE_ORDER if s in record.get("stages", {})]
        models = stage_models(run_dir, record, self.stages)
        self.encoder = self.generator = None
        self.z_dim, self.resolution = cfg.stages.saliency.z_dim, cfg.stages.saliency.resolution
        if "encoder" in models:
            self.encoder, spec = load_module(models["encoder"], "encoder")
            self.n_chans, self.n_times = spec["kwargs"]["n_chans"], spec["kwargs"]["n_times"]
        if "saliency" in models:
            self.generator, gspec = load_module(models["saliency"], "generator")
            self.z_dim, self.resolution = gspec["kwargs"]["z_dim"], gspec["kwargs"]["resolution"]
        self.regressors = {kind: load_module(models[stage], "regressor")[0]
                           for kind, stage in SEMANTIC_STAGE.items() if stage in models}
        self._models = models
        self._generate = None
        self._text = None
        self._snapshot: Optional[str] = None

    @classmethod
    def load(cls, run_dir: str | os.PathLike, overrides: Sequence[str] = (), device: Optional[str] = None) -> "Run":
        """Open a run written by ``neuroimagen train`` / ``demo``. ``overrides``: ``--set``-style changes to its
        config (e.g. ``ldm.num_inference_steps=20``); ``device``: ``cpu`` or ``cuda`` (default: ``eval.use_gpu``)."""
        run_dir = Path(run_dir).expanduser().resolve()
        if not (run_dir / CONFIG_FILENAME).is_file():
            raise ConfigError(f"{run_dir}: not a neuroimagen run (no {CONFIG_FILENAME}); train one with "
                              f"`neuroimagen train --out {run_dir}` or `neuroimagen demo --quick --out {run_dir}`")
        cfg = load_config(run_dir / CONFIG_FILENAME, overrides)
        record = read_run(run_dir)
        if not record.get("stages"):
            raise ConfigError(f"{run_dir}: no trained stage (run.json lists none); run `neuroimagen train --out {run_dir}`")
        return cls(run_dir, cfg, record, device or ("cuda" if cfg.eval.use_gpu else "cpu"))

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, stages={self.stages})"

    # ------------------------------------------------------------------------------------------------ data

    def eeg(self, split: str = "test") -> tuple[torch.Tensor, np.ndarray]:
        """The run's own EEG of ``split`` as the stages see it, (N, C, T) float32, and its labels (N,)."""
        ds = load_splits(self.cfg.data, image_mode="none")[split]
        return ds.eeg_tensor(), ds.recording.labels[ds.indices]

    def images(self, split: str = "test", size: Optional[int] = None) -> torch.Tensor:
        """The images shown for the trials of ``split`` (the order of :meth:`eeg`): (N, 3, size, size) in [0, 1]
        (``size`` default: ``data.image_size``)."""
        ds = load_splits(self.cfg.data, image_mode="path")[split]
        rec = ds.recording
        return torch.stack([load_image(rec.image_paths[int(j)], size or self.cfg.data.image_size) for j in ds.indices])

    def _check_eeg(self, eeg: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(eeg)
        if x.dim() == 2:
            x = x[None]
        want = (getattr(self, "n_chans", None), getattr(self, "n_times", None))
        if x.dim() != 3 or (want[0] is not None and tuple(x.shape[1:]) != want):
            raise ConfigError(f"eeg: expected a (B, {want[0]}, {want[1]}) tensor (channels x samples the stages were "
                              f"trained on, data.time_window applied), got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ConfigError("eeg: contains NaN or infinite values")
        return x.float().contiguous()

    # ------------------------------------------------------------------------------------------- stages 1-3

    @torch.no_grad()
    def features(self, eeg: torch.Tensor) -> torch.Tensor:
        """Stage 1's f_theta(x): (B, D)."""
        if self.encoder is None:
            raise ConfigError(f"{self.run_dir}: stage 'encoder' is not trained")
        return self.encoder(self._check_eeg(eeg))

    @torch.no_grad()
    def saliency(self, eeg: torch.Tensor, z_seed: int = 0) -> torch.Tensor:
        """Stage 2's saliency maps G(z, f(x)) in [0, 1]: (B, 3, r, r); z drawn once from ``z_seed`` for every EEG."""
        if self.generator is None:
            raise ConfigError(f"{self.run_dir}: stage 'saliency' is not trained")
        f = self.features(eeg)
        z = sample_z(1, self.z_dim, generator=torch.Generator().manual_seed(int(z_seed))).expand(f.shape[0], -1)
        return ((self.generator(z, f) + 1) / 2).clamp(0, 1)

    # --------------------------------------------------------------------------------------- reconstruction

    def _generator(self):
        if self._generate is None:
            splits = load_splits(self.cfg.data, image_mode="path")
            self._snapshot, _ = prepare_ldm(self.cfg, self.run_dir, splits, log=lambda m: None)
            check_text_encoder(self._models, self._snapshot, configured=self.cfg.text_encoder.pretrained)
            src = RunSources(run_dir=str(self.run_dir), snapshot=self._snapshot, classifier={}, models=self._models,
                             device=self.device)
            self._generate = load_generate(self.cfg, src)
        return self._generate

    def reconstruct(self, eeg: torch.Tensor, variant: str = "L+I", seeds: int | Sequence[int] = (0,),
                    z_seed: int = 0) -> torch.Tensor:
        """Images of ``eeg`` under ``variant`` (``eval.definitions``): (B, len(seeds), 3, R, R) in [0, 1]."""
        names = [d.name for d in self.cfg.eval.definitions]
        if variant not in names:
            raise ConfigError(f"variant: unknown '{variant}' (defined: {', '.join(names)})")
        v = self.cfg.eval.variant(variant)
        if v.init == "gt" or v.semantics.startswith("true_") or v.eeg != "own":
            raise ConfigError(f"variant '{variant}' needs the dataset ({v.description}); Run.reconstruct takes EEG only: "
                              f"use one of {', '.join(n for n in names if self._eeg_only(n))}")
        seeds = [int(seeds)] if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
        if not seeds:
            raise ConfigError("seeds: expected at least one seed (one image per seed and EEG)")
        x = self._check_eeg(eeg)
        B = x.shape[0]
        if self._text is None:
            self._text = text_encoder_for(self.cfg)
        decode = Decode(segment=lambda j: x[j], text=self._text, z_dim=self.z_dim,
                        resolution=self.resolution, encoder=self.encoder, generator=self.generator,
                        regressors=self.regressors)
        batch = {"item": np.arange(B), "eeg_item": np.arange(B), "variant": np.array([variant] * B, dtype=object),
                 "init_kind": np.array([v.init] * B, dtype=object), "semantics": np.array([v.semantics] * B, dtype=object),
                 "seed_z": np.full(B, int(z_seed))}
        decoded = decode(batch)
        generate = self._generator()
        out = []
        for s in seeds:
            rows = {"init_kind": decoded["init_kind"], "prompt": decoded["prompt"], "init": decoded["init"],
                    "seed_noise": np.full(B, s)}
            out.append(torch.from_numpy(generate(rows)["image"]))  # (B, 3, R, R)
        return torch.stack(out, 1).clamp(0, 1)  # (B, S, 3, R, R)

    def _eeg_only(self, name: str) -> bool:
        v = self.cfg.eval.variant(name)
        return v.init != "gt" and not v.semantics.startswith("true_") and v.eeg == "own"
