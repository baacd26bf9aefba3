"""Seeded, stratified train/validation splits of a labelled training set."""

from __future__ import annotations

import torch

from lightning_prune.data.base import check_fraction

__all__ = ["stratified_split"]


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices into training and validation sets, class by class, as ``seed`` decides.

    ``round(val_fraction * n)`` samples go to validation (at least one, at most ``n - 1``). Every class
    contributes within one sample of its share, also on sets too small for every class to appear in both
    parts: within each class the samples are shuffled and spread evenly over ``[0, 1)``, and validation takes
    the samples with the lowest positions, ties broken at random. The result depends only on the labels,
    the fraction and the seed, never on global random state.

    Args:
        labels: 1-D integer labels of the ``n >= 2`` samples.
        val_fraction: Fraction of the samples held out for validation, in (0, 1).
        seed: Seed of the shuffling.

    Returns:
        Sorted training and validation indices: disjoint, and together ``0..n-1``.

    Example:
        >>> train, val = stratified_split(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), val_fraction=0.25, seed=0)
        >>> len(train), len(val), sorted(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])[val].tolist())
        (6, 2, [0, 1])
    """
    check_fraction("val_fraction", val_fraction)
    if labels.ndim != 1 or labels.numel() < 2 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"`labels` must be a 1-D integer tensor of at least 2 samples, got shape {tuple(labels.shape)} "
            f"and dtype {labels.dtype}."
        )
    n = labels.numel()
    n_val = min(max(round(val_fraction * n), 1), n - 1)
    generator = torch.Generator().manual_seed(seed)
    position = torch.empty(n, dtype=torch.float64)
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        shuffled = members[torch.randperm(members.numel(), generator=generator)]
        position[shuffled] = (torch.arange(members.numel(), dtype=torch.float64) + 0.5) / members.numel()
    # Random tie-breaks: sort by a random key first, then stably by position.
    order = torch.randperm(n, generator=generator)
    order = order[torch.sort(position[order], stable=True).indices]
    return torch.sort(order[n_val:]).values, torch.sort(order[:n_val]).values
