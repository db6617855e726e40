"""The run context: who this process is in a (possibly distributed) run, and how to wrap models."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from neuroimagen.training.collectives import convert_sync_batchnorm, gather


@dataclass
class RunContext:
    """Rank, world size and device of this training process.

    With ``world_size > 1`` a ``torch.distributed`` process group must already be initialised (Ray
    Train does it: gloo on CPU, nccl on GPU); ``wrap`` then returns a DDP module.

    Performance options (``train.precision``, ``train.channels_last``, ``train.compile``) live here so
    that every stage applies them the same way: ``autocast()`` around forward passes, ``wrap(image=True)``
    and ``image_batch`` for the image models, and ``torch.compile`` on top of DDP in ``wrap``. Weights,
    optimiser state, losses and validation stay in float32 whatever the precision.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # "fp32" | "bf16" (autocast)
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: expected 'fp32' or 'bf16', got {self.precision!r}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, module: nn.Module, image: bool = False) -> nn.Module:
        """Move to the device (channels_last for an ``image`` model when asked); when distributed, make every
        BatchNorm cross-rank and DDP-wrap (gradients averaged across ranks); ``torch.compile`` the result when
        asked (compile after DDP, as PyTorch recommends, so DDP's bucketing sees the compiled graph's gradients).

        Cross-rank BatchNorm (``collectives.convert_sync_batchnorm``) normalises with the statistics of the
        global batch, so W workers x batch b train exactly like one worker with batch W*b; per-rank statistics
        would differ from those of the global batch."""
        trainable = any(p.requires_grad for p in module.parameters())
        if self.distributed and trainable:
            module = convert_sync_batchnorm(module, self.device)
        module = module.to(self.device)
        if image and self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.distributed and trainable:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        if self.compile and trainable:
            module = torch.compile(module)
        return module

    def autocast(self):
        """``torch.autocast`` to bfloat16 on this device for ``precision='bf16'``; a no-op otherwise."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def image_batch(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch (B, C, H, W) in the memory format of the image models."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` (n_r, ...) from every rank, concatenated in rank order (the global batch when the
        sampler shards it contiguously); gradients flow back to this rank's rows. Identity when not
        distributed. A loss computed on the result by every rank gives, after DDP's averaging, the gradient of
        that loss on the global batch (``collectives``)."""
        return gather(x) if self.distributed else x

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


def perf_options(tc) -> dict:
    """The ``RunContext`` performance keywords from a ``TrainConfig``."""
    return {"precision": tc.precision, "channels_last": tc.channels_last, "compile": tc.compile}


def seed_everything(seed: int, epoch: int = 0, rank: int = 0) -> None:
    """Seed every RNG from (seed, epoch, rank): an epoch replays identically after a resume."""
    s = (seed * 1_000_003 + epoch * 9_176 + rank * 101) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (``taskset``, a cgroup cpuset, a
    batch scheduler's allocation), else every core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
