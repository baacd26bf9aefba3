"""lightning-prune: neural-network pruning for PyTorch Lightning, on a plain-PyTorch engine.

The names a user needs first are importable from here; each is imported on first use (PEP 562), so
``from lightning_prune import MaskSet`` in a plain PyTorch script imports neither Lightning nor Hydra. Everything
else lives in the subpackages, named for what they hold: ``masks``, ``criteria``, ``structures``, ``training``,
``callbacks``, ``sensitivity``, ``deploy``, ``data``, ``models`` and ``app`` (the Hydra application).

Example:
    >>> from lightning_prune import PruningCallback
    >>> callback = PruningCallback(sparsity=0.9, schedule="cubic", start_epoch=2, end_epoch=10, ignore=["head"])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The names a user needs first, by the module that defines them.
_FIRST: dict[str, str] = {
    "PruningCallback": "lightning_prune.callbacks.pruning",
    "Pruner": "lightning_prune.pruner",
    "MaskSet": "lightning_prune.masks.maskset",
    "prunable_parameters": "lightning_prune.masks.params",
    "prune_lowest_": "lightning_prune.masks.selection",
    "build_schedule": "lightning_prune.schedules",
    "Unstructured": "lightning_prune.structures.unstructured",
    "ChannelStructure": "lightning_prune.structures.channel",
    "prune_channels_": "lightning_prune.structures.channel",
    "compact": "lightning_prune.deploy.compact",
    "save_compact": "lightning_prune.deploy.compact",
    "load_compact": "lightning_prune.deploy.compact",
    "save_sparse": "lightning_prune.deploy.archive",
    "load_sparse": "lightning_prune.deploy.archive",
    "L1RegularizationMixin": "lightning_prune.training.regularization",
    "DistillationCallback": "lightning_prune.callbacks.distillation",
    "prune_one_shot": "lightning_prune.oneshot.runner",
    "OneShotPruning": "lightning_prune.callbacks.oneshot",
    "DepthPruning": "lightning_prune.callbacks.depth",
}

#: Names that were importable from here before the package had subpackages; they keep working.
_MORE: dict[str, str] = {
    "APoZImportance": "lightning_prune.criteria.activation",
    "ActivationImportance": "lightning_prune.criteria.activation",
    "AtomicCheckpointIO": "lightning_prune.callbacks.checkpointing",
    "BNSlimmingMixin": "lightning_prune.training.regularization",
    "ChannelMaskSet": "lightning_prune.masks.channels",
    "CubicSchedule": "lightning_prune.schedules",
    "DistillationMixin": "lightning_prune.training.distillation",
    "ExponentialSchedule": "lightning_prune.schedules",
    "ExportError": "lightning_prune.deploy.export",
    "ExportReport": "lightning_prune.deploy.report",
    "FisherImportance": "lightning_prune.criteria.gradient",
    "GroupLassoMixin": "lightning_prune.training.regularization",
    "Importance": "lightning_prune.criteria.base",
    "InvariantViolation": "lightning_prune.callbacks.invariants",
    "IterativeSchedule": "lightning_prune.schedules",
    "KnowledgeDistillation": "lightning_prune.training.distillation",
    "LinearSchedule": "lightning_prune.schedules",
    "LpNormImportance": "lightning_prune.criteria.magnitude",
    "MagnitudeImportance": "lightning_prune.criteria.magnitude",
    "MaskInvariantChecker": "lightning_prune.callbacks.invariants",
    "OneShotSchedule": "lightning_prune.schedules",
    "RandomStateCheckpoint": "lightning_prune.callbacks.checkpointing",
    "SensitivityCallback": "lightning_prune.callbacks.sensitivity",
    "SensitivityTable": "lightning_prune.sensitivity.table",
    "SparseConv2d": "lightning_prune.deploy.sparse_layers",
    "SparseLinear": "lightning_prune.deploy.sparse_layers",
    "SparsitySchedule": "lightning_prune.schedules",
    "Structure": "lightning_prune.structures.base",
    "TaylorImportance": "lightning_prune.criteria.gradient",
    "TrainingLossMixin": "lightning_prune.training.loss",
    "atomic_save": "lightning_prune._files",
    "bn_parameters": "lightning_prune.training.regularization",
    "bn_slimming_penalty": "lightning_prune.training.regularization",
    "channel_groups": "lightning_prune.structures.tracing",
    "check_masks_applied": "lightning_prune.deploy.archive",
    "compact_state": "lightning_prune.deploy.compact",
    "distillation_loss": "lightning_prune.training.distillation",
    "export_model": "lightning_prune.deploy.report",
    "export_onnx": "lightning_prune.deploy.export",
    "export_program": "lightning_prune.deploy.export",
    "group_lasso_penalty": "lightning_prune.training.regularization",
    "inference_model": "lightning_prune.deploy.export",
    "kd_loss": "lightning_prune.training.distillation",
    "l1_penalty": "lightning_prune.training.regularization",
    "load_sparse_state_dict": "lightning_prune.deploy.archive",
    "regularized_parameters": "lightning_prune.training.regularization",
    "sparse_inference": "lightning_prune.deploy.kernels",
}

__all__ = [
    "ChannelStructure",
    "DepthPruning",
    "DistillationCallback",
    "L1RegularizationMixin",
    "MaskSet",
    "OneShotPruning",
    "Pruner",
    "PruningCallback",
    "Unstructured",
    "build_schedule",
    "compact",
    "load_compact",
    "load_sparse",
    "prunable_parameters",
    "prune_channels_",
    "prune_lowest_",
    "prune_one_shot",
    "save_compact",
    "save_sparse",
]


def __getattr__(name: str) -> Any:
    module = _FIRST.get(name) or _MORE.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_prune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FIRST, *_MORE})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from lightning_prune.callbacks.depth import DepthPruning
    from lightning_prune.callbacks.distillation import DistillationCallback
    from lightning_prune.callbacks.oneshot import OneShotPruning
    from lightning_prune.callbacks.pruning import PruningCallback
    from lightning_prune.deploy.archive import load_sparse, save_sparse
    from lightning_prune.deploy.compact import compact, load_compact, save_compact
    from lightning_prune.masks.maskset import MaskSet
    from lightning_prune.masks.params import prunable_parameters
    from lightning_prune.masks.selection import prune_lowest_
    from lightning_prune.oneshot.runner import prune_one_shot
    from lightning_prune.pruner import Pruner
    from lightning_prune.schedules import build_schedule
    from lightning_prune.structures.channel import ChannelStructure, prune_channels_
    from lightning_prune.structures.unstructured import Unstructured
    from lightning_prune.training.regularization import L1RegularizationMixin
