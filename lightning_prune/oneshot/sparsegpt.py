"""SparseGPT: mask selection and optimal-brain-surgeon weight updates with lazy column batches
(Frantar & Alistarh, 2023)."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from lightning_prune.masks.selection import prune_lowest_
from lightning_prune.oneshot._select import count, keep_nm, zero_pruned_
from lightning_prune.oneshot.base import OneShotMethod, OneShotStructure, check_layer_target
from lightning_prune.oneshot.statistics import InputCovariance, Statistic
from lightning_prune.structures.nm import NMStructure

__all__ = ["SparseGPT"]


def _rows(scores: Tensor, start: int, stop: int) -> Tensor:
    return scores[start:stop]


class SparseGPT(OneShotMethod):
    """Prune a layer and update its remaining weights to keep ``W X`` (Frantar & Alistarh, 2023, "SparseGPT:
    Massive Language Models Can Be Accurately Pruned in One-Shot").

    With ``H = sum_t x_t x_t^T`` over the layer's calibration inputs (the Hessian ``2 X X^T`` up to a factor the
    update does not depend on), dampened by ``damping * mean(diag H)``, and ``U`` the upper Cholesky factor of
    ``H^-1``, the columns are processed left to right in lazy batches of ``blocksize``: the mask of each batch is
    chosen when the batch starts (unstructured: the ``k_b`` lowest ``w^2 / U_jj^2`` of the batch, ``k_b`` such that
    the layer's count is exactly ``round(sparsity * numel)``; N:M: the ``n`` lowest of each group of ``m`` columns,
    chosen when the group starts), then each column's pruning error ``(w - q) / U_jj`` is propagated to the later
    columns of the batch at once and to the remaining columns once per batch (``W[:, later] -= E U[batch, later]``).

    Inputs that are zero on every calibration token are given ``H_jj = 1`` (the reference zeroes their weights
    instead, which can exceed the target; here the counts stay exact and such weights compete on their magnitude).

    Args:
        blocksize: columns per lazy batch (and per adaptive mask selection), 128 as in the paper; a multiple of
            ``m`` for N:M.
        damping: the dampening, as a fraction of the mean diagonal of ``H`` (0.01).
        dtype: the precision of ``H`` and of the weight update: float32 (the reference) or float64.

    Raises:
        ValueError: ``blocksize`` is not a positive integer, ``damping`` is negative, ``dtype`` is not float32 or
            float64; at pruning, a singular Hessian (see
            :meth:`~lightning_prune.oneshot.statistics.InputCovariance.inverse_cholesky`).

    Example:
        >>> import torch
        >>> from lightning_prune.oneshot.statistics import InputCovariance
        >>> from lightning_prune.structures import Unstructured
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 8, generator=g)
        >>> w = torch.randn(4, 8, generator=g)
        >>> stat = InputCovariance(8)
        >>> stat.add_(x)
        >>> pruned = w.clone()
        >>> keep = SparseGPT(blocksize=4).prune_("fc", pruned, stat, Unstructured(), 0.5)
        >>> int((~keep).sum()), bool((pruned[~keep] == 0).all())
        (16, True)
    """

    name = "sparsegpt"
    needs_calibration = True

    def __init__(self, blocksize: int = 128, damping: float = 0.01, dtype: torch.dtype = torch.float32) -> None:
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"`blocksize` must be a positive integer (columns per lazy batch), got {blocksize!r}.")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0:
            raise ValueError(f"`damping` must be a number >= 0 (a fraction of the mean diagonal), got {damping!r}.")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype!r}.")
        self.blocksize = blocksize
        self.damping = float(damping)
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"SparseGPT(blocksize={self.blocksize}, damping={self.damping}, dtype={self.dtype})"

    def statistic(self, in_features: int, device: torch.device) -> Statistic | None:
        return InputCovariance(in_features, device, self.dtype)

    def check_target(self, layer: str, shape: tuple[int, int], structure: OneShotStructure, sparsity: float) -> None:
        check_layer_target(layer, shape, structure, sparsity)
        if isinstance(structure, NMStructure) and self.blocksize % structure.m:
            raise ValueError(
                f"SparseGPT selects {structure.n}:{structure.m} masks within lazy batches of columns, so "
                f"`blocksize`={self.blocksize} must be a multiple of m={structure.m}. Use blocksize="
                f"{max(structure.m, self.blocksize // structure.m * structure.m)}."
            )

    @torch.no_grad()
    def prune_(
        self, layer: str, weight: Tensor, statistic: Statistic | None, structure: OneShotStructure, sparsity: float
    ) -> Tensor:
        rows, cols = weight.shape
        keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
        if sparsity == 0.0:
            return keep
        if not isinstance(statistic, InputCovariance):
            raise ValueError(
                f"SparseGPT needs the input covariance of {layer!r}, but got none: was the layer called on the "
                "calibration batches?"
            )
        upper = statistic.inverse_cholesky(self.damping, layer)
        # The update runs in the weight itself when it already has the update's dtype and layout; else on a copy.
        in_place = weight.dtype == self.dtype and weight.is_contiguous()
        w = weight if in_place else weight.to(dtype=self.dtype, copy=True)
        nm = structure if isinstance(structure, NMStructure) else None
        errors = torch.empty(rows, min(self.blocksize, cols), dtype=self.dtype, device=w.device)
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            block, hinv = w[:, i1:i2], upper[i1:i2, i1:i2]
            diag = hinv.diagonal()
            keep1 = keep[:, i1:i2]
            if nm is None:
                k = count(sparsity, rows * i2) - count(sparsity, rows * i1)
                scores = block.square().div_(diag.square())
                chosen = torch.ones_like(scores, dtype=torch.bool)
                prune_lowest_([scores], [chosen], k, names=[layer])
                keep1.copy_(chosen)
            for i in range(i2 - i1):
                if nm is not None and i % nm.m == 0:
                    group = slice(i, i + nm.m)
                    scores = block[:, group].square().div_(diag[group].square())
                    keep1[:, group] = keep_nm(partial(_rows, scores), rows, nm.m, nm.n, nm.m, w.device)
                column = block[:, i]
                q = column.masked_fill(~keep1[:, i], 0)
                err = errors[:, i]
                torch.sub(column, q, out=err).div_(diag[i])
                block[:, i:].addr_(err, hinv[i, i:], alpha=-1)
                column.copy_(q)
            if i2 < cols:
                w[:, i2:].addmm_(errors[:, : i2 - i1], upper[i1:i2, i2:], alpha=-1)
        if not in_place:
            weight.copy_(w)
        zero_pruned_(weight, keep)
        return keep
