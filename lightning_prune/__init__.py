"""lightning-prune: neural-network pruning for PyTorch Lightning.

Example:
    >>> from lightning_prune import PruningCallback
    >>> callback = PruningCallback(sparsity=0.9, schedule="cubic", start_epoch=2, end_epoch=10, ignore=["head"])
"""

from lightning_prune.callbacks import PruningCallback
from lightning_prune.distillation import (
    DistillationCallback,
    DistillationMixin,
    KnowledgeDistillation,
    distillation_loss,
    kd_loss,
)
from lightning_prune.importance import Importance, LpNormImportance, MagnitudeImportance
from lightning_prune.masking import MaskSet, prunable_parameters
from lightning_prune.regularization import (
    BNSlimmingMixin,
    GroupLassoMixin,
    L1RegularizationMixin,
    bn_parameters,
    bn_slimming_penalty,
    group_lasso_penalty,
    l1_penalty,
    regularized_parameters,
)
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
from lightning_prune.training_loss import TrainingLossMixin

__version__ = "0.1.0"

__all__ = [
    "BNSlimmingMixin",
    "ChannelMaskSet",
    "ChannelStructure",
    "CubicSchedule",
    "DistillationCallback",
    "DistillationMixin",
    "ExponentialSchedule",
    "GroupLassoMixin",
    "Importance",
    "IterativeSchedule",
    "KnowledgeDistillation",
    "L1RegularizationMixin",
    "LinearSchedule",
    "LpNormImportance",
    "MagnitudeImportance",
    "MaskSet",
    "OneShotSchedule",
    "PruningCallback",
    "SparsitySchedule",
    "Structure",
    "TrainingLossMixin",
    "Unstructured",
    "bn_parameters",
    "bn_slimming_penalty",
    "channel_groups",
    "compact",
    "compact_state",
    "distillation_loss",
    "group_lasso_penalty",
    "kd_loss",
    "l1_penalty",
    "load_compact",
    "prunable_parameters",
    "prune_channels_",
    "prune_lowest_",
    "regularized_parameters",
    "save_compact",
]
