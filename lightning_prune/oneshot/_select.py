"""Exact, deterministic selection within rows and within N:M groups (ties go to the earlier entry)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: Entries ranked at once (two int64 temporaries of this size).
_CHUNK = 1 << 20

Scores = Callable[[int, int], Tensor]
"""``scores(start, stop)``: the float scores of rows ``start:stop`` (computed on demand, chunk by chunk)."""


def count(sparsity: float, numel: int) -> int:
    """The number of entries a target prunes: ``round(sparsity * numel)``."""
    return round(sparsity * numel)


def _rank(scores: Tensor) -> Tensor:
    """Each entry's rank along the last dimension: a stable sort's position (ties: the earlier first). Small
    groups (N:M) by ``m^2`` vectorised comparisons, which beats sorting millions of tiny rows."""
    m = scores.shape[-1]
    if m > 16:
        order = torch.argsort(scores, dim=-1, stable=True)
        positions = torch.arange(m, device=scores.device).expand_as(order)
        return torch.empty_like(order).scatter_(-1, order, positions)
    rank = torch.zeros(scores.shape, dtype=torch.int16, device=scores.device)
    for j in range(m):
        for i in range(m):
            if i != j:
                rank[..., j] += scores[..., i] <= scores[..., j] if i < j else scores[..., i] < scores[..., j]
    return rank


def _keep_rows(scores: Tensor, k: int) -> Tensor:
    """Keep-mask of ``(rows, cols)`` scores without the ``k`` lowest of each row (ties: the earlier go first).

    One ``kthvalue`` per row finds the threshold; only rows with ties at it need a running count.
    """
    cols = scores.shape[1]
    if k <= 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= cols:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    kth = scores.kthvalue(k, dim=1, keepdim=True).values
    pruned = scores < kth
    equal = scores == kth
    need = k - pruned.sum(1, keepdim=True)
    tied = (equal.sum(1, keepdim=True) > need).squeeze(1)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        ties = equal[rows]
        equal[rows] = ties & (ties.cumsum(1) <= need[rows])
    return ~pruned.logical_or_(equal)


def _chunk_rows(cols: int) -> int:
    return max(1, _CHUNK // max(cols, 1))


def keep_per_row(scores: Scores, rows: int, cols: int, k: int, device: torch.device) -> Tensor:
    """Keep-mask that prunes exactly ``k`` entries in all, the lowest-scored of each row: ``k // rows`` per row,
    one more in the first ``k % rows`` rows."""
    base, extra = divmod(k, rows)
    keep = torch.empty(rows, cols, dtype=torch.bool, device=device)
    step = _chunk_rows(cols)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        chunk = scores(start, stop)
        split = min(max(extra - start, 0), stop - start)  # rows of this chunk that lose base + 1
        keep[start : start + split] = _keep_rows(chunk[:split], base + 1)
        keep[start + split : stop] = _keep_rows(chunk[split:], base)
    return keep


def keep_nm(scores: Scores, rows: int, cols: int, n: int, m: int, device: torch.device) -> Tensor:
    """Keep-mask that prunes the ``n`` lowest-scored entries of every ``m`` consecutive ones along each row."""
    keep = torch.empty(rows, cols, dtype=torch.bool, device=device)
    step = _chunk_rows(cols)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        ranked = _rank(scores(start, stop).reshape(stop - start, cols // m, m))
        torch.ge(ranked, n, out=keep[start:stop].view(stop - start, cols // m, m))
    return keep
