"""Unstructured pruning: single weights, selected exactly across layers or within each.

Example:
    >>> from torch import nn
    >>> from lightning_prune.criteria import MagnitudeImportance
    >>> from lightning_prune.masks import MaskSet, prunable_parameters
    >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    >>> masks = MaskSet(prunable_parameters(net))
    >>> Unstructured().prune_(masks, MagnitudeImportance(), sparsity=0.3, scope="layer")
    >>> masks.layer_sparsity()
    {'0.weight': 0.3, '1.weight': 0.3}
"""

from __future__ import annotations

import torch

from lightning_prune.criteria.base import Importance
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.masks.selection import prune_lowest_
from lightning_prune.structures.base import Scope, Structure, Target, layer_targets


class Unstructured(Structure):
    """Prune individual weights: exactly ``round(sparsity * N)`` zeros.

    ``N`` counts every masked entry (``scope="global"``: one threshold across layers) or each tensor's own
    (``scope="layer"``). The lowest-scored kept entries go first, ties to the earliest (tensor order, then flat
    index). A target below the current sparsity changes nothing. A mapping ``{layer-name pattern: sparsity}``
    (with ``scope="layer"``) prunes each tensor to its own target, ``round(target * N_layer)`` zeros.
    """

    name = "unstructured"

    def check_importance(self, importance: Importance) -> None:
        """Refuse criteria that score whole channels only (``apoz``, ``activation``)."""
        if not getattr(importance, "scores_entries", True):
            raise ValueError(
                f"structure='unstructured' scores single weights, but {importance!r} scores whole channels from "
                "their activations. Use structure='channel' with it, or a criterion that scores single weights: "
                "'magnitude', 'l1', 'l2', 'taylor' or 'fisher'."
            )

    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        per_layer = layer_targets(masks.names, sparsity, scope)
        indices = list(range(len(masks.params)))
        groups = [indices] if per_layer is None and scope == "global" else [[i] for i in indices]
        single = 0.0 if per_layer is not None else float(sparsity)  # type: ignore[arg-type]
        # Over the whole tensors: with sharded masks, each rank selects among its shards, exactly over all of them.
        numel, pruned_now = masks.entry_counts()
        for group in groups:
            target = single if per_layer is None else per_layer[group[0]]
            total = sum(numel[i] for i in group)
            pruned = sum(pruned_now[i] for i in group)
            k = round(target * total) - pruned
            if k <= 0:
                continue
            local = masks.local_tensors()
            if importance.pointwise:
                scores = [local[i] for i in group]
                transform = importance.transform_
            else:
                scores = [_scores(importance, masks.names[i], local[i]) for i in group]
                transform = None
            prune_lowest_(
                [s.contiguous() for s in scores],
                [masks.masks[i] for i in group],
                k,
                transform=transform,
                names=[masks.names[i] for i in group],
                **masks.selection_args(group),
            )
        masks.apply_()


def _scores(importance: Importance, name: str, param: torch.Tensor) -> torch.Tensor:
    """``importance``'s scores of ``param`` (a parameter, or the local shard of a sharded one)."""
    scores = importance(name, param)
    if scores.shape != param.shape:
        raise ValueError(
            f"{importance!r} returned scores of shape {tuple(scores.shape)} for {name!r}, "
            f"whose shape is {tuple(param.shape)}."
        )
    return scores
