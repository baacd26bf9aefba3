"""lightning-prune: neural-network pruning for PyTorch Lightning.

Example:
    >>> from lightning_prune import PruningCallback
    >>> callback = PruningCallback(sparsity=0.9, schedule="cubic", start_epoch=2, end_epoch=10, ignore=["head"])
"""

from lightning_prune.callbacks import PruningCallback
from lightning_prune.importance import Importance, MagnitudeImportance
from lightning_prune.masking import MaskSet, prunable_parameters
from lightning_prune.schedules import (
    CubicSchedule,
    ExponentialSchedule,
    IterativeSchedule,
    LinearSchedule,
    OneShotSchedule,
    SparsitySchedule,
)
from lightning_prune.selection import prune_lowest_
from lightning_prune.structures import Structure, Unstructured

__version__ = "0.1.0"

__all__ = [
    "CubicSchedule",
    "ExponentialSchedule",
    "Importance",
    "IterativeSchedule",
    "LinearSchedule",
    "MagnitudeImportance",
    "MaskSet",
    "OneShotSchedule",
    "PruningCallback",
    "SparsitySchedule",
    "Structure",
    "Unstructured",
    "prunable_parameters",
    "prune_lowest_",
]
