"""Samplers whose order depends only on a seed and the epoch, so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch, drawn from ``seed + epoch`` alone.

    A ``DataLoader(shuffle=True, generator=g)`` draws each epoch's order from the generator's running state,
    so a run resumed from a checkpoint at epoch 5 shuffles differently from one that never stopped. Lightning
    calls :meth:`set_epoch` at the start of every epoch (as it does for ``DistributedSampler``), which makes
    the order here a pure function of the seed and the epoch.

    Example:
        >>> s = EpochShuffleSampler(range(5), seed=0)
        >>> s.set_epoch(3); a = list(s)
        >>> s.set_epoch(0); s.set_epoch(3); a == list(s)
        True
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.n = len(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n
