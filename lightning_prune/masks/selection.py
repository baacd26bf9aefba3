"""Exact, streaming selection of the k lowest-scored entries across many tensors.

The textbook global threshold concatenates every score into one tensor and calls ``torch.quantile`` or
``torch.kthvalue``: that doubles the model's memory, and ``torch.quantile`` refuses inputs above 2**24
elements. Here the threshold is found by radix selection on the scores' bit patterns: finite floats map to
integers whose order is the order of the floats, and two (float32) or four (float64) passes of a 65,536-bin
histogram over 16-bit digits pin the exact k-th smallest key. Each pass streams over fixed-size chunks with
preallocated buffers, so the extra memory is a few chunks whatever the model's size. Ties at the threshold
are broken deterministically: the earliest entries (tensor order, then flat index) go first.

Sharded tensors (FSDP2 under Lightning's ``ModelParallelStrategy``) are selected in place, exactly: with
``group=`` each process streams only its own shards, the histograms of every pass are summed over the group
(:math:`2^{16}` counts per pass: never a gathered weight), and ties at the threshold go to the entries that come
first in the *whole* tensors' order (tensor order, then global flat index, from each shard's ``offsets``), so the
masks are those one process computes on the whole tensors, whatever the number of processes.

Example:
    >>> import torch
    >>> scores = [torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 5.0])]
    >>> keep = [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    >>> prune_lowest_(scores, keep, 2)
    >>> [k.tolist() for k in keep]
    [[True, False, True], [False, True]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

#: Entries scored per chunk: 1M entries keep every temporary at 4 MB (8 MB for float64), cache-friendly and
#: well under glibc's 32 MB mmap threshold.
DEFAULT_CHUNK = 1 << 20


_BINS = 1 << 16


_DIGIT = 0xFFFF


ScoreTransform = Callable[[Tensor], object]


"""``transform(chunk)``: turns a flat chunk of values into scores in place, e.g. ``Tensor.abs_``."""


class _Workspace:
    """Preallocated buffers for one chunk: scores, keys, digits (also the running count of tied entries) and three
    boolean masks."""

    def __init__(self, chunk: int, float_dtype: torch.dtype, device: torch.device) -> None:
        self.float_dtype = float_dtype
        self.int_dtype = torch.int64 if float_dtype == torch.float64 else torch.int32
        self.bits = 64 if float_dtype == torch.float64 else 32
        self.low_mask = (1 << (self.bits - 1)) - 1
        self.scores = torch.empty(chunk, dtype=float_dtype, device=device)
        self.keys = torch.empty(chunk, dtype=self.int_dtype, device=device)
        self.tmp = torch.empty(chunk, dtype=self.int_dtype, device=device)
        self.flag = torch.empty(chunk, dtype=torch.bool, device=device)
        self.flag2 = torch.empty(chunk, dtype=torch.bool, device=device)
        self.flag3 = torch.empty(chunk, dtype=torch.bool, device=device)
        self.ones = torch.ones(min(chunk, _BINS), dtype=torch.int64, device=device)

    def keys_of(self, values: Tensor, transform: ScoreTransform | None) -> Tensor:
        """Order-preserving integer keys of the scores of ``values`` (a flat chunk)."""
        n = values.numel()
        scores = self.scores[:n]
        scores.copy_(values)
        if transform is not None:
            transform(scores)
        scores.add_(0.0)  # -0.0 -> +0.0, so that both zeros tie
        keys = self.keys[:n]
        keys.copy_(scores.view(self.int_dtype))
        # Negative floats: flip the magnitude bits so that signed-integer order equals float order.
        tmp = self.tmp[:n]
        torch.bitwise_right_shift(keys, self.bits - 1, out=tmp)
        tmp.bitwise_and_(self.low_mask)
        keys.bitwise_xor_(tmp)
        return keys

    def is_finite(self, keys: Tensor) -> bool:
        if not keys.numel():
            return True
        lo, hi = torch.aminmax(keys)
        inf_key = self._inf_key()
        return not (int(hi) >= inf_key or int(lo) <= -inf_key - 1)

    def _inf_key(self) -> int:
        inf = torch.tensor(float("inf"), dtype=self.float_dtype)
        return int(inf.view(self.int_dtype))


def _non_finite(name: str) -> ValueError:
    return ValueError(
        f"Scores of {name!r} contain NaN or infinite values; cannot select entries to prune. "
        "Check the model's weights and gradients for divergence (e.g. lower the learning rate)."
    )


def _chunks(numel: int, chunk: int) -> range:
    return range(0, numel, chunk)


class _Group:
    """The processes that hold the shards: sums their counts (a no-op for one process)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)

    def sum_(self, tensor: Tensor) -> Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


def _flat(t: Tensor) -> Tensor:
    if not t.is_contiguous():
        raise ValueError("scores and masks must be contiguous tensors")
    return t.reshape(-1)


def _work_dtype(scores: Sequence[Tensor]) -> torch.dtype:
    for s in scores:
        if not s.is_floating_point():
            raise TypeError(f"scores must be floating-point tensors, got {s.dtype}")
    return torch.float64 if any(s.dtype == torch.float64 for s in scores) else torch.float32


def prune_lowest_(
    scores: Sequence[Tensor],
    keep: Sequence[Tensor],
    k: int,
    *,
    transform: ScoreTransform | None = None,
    names: Sequence[str] | None = None,
    chunk_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    offsets: Sequence[int] | None = None,
) -> None:
    """Clear, in place, the ``k`` entries of ``keep`` with the lowest scores among those still kept.

    Entries already cleared in ``keep`` are never considered and never revived, so pruning only grows.
    Exactly ``k`` entries are cleared; ties at the threshold go to the earliest entries (tensor order, then
    flat index), so the result is deterministic.

    Args:
        scores: one tensor per masked tensor (or the raw tensors when ``transform`` computes scores
            chunk by chunk, e.g. ``Tensor.abs_`` for magnitude, which avoids a full copy of the scores).
        keep: boolean masks, same shapes as ``scores``; ``True`` means kept.
        k: how many more entries to clear, ``0 <= k <=`` the number still kept.
        transform: optional in-place ``transform(chunk)`` applied to float copies of flat chunks of ``scores``.
        names: names used in error messages.
        chunk_size: entries processed at once (default :data:`DEFAULT_CHUNK`).
        group: the process group whose ranks hold the other shards of the same tensors (e.g.
            ``torch.distributed.group.WORLD``): ``scores``/``keep`` are then this rank's shards, ``k`` counts over
            the whole tensors, and every rank of the group must call with the same ``k`` and the same number of
            tensors (an empty shard is fine). ``None``: the tensors are whole.
        offsets: with ``group``, where each shard starts in its whole tensor's flat (row-major) order; a shard
            must be one contiguous run of it, as FSDP2's row shards are. ``None``: shards follow each other in
            rank order.

    Raises:
        ValueError: when ``k`` is out of range or a score is NaN or infinite (on every rank of ``group``
            together).

    Example:
        Two processes, each with one row of ``[[3, 1], [2, 1]]``, clear the same entries as one process on the
        whole tensor (the tie at 1 goes to the earlier entry, in row 0)::

            prune_lowest_([row], [keep_row], 1, group=dist.group.WORLD, offsets=[2 * rank])
    """
    if len(scores) != len(keep):
        raise ValueError(f"got {len(scores)} score tensors for {len(keep)} masks")
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(scores))]
    for s, m, name in zip(scores, keep, names):
        if s.shape != m.shape:
            raise ValueError(f"scores of {name!r} have shape {tuple(s.shape)} but its mask {tuple(m.shape)}")
        if m.dtype != torch.bool:
            raise TypeError(f"the mask of {name!r} must be a bool tensor, got {m.dtype}")
    if k < 0:
        raise ValueError(f"cannot prune a negative number of entries ({k})")
    if k == 0 or not scores:
        return
    procs = _Group(group)
    if offsets is not None and len(offsets) != len(scores):
        raise ValueError(f"got {len(offsets)} offsets for {len(scores)} score tensors")
    device = keep[0].device
    kept = int(procs.sum_(torch.tensor([sum(int(torch.count_nonzero(m)) for m in keep)], device=device)))
    if k > kept:
        raise ValueError(f"cannot prune {k} entries: only {kept} are still kept")

    chunk_size = chunk_size or DEFAULT_CHUNK
    flats = [_flat(s.detach()) for s in scores]
    masks = [_flat(m) for m in keep]
    work = _Workspace(max(1, min(chunk_size, max(s.numel() for s in flats))), _work_dtype(scores), device)

    threshold, below, tied = _kth_key(flats, masks, k, work, transform, names, chunk_size, procs)
    ties = k - below
    budgets = None
    if procs.size > 1 and 0 < ties < tied:
        budgets = _tie_budgets(flats, masks, threshold, ties, work, transform, chunk_size, procs, offsets)
    _clear(flats, masks, threshold, ties, work, transform, chunk_size, budgets)


def _kth_key(
    flats: list[Tensor],
    masks: list[Tensor],
    k: int,
    work: _Workspace,
    transform: ScoreTransform | None,
    names: Sequence[str],
    chunk: int,
    procs: _Group,
) -> tuple[int, int, int]:
    """Return the k-th smallest key among kept entries, how many kept keys are strictly smaller and how many
    equal it (over every rank of ``procs``)."""
    passes = work.bits // 16
    prefix = 0  # signed value of the digits fixed so far
    below = 0  # kept entries whose key is below the current prefix range
    tied = 0
    for p in range(passes):
        shift = work.bits - 16 * (p + 1)
        # The last bin counts entries outside the range; in the first pass one flag per tensor follows: non-finite.
        hist = torch.zeros(_BINS + 1 + (len(flats) if p == 0 else 0), dtype=torch.int64, device=work.keys.device)
        for i, (flat, mask, name) in enumerate(zip(flats, masks, names)):
            for start in _chunks(flat.numel(), chunk):
                stop = min(start + chunk, flat.numel())
                n = stop - start
                keys = work.keys_of(flat[start:stop], transform)
                if p == 0 and not work.is_finite(keys):
                    if procs.size == 1:
                        raise _non_finite(name)
                    hist[_BINS + 1 + i] = 1
                digits = work.tmp[:n]
                outside = work.flag[:n]
                torch.logical_not(mask[start:stop], out=outside)
                if p == 0:
                    torch.bitwise_right_shift(keys, shift, out=digits)
                    digits.add_(1 << 15)
                else:
                    torch.bitwise_right_shift(keys, shift + 16, out=digits)
                    torch.ne(digits, prefix, out=work.flag2[:n])
                    outside.logical_or_(work.flag2[:n])
                    torch.bitwise_right_shift(keys, shift, out=digits)
                    digits.bitwise_and_(_DIGIT)
                digits.masked_fill_(outside, _BINS)
                if n >= _BINS:
                    hist[: _BINS + 1] += torch.bincount(digits, minlength=_BINS + 1)
                else:  # a small chunk: O(n) instead of O(bins)
                    hist.index_add_(0, digits, work.ones[:n])
        procs.sum_(hist)
        bad = [name for name, flag in zip(names, hist[_BINS + 1 :].tolist()) if flag] if p == 0 else []
        if bad:  # every rank sees the same flags, so every rank raises
            raise _non_finite(bad[0])
        counts = hist[:_BINS].cumsum(0)
        need = k - below
        digit = int(torch.searchsorted(counts, torch.tensor(need, dtype=counts.dtype)))
        if digit > 0:
            below += int(counts[digit - 1])
        tied = int(hist[digit])
        prefix = digit - (1 << 15) if p == 0 else (prefix << 16) | digit
    return prefix, below, tied


def _tie_budgets(
    flats: list[Tensor],
    masks: list[Tensor],
    threshold: int,
    ties: int,
    work: _Workspace,
    transform: ScoreTransform | None,
    chunk: int,
    procs: _Group,
    offsets: Sequence[int] | None,
) -> list[int]:
    """How many of this rank's kept entries equal to ``threshold`` each tensor clears, so that the ``ties`` cleared
    over all ranks are the earliest in the whole tensors' order (tensor order, then global flat index)."""
    local = torch.zeros(len(flats), dtype=torch.int64)
    for i, (flat, mask) in enumerate(zip(flats, masks)):
        for start in _chunks(flat.numel(), chunk):
            stop = min(start + chunk, flat.numel())
            keys = work.keys_of(flat[start:stop], transform)
            equal = work.flag[: stop - start]
            torch.eq(keys, threshold, out=equal)
            equal.logical_and_(mask[start:stop])
            local[i] += int(torch.count_nonzero(equal))
    # Row r: rank r's tied counts, then its shards' offsets (a [world, 2, tensors] table, summed into place).
    table = torch.zeros(procs.size, 2, len(flats), dtype=torch.int64, device=work.keys.device)
    table[procs.rank, 0] = local.to(table.device)
    starts = list(offsets) if offsets is not None else [procs.rank] * len(flats)
    table[procs.rank, 1] = torch.tensor(starts, device=table.device)
    table = procs.sum_(table).cpu()
    budgets = []
    for i in range(len(flats)):
        mine = (int(table[procs.rank, 1, i]), procs.rank)
        before = int(table[:, 0, :i].sum()) + sum(
            int(table[r, 0, i]) for r in range(procs.size) if (int(table[r, 1, i]), r) < mine
        )
        budgets.append(max(0, min(ties - before, int(local[i]))))
    return budgets


def _clear(
    flats: list[Tensor],
    masks: list[Tensor],
    threshold: int,
    ties: int,
    work: _Workspace,
    transform: ScoreTransform | None,
    chunk: int,
    budgets: Sequence[int] | None = None,
) -> None:
    """Clear every kept entry whose key is below ``threshold`` and the first ``ties`` equal to it (or, with
    ``budgets``, the first ``budgets[i]`` equal to it in tensor ``i``)."""
    for i, (flat, mask) in enumerate(zip(flats, masks)):
        if budgets is not None:
            ties = budgets[i]
        for start in _chunks(flat.numel(), chunk):
            stop = min(start + chunk, flat.numel())
            n = stop - start
            keys = work.keys_of(flat[start:stop], transform)
            m = mask[start:stop]
            survive = work.flag[:n]
            torch.gt(keys, threshold, out=survive)
            equal = work.flag2[:n]
            torch.eq(keys, threshold, out=equal)
            equal.logical_and_(m)
            if ties > 0:
                tied = int(torch.count_nonzero(equal))
                if tied > ties:
                    # Only the first `ties` of the equal entries go: keep the rest. In the chunk's buffers: a
                    # cumulative sum of the bools would allocate an int64 count per entry and a converted copy.
                    rank = work.tmp[:n]
                    rank.copy_(equal)
                    rank.cumsum_(0)
                    later = work.flag3[:n]
                    torch.gt(rank, ties, out=later)
                    survive.logical_or_(later.logical_and_(equal))
                ties -= min(tied, ties)
            else:
                survive.logical_or_(equal)
            m.logical_and_(survive)
