"""What every stage shares: data preloaded as tensors, a batch iterator, state load/save plumbing.

A stage is (modules, objective, data, optimizers) plus the one shared ``fit()``; only the GAN's
alternating D/G step is stage-specific beyond ``train_step`` and ``validate``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import torch
from torch import nn

from neuroimagen.training.context import RunContext, unwrap


class TensorBatches:
    """Iterate a batch sampler over preloaded tensors, moving each batch to the device."""

    def __init__(self, tensors: dict[str, torch.Tensor], sampler, device: torch.device):
        self.tensors, self.sampler, self.device = tensors, sampler, device

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for idx in self.sampler:
            ix = torch.as_tensor(idx, dtype=torch.long)
            yield {k: v[ix].to(self.device, non_blocking=True) for k, v in self.tensors.items()}


def shuffled_index(n: int, seed: int) -> torch.Tensor:
    """A seeded derangement of ``range(n)``: item i takes item ``out[i]``'s input, never its own (n >= 2).

    One random cycle through a ``torch.randperm`` order, so every item is paired with another one: the shuffled-EEG
    controls of stages 2 and 3 then never score an item on its own EEG. (n,) int64; n = 1 gives [0].
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out


def batched(module: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 256) -> torch.Tensor:
    """Eval-mode forward of ``module`` over ``x`` in chunks; result on the CPU."""
    module = unwrap(module)
    was = module.training
    module.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            outs.append(module(x[i: i + batch].to(device)).float().cpu())
    module.train(was)
    return torch.cat(outs) if outs else torch.empty(0)


class Stage(ABC):
    """Base class: subclasses declare what the stage is (the one stage table: ``neuroimagen.stages.STAGES``
    is built from these attributes) and build their parts.

    ``name``            the stage's name in ``--stages``, ``run.json`` and the run directory
    ``requires``        stages whose finished outputs it reads (their models are handed in as ``inputs``)
    ``config_section``  its section under ``stages.`` (both semantic regressors share ``stages.semantic``)
    ``image_mode``      how the data splits carry images for it: ``'none'`` or ``'path'``
    ``caption_kind``    ``'label'`` / ``'image'``: the caption embeddings it regresses (``None``: no targets)
    ``select_metric``/``select_mode``  the validation metric that picks the exported epoch
    ``protocol``        how its validation metrics are computed (formatted with its config section)
    """

    name = "stage"
    requires: tuple[str, ...] = ()
    config_section = "stage"
    image_mode = "none"
    caption_kind: str | None = None
    select_metric = "val_loss"
    select_mode = "min"
    protocol = ""

    @classmethod
    def chance(cls, data: dict, val_metrics: dict) -> dict:
        """The reference level of its validation metrics (``data``: the checkpoint's data description)."""
        return {"chance": 1.0 / data["train"]["classes"]}

    @classmethod
    def guards(cls, data: dict, val_metrics: dict) -> dict:
        """Stage-specific sanity checks on the exported epoch's validation metrics (``data``: the checkpoint's data
        description): ``{guard name: {..numbers.., 'fired': bool, 'reason': str}}``, the name saying what a firing
        guard means (``collapsed``, ``ignores_eeg``). The stage-agnostic "did not
        learn" check is ``neuroimagen.training.loop.learning_guard``; ``neuroimagen.stages.stage_guards`` runs both."""
        return {}

    def __init__(self, cfg, ctx: RunContext, inputs: dict):
        self.cfg, self.ctx, self.inputs = cfg, ctx, inputs
        self.loader: TensorBatches
        self.sampler = None
        self._modules: dict[str, nn.Module] = {}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._specs: dict[str, dict] = {}
        self._data_desc: dict = {}

    # --- interface used by fit() -------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        for m in self._modules.values():
            m.train()

    def modules(self) -> dict[str, nn.Module]:
        return self._modules

    def export_modules(self) -> dict[str, nn.Module]:
        return self._modules

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def specs(self) -> dict[str, dict]:
        return self._specs

    def describe_data(self) -> dict:
        return self._data_desc

    def load_state(self, payload: dict) -> None:
        for name, m in self._modules.items():
            unwrap(m).load_state_dict(payload["modules"][name])
        for name, o in self._optimizers.items():
            o.load_state_dict(payload["optimizers"][name])

    def summary_images(self, epoch: int, epochs: int) -> dict[str, torch.Tensor]:
        """Sample images to track after ``epoch`` (0-based) of ``epochs``: tag -> one (3, H, W) image in [0, 1].
        Called on rank 0 only, after validation, when a tracker is on; must not touch other ranks or the RNGs
        that training draws from. None by default."""
        return {}

    @abstractmethod
    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step on ``batch``; returns named scalar losses."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """Metrics on the validation split (``val_*``); never touches test data."""


def describe_split(ds) -> dict:
    """Which data a stage saw: file, split, counts, subjects (recorded in every checkpoint)."""
    rec = ds.recording
    return {"source": rec.source, "format": rec.format, "notes": rec.notes, "n": len(ds),
            "subjects": sorted(set(ds.subjects.tolist())), "classes": rec.num_classes}
