"""The optimizer arguments the LightningModules share, checked once."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_prune._helpers import is_int, is_number

#: The optimizers the LightningModules build by name.
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")


def check_training_arguments(
    model: object,
    lr: object,
    optimizer: object,
    momentum: float,
    weight_decay: float,
    lr_milestones: Sequence[int],
    lr_gamma: float,
) -> list[int]:
    """Check what every LightningModule of the package takes; returns the milestones as a sorted list of ints.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an argument is out of range (the message names it).

    Example:
        >>> check_training_arguments(nn.Linear(2, 2), 0.1, "sgd", 0.9, 0.0, (20, 10), 0.1)
        [10, 20]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not is_number(lr) or not lr > 0:
        raise ValueError(f"`lr` must be a number > 0, got {lr!r}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
    if not weight_decay >= 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
    milestones = tuple(lr_milestones)
    if not all(is_int(m) and m >= 0 for m in milestones):
        raise ValueError(
            f"`lr_milestones` must be a sequence of integer epochs >= 0, got {lr_milestones!r}. "
            "Hint: set it explicitly when it is derived from a pruning `end_epoch` of None."
        )
    if not lr_gamma > 0:
        raise ValueError(f"`lr_gamma` must be > 0, got {lr_gamma!r}.")
    return sorted(int(m) for m in milestones)
