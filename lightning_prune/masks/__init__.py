"""Masks: which weights are prunable, the boolean masks that keep pruned weights exactly zero, and the exact
selection that grows them.

* :mod:`~lightning_prune.masks.params`: the prunable parameters of a model (:func:`prunable_parameters`);
* :mod:`~lightning_prune.masks.maskset`: :class:`MaskSet`, one boolean keep-mask per parameter and the hooks that
  enforce them while training;
* :mod:`~lightning_prune.masks.channels`: channel groups and :class:`ChannelMaskSet`;
* :mod:`~lightning_prune.masks.selection`: :func:`prune_lowest_`, the exact streaming k-lowest selection;
* :mod:`~lightning_prune.masks.distributed`: the same masks on every process;
* :mod:`~lightning_prune.masks.sharded`: :class:`ShardedMaskSet`, masks of FSDP2's row shards.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 2))
    >>> masks = MaskSet(prunable_parameters(net))
    >>> prune_lowest_([net[0].weight.detach().abs()], masks.masks, 4); masks.apply_()
    >>> masks.sparsity()
    0.5
"""

from lightning_prune.masks.channels import ChannelGroup, ChannelMaskSet, ChannelSlice
from lightning_prune.masks.distributed import all_reduce_sum_, broadcast_masks_, rank_digest, ranks_agree, world_size
from lightning_prune.masks.maskset import MaskSet, non_finite_parameters, sparsity_table
from lightning_prune.masks.params import (
    PRUNABLE_TYPES,
    Prunable,
    check_patterns,
    matching_modules,
    name_matches,
    prunable_parameters,
)
from lightning_prune.masks.selection import prune_lowest_
from lightning_prune.masks.sharded import ShardedMaskSet, mask_set_for

__all__ = [
    "PRUNABLE_TYPES",
    "ChannelGroup",
    "ChannelMaskSet",
    "ChannelSlice",
    "MaskSet",
    "Prunable",
    "ShardedMaskSet",
    "all_reduce_sum_",
    "broadcast_masks_",
    "check_patterns",
    "mask_set_for",
    "matching_modules",
    "name_matches",
    "non_finite_parameters",
    "prunable_parameters",
    "prune_lowest_",
    "rank_digest",
    "ranks_agree",
    "sparsity_table",
    "world_size",
]
