"""The run context: who this process is in a (possibly distributed) run, and how to wrap models."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class RunContext:
    """Rank, world size and device of this training process.

    With ``world_size > 1`` a ``torch.distributed`` process group must already be initialised (Ray
    Train does it: gloo on CPU, nccl on GPU); ``wrap`` then returns a DDP module.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, module: nn.Module) -> nn.Module:
        """Move to the device; DDP-wrap when distributed (gradients averaged across ranks)."""
        module = module.to(self.device)
        if not self.distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (identity when not distributed)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        t /= self.world_size
        return {k: float(v) for k, v in zip(keys, t.tolist())}


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers (so saved keys carry no prefixes)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def seed_everything(seed: int, epoch: int = 0, rank: int = 0) -> None:
    """Seed every RNG from (seed, epoch, rank): an epoch replays identically after a resume."""
    s = (seed * 1_000_003 + epoch * 9_176 + rank * 101) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
