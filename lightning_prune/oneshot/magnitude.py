"""Magnitude pruning, the data-free baseline: the smallest ``|W_ij|`` of each layer go first."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_prune.masks.selection import prune_lowest_
from lightning_prune.oneshot._select import count, keep_nm, zero_pruned_
from lightning_prune.oneshot.base import OneShotMethod, OneShotStructure
from lightning_prune.oneshot.statistics import Statistic
from lightning_prune.structures.nm import NMStructure

__all__ = ["Magnitude"]


class Magnitude(OneShotMethod):
    """Prune the lowest ``|W_ij|`` of each layer (unstructured: one ranking per layer, as the baseline of Sun et
    al., 2023, "A Simple and Effective Pruning Approach for Large Language Models"; N:M: within each group).

    Example:
        >>> import torch
        >>> from lightning_prune.structures import Unstructured
        >>> w = torch.tensor([[0.1, -3.0], [2.0, -0.2]])
        >>> Magnitude().prune_("fc", w, None, Unstructured(), 0.5).tolist()
        [[False, True], [True, False]]
        >>> w.tolist()
        [[0.0, -3.0], [2.0, 0.0]]
    """

    name = "magnitude"

    @torch.no_grad()
    def prune_(
        self, layer: str, weight: Tensor, statistic: Statistic | None, structure: OneShotStructure, sparsity: float
    ) -> Tensor:
        rows, cols = weight.shape
        if isinstance(structure, NMStructure):
            if sparsity == 0.0:
                return torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
            keep = keep_nm(lambda a, b: weight[a:b].abs(), rows, cols, structure.n, structure.m, weight.device)
        else:
            keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
            values = weight if weight.is_floating_point() and weight.is_contiguous() else weight.contiguous()
            prune_lowest_([values], [keep], count(sparsity, rows * cols), transform=Tensor.abs_, names=[layer])
        zero_pruned_(weight, keep)
        return keep
