"""Training-time pieces of pruning that live in the loss or the optimizer: sparsity-inducing penalties, knowledge
distillation from the dense model, and fine-tuning at a lower learning rate.

* :mod:`~lightning_prune.training.loss`: :class:`TrainingLossMixin`, the base of the loss mixins;
* :mod:`~lightning_prune.training.regularization`: L1, group-lasso and BN-slimming penalties and their mixins;
* :mod:`~lightning_prune.training.distillation`: the distillation losses and :class:`DistillationMixin`;
* :mod:`~lightning_prune.training.finetune`: :func:`scale_learning_rates`.

Example:
    >>> import torch
    >>> float(l1_penalty([torch.tensor([-1.0, 2.0])]))
    3.0
"""

from lightning_prune.training.distillation import (
    DistillationMixin,
    KnowledgeDistillation,
    check_alpha,
    check_temperature,
    distillation_loss,
    kd_loss,
)
from lightning_prune.training.finetune import scale_learning_rates
from lightning_prune.training.loss import ForwardCapture, TrainingLossMixin
from lightning_prune.training.regularization import (
    PENALTIES,
    BNSlimmingMixin,
    GroupLassoMixin,
    L1RegularizationMixin,
    RegularizationKind,
    bn_parameters,
    bn_slimming_penalty,
    group_lasso_penalty,
    l1_penalty,
    regularized_parameters,
)

__all__ = [
    "PENALTIES",
    "BNSlimmingMixin",
    "DistillationMixin",
    "ForwardCapture",
    "GroupLassoMixin",
    "KnowledgeDistillation",
    "L1RegularizationMixin",
    "RegularizationKind",
    "TrainingLossMixin",
    "bn_parameters",
    "bn_slimming_penalty",
    "check_alpha",
    "check_temperature",
    "distillation_loss",
    "group_lasso_penalty",
    "kd_loss",
    "l1_penalty",
    "regularized_parameters",
    "scale_learning_rates",
]
