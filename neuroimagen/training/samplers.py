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

    One *global* batch per step, drawn independently of the number of workers and sharded across them:
    each step draws ``min(P x world_size, classes)`` distinct classes and up to K distinct samples of
    each (P = ``classes_per_batch`` is per worker, like ``batch_size`` in :class:`GlobalBatchSampler`),
    lists them class by class and gives rank r the r-th of ``world_size`` contiguous, near-equal slices.
    So W workers with P classes each see, together, exactly the batch one worker with P x W classes
    sees, which is what makes DDP with W workers equal one worker with a W times larger batch (the
    encoder stage mines the gathered global batch, see ``RunContext.gather``).

    No trial appears twice in a batch (a repeat would be a "positive" at distance 0): a class with
    fewer than K samples contributes all it has, so classes can have unequal counts in a batch and a
    class with a single sample only supplies negatives (the triplet mining masks handle both). Per
    epoch every class keeps a shuffled queue of its samples, refilled with a fresh permutation when it
    runs short (never re-taking a sample already in the batch); ``len`` is about one pass over the data.
    """

    def __init__(self, labels: Sequence[int] | torch.Tensor, classes_per_batch: int, samples_per_class: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        labels = np.asarray(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
        self.by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        if len(self.by_class) < 2:
            raise ValueError("class-balanced batches need at least 2 classes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} workers")
        self.P = min(classes_per_batch * world_size, len(self.by_class))  # classes of the global batch
        self.K = samples_per_class
        self.n = len(labels)
        self.seed, self.rank, self.world = seed, rank, world_size
        self.epoch = 0
        smallest = sum(sorted(min(self.K, len(ix)) for ix in self.by_class.values())[: self.P])
        if smallest < world_size:
            raise ValueError(f"a class-balanced global batch can hold as few as {smallest} samples, too few to give "
                             f"each of {world_size} workers one")

    @property
    def batch_size(self) -> int:
        """Nominal samples per worker and step (P x K; fewer when a drawn class has fewer than K samples)."""
        return self.P * self.K // self.world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, self.n // (self.P * self.K))

    def __iter__(self) -> Iterator[list[int]]:
        rng = _generator(self.seed, self.epoch)
        classes = np.array(sorted(self.by_class))
        queues = {c: [int(i) for i in rng.permutation(ix)] for c, ix in self.by_class.items()}

        def take(c: int) -> list[int]:
            """Up to K distinct samples of class c from its queue (refilled without re-taking any of them)."""
            k = min(self.K, len(self.by_class[c]))
            out, queues[c] = queues[c][:k], queues[c][k:]
            if len(out) < k:
                perm = [int(i) for i in rng.permutation(self.by_class[c])]
                fresh = [i for i in perm if i not in out][: k - len(out)]
                queues[c] = [i for i in perm if i not in fresh]
                out += fresh
            return out

        for _ in range(len(self)):
            chosen = rng.choice(classes, size=self.P, replace=False)
            batch = [i for c in chosen for i in take(int(c))]  # the global batch, class by class
            bounds = np.linspace(0, len(batch), self.world + 1).round().astype(int)
            yield batch[bounds[self.rank]: bounds[self.rank + 1]]


class DistinctGroupBatchSampler(Sampler[list[int]]):
    """Shuffled batches in which no two rows share a group (stage clip_image: a group = one image, whose rows are
    its subjects' and repetitions' EEG), so the contrastive loss never meets a false negative.

    Each epoch draws one permutation of the rows and fills global batches of ``batch_size x world_size`` from it
    in order, deferring a row whose group is already in the batch being filled to the next one; rank r takes the
    r-th contiguous slice of each global batch (world-size invariant, like ``GlobalBatchSampler``). There are at
    most ``n // (batch_size x world_size)`` global batches (fewer when the last rows are too few distinct images to
    fill one); rows left over (the tail, and deferred rows that found no room) wait for another epoch's
    permutation.
    """

    def __init__(self, groups: Sequence[int] | torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.groups = np.asarray(groups, dtype=np.int64)
        n, distinct = len(self.groups), len(np.unique(self.groups))
        G = batch_size * world_size
        if distinct < G:
            raise ValueError(f"{distinct} distinct images cannot fill one global batch of {batch_size} x "
                             f"{world_size} workers without repeating an image")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.global_batches())

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (each ``batch_size x world_size`` rows of distinct groups)."""
        perm = _generator(self.seed, self.epoch).permutation(self.n).tolist()
        G, out, deferred, pos = self.batch_size * self.world, [], [], 0
        for _ in range(self.n // G):
            batch, seen, still = [], set(), []
            for i in deferred:  # rows put off by earlier batches come first
                if len(batch) < G and int(self.groups[i]) not in seen:
                    batch.append(i)
                    seen.add(int(self.groups[i]))
                else:
                    still.append(i)
            while len(batch) < G and pos < len(perm):
                i = perm[pos]
                pos += 1
                if int(self.groups[i]) in seen:
                    still.append(i)
                else:
                    batch.append(i)
                    seen.add(int(self.groups[i]))
            if len(batch) < G:
                break
            out.append(batch)
            deferred = still
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            start = self.rank * self.batch_size
            yield batch[start: start + self.batch_size]
