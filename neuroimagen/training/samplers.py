"""Batch samplers that shard across ranks and replay identically for a given (seed, epoch).

Both are *world-size invariant*: the global batch of step s is the same set of samples whether one
worker takes it whole or W workers take 1/W each — which is what makes DDP with W workers x batch b
equal to one worker with batch W*b.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def _generator(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


class GlobalBatchSampler(Sampler[list[int]]):
    """Shuffled batches of ``batch_size`` per rank; global batch = batch_size x world_size.

    Each epoch draws one permutation of ``range(n)``; global batch s is ``perm[s*G:(s+1)*G]`` and
    rank r takes its r-th contiguous slice. The last incomplete global batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if n < batch_size * world_size:
            raise ValueError(f"{n} samples cannot fill one global batch of {batch_size} x {world_size} workers")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[int]]:
        perm = _generator(self.seed, self.epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
        G = self.batch_size * self.world
        for s in range(len(self)):
            start = s * G + self.rank * self.batch_size
            yield perm[start: start + self.batch_size].tolist()


class BalancedBatchSampler(Sampler[list[int]]):
    """Class-balanced batches for triplet mining: P classes x K samples, every batch has positives.

    Per epoch, every class keeps a shuffled queue of its samples (recycled when exhausted); each
    global step draws ``world_size`` x P classes without replacement where possible and K samples
    from each, and rank r takes its slice. ``len`` is about one pass over the data.
    """

    def __init__(self, labels: Sequence[int] | torch.Tensor, classes_per_batch: int, samples_per_class: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        labels = np.asarray(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
        self.by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        if len(self.by_class) < 2:
            raise ValueError("class-balanced batches need at least 2 classes")
        self.P = min(classes_per_batch, len(self.by_class))
        self.K = samples_per_class
        self.n = len(labels)
        self.seed, self.rank, self.world = seed, rank, world_size
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.P * self.K

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, self.n // (self.batch_size * self.world))

    def __iter__(self) -> Iterator[list[int]]:
        rng = _generator(self.seed, self.epoch)
        classes = np.array(sorted(self.by_class))
        queues = {c: list(rng.permutation(ix)) for c, ix in self.by_class.items()}

        def take(c: int) -> list[int]:
            out = []
            for _ in range(self.K):
                if not queues[c]:
                    queues[c] = list(rng.permutation(self.by_class[c]))
                out.append(int(queues[c].pop()))
            return out

        for _ in range(len(self)):
            batches = []
            for _w in range(self.world):
                chosen = rng.choice(classes, size=self.P, replace=False)
                batches.append([i for c in chosen for i in take(int(c))])
            yield batches[self.rank]
