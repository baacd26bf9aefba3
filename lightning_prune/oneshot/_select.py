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
    """Each entry's rank along the last dimension: a stable sort's position (ties: the earlier first)."""
    order = torch.argsort(scores, dim=-1, stable=True)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


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
        quota = torch.full((stop - start, 1), base, dtype=torch.int64, device=device)
        if start < extra:
            quota[: extra - start] += 1
        torch.ge(_rank(scores(start, stop)), quota, out=keep[start:stop])
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
