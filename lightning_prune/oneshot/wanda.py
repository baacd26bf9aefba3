"""Wanda: prune by ``|W_ij| * ||X_j||_2``, compared within each output row (Sun et al., 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_prune.oneshot._select import count, keep_nm, keep_per_row, zero_pruned_
from lightning_prune.oneshot.base import OneShotMethod, OneShotStructure
from lightning_prune.oneshot.statistics import ColumnSquares, InputCovariance, Statistic
from lightning_prune.structures.nm import NMStructure

__all__ = ["Wanda", "input_norms"]


def input_norms(statistic: Statistic | None, layer: str) -> Tensor:
    """``||X_j||_2`` per input feature from a statistic that holds the squared column norms."""
    if isinstance(statistic, ColumnSquares):
        return statistic.norms()
    if isinstance(statistic, InputCovariance):
        return statistic.squares().sqrt()
    raise ValueError(
        f"Wanda scores {layer!r} from the norms of its calibration inputs, but got no input statistic for it: was "
        "the layer called on the calibration batches?"
    )


class Wanda(OneShotMethod):
    """Pruning by weights and activations: score ``S_ij = |W_ij| * ||X_j||_2`` over the layer's calibration
    inputs ``X`` (every token of every sample), and prune the lowest scores *within each output row*.

    From Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models". Unstructured:
    each row loses ``k // rows`` entries (one more in the first ``k % rows`` rows), ``k = round(sparsity * numel)``,
    so the layer's count is exact; N:M: the ``n`` lowest of every ``m`` consecutive inputs. Ties go to the earlier
    column. The weights left are not changed.

    Example:
        >>> import torch
        >>> from lightning_prune.oneshot.statistics import ColumnSquares
        >>> from lightning_prune.structures import Unstructured
        >>> stat = ColumnSquares(2)
        >>> stat.add_(torch.tensor([[10.0, 0.1]]))  # the first input is large
        >>> w = torch.tensor([[0.5, 1.0], [1.0, 0.5]])
        >>> Wanda().prune_("fc", w, stat, Unstructured(), 0.5).tolist()  # magnitude would drop w[0, 0]
        [[True, False], [True, False]]
    """

    name = "wanda"
    needs_calibration = True

    def statistic(self, in_features: int, device: torch.device) -> Statistic | None:
        return ColumnSquares(in_features, device)

    @torch.no_grad()
    def prune_(
        self, layer: str, weight: Tensor, statistic: Statistic | None, structure: OneShotStructure, sparsity: float
    ) -> Tensor:
        rows, cols = weight.shape
        norms = input_norms(statistic, layer).to(device=weight.device, dtype=torch.float32)

        def scores(start: int, stop: int) -> Tensor:
            return weight[start:stop].abs().float().mul_(norms)

        if isinstance(structure, NMStructure):
            if sparsity == 0.0:
                return torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
            keep = keep_nm(scores, rows, cols, structure.n, structure.m, weight.device)
        else:
            keep = keep_per_row(scores, rows, cols, count(sparsity, rows * cols), weight.device)
        zero_pruned_(weight, keep)
        return keep
