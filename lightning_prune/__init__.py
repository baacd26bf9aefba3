"""lightning-prune: neural-network pruning for PyTorch Lightning.

Example:
    >>> from lightning_prune import PruningCallback
    >>> callback = PruningCallback(sparsity=0.9, schedule="cubic", start_epoch=2, end_epoch=10, ignore=["head"])
"""

from lightning_prune.callbacks import PruningCallback
from lightning_prune.importance import Importance, LpNormImportance, MagnitudeImportance
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
from lightning_prune.structured import (
    ChannelMaskSet,
    ChannelStructure,
    channel_groups,
    compact,
    compact_state,
    load_compact,
    prune_channels_,
    save_compact,
)
from lightning_prune.structures import Structure, Unstructured

__version__ = "0.1.0"

__all__ = [
    "ChannelMaskSet",
    "ChannelStructure",
    "CubicSchedule",
    "ExponentialSchedule",
    "Importance",
    "IterativeSchedule",
    "LinearSchedule",
    "LpNormImportance",
    "MagnitudeImportance",
    "MaskSet",
    "OneShotSchedule",
    "PruningCallback",
    "SparsitySchedule",
    "Structure",
    "Unstructured",
    "channel_groups",
    "compact",
    "compact_state",
    "load_compact",
    "prunable_parameters",
    "prune_channels_",
    "prune_lowest_",
    "save_compact",
]
