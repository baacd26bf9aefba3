"""lightning-prune: neural-network pruning for PyTorch Lightning.

Example:
    >>> from lightning_prune import PruningCallback
    >>> callback = PruningCallback(sparsity=0.9, schedule="cubic", start_epoch=2, end_epoch=10, ignore=["head"])
"""

from lightning_prune.activations import ActivationImportance, APoZImportance
from lightning_prune.callbacks import PruningCallback
from lightning_prune.checkpointing import AtomicCheckpointIO, RandomStateCheckpoint, atomic_save
from lightning_prune.distillation import (
    DistillationCallback,
    DistillationMixin,
    KnowledgeDistillation,
    distillation_loss,
    kd_loss,
)
from lightning_prune.export import ExportError, export_onnx, export_program, inference_model
from lightning_prune.export_report import ExportReport, export_model
from lightning_prune.gradients import FisherImportance, TaylorImportance
from lightning_prune.importance import Importance, LpNormImportance, MagnitudeImportance
from lightning_prune.invariants import InvariantViolation, MaskInvariantChecker
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
from lightning_prune.sensitivity import SensitivityCallback, SensitivityTable
from lightning_prune.sparse_archive import check_masks_applied, load_sparse, load_sparse_state_dict, save_sparse
from lightning_prune.sparse_inference import SparseConv2d, SparseLinear, sparse_inference
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
    "APoZImportance",
    "ActivationImportance",
    "AtomicCheckpointIO",
    "BNSlimmingMixin",
    "ChannelMaskSet",
    "ChannelStructure",
    "CubicSchedule",
    "DistillationCallback",
    "DistillationMixin",
    "ExponentialSchedule",
    "ExportError",
    "ExportReport",
    "FisherImportance",
    "GroupLassoMixin",
    "Importance",
    "InvariantViolation",
    "IterativeSchedule",
    "KnowledgeDistillation",
    "L1RegularizationMixin",
    "LinearSchedule",
    "LpNormImportance",
    "MagnitudeImportance",
    "MaskInvariantChecker",
    "MaskSet",
    "OneShotSchedule",
    "PruningCallback",
    "RandomStateCheckpoint",
    "SensitivityCallback",
    "SensitivityTable",
    "SparseConv2d",
    "SparseLinear",
    "SparsitySchedule",
    "Structure",
    "TaylorImportance",
    "TrainingLossMixin",
    "Unstructured",
    "atomic_save",
    "bn_parameters",
    "bn_slimming_penalty",
    "channel_groups",
    "check_masks_applied",
    "compact",
    "compact_state",
    "distillation_loss",
    "export_model",
    "export_onnx",
    "export_program",
    "group_lasso_penalty",
    "inference_model",
    "kd_loss",
    "l1_penalty",
    "load_compact",
    "load_sparse",
    "load_sparse_state_dict",
    "prunable_parameters",
    "prune_channels_",
    "prune_lowest_",
    "regularized_parameters",
    "save_compact",
    "save_sparse",
    "sparse_inference",
]
