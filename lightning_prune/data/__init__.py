"""Datamodules for the reference experiments."""

from lightning_prune.data.digits import DigitsDataModule
from lightning_prune.data.samplers import EpochShuffleSampler

__all__ = ["DigitsDataModule", "EpochShuffleSampler"]
