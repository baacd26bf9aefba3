"""Sparsity patterns that hardware can use: whole blocks of a weight, and N:M (such as 2:4) along its inputs.

Both are :class:`~lightning_prune.structures.Structure` s that only grow the boolean masks of an ordinary
:class:`~lightning_prune.masking.MaskSet`, so every masking guarantee holds unchanged (pruned entries and their
optimizer state stay exactly zero, masks are checkpointed, DDP sees masked gradients), and both select with the
exact, deterministic :func:`~lightning_prune.selection.prune_lowest_`. They score with any per-entry importance
(magnitude, ``l1``, ``l2`` and the gradient criteria); criteria that score whole channels are refused.

* :class:`BlockStructure` prunes whole ``bh x bw`` tiles of each weight's 2-D GEMM view, for block-sparse
  kernels (Narang et al., 2017, "Block-Sparse Recurrent Neural Networks"; Gray et al., 2017, "GPU Kernels for
  Block-Sparse Weights").
* :class:`NMStructure` zeroes ``n`` of every ``m`` consecutive input weights, the 2:4 pattern of NVIDIA's
  sparse tensor cores (Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks"; Zhou et al., 2021,
  "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch").

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.importance import MagnitudeImportance
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> nm = NMStructure(2, 4)
    >>> masks = nm.bind(net)
    >>> nm.prune_(masks, MagnitudeImportance(), sparsity=nm.default_sparsity)
    >>> nm.complete_groups(masks)  # the fraction of groups of 4 with exactly 2 zeros
    {'0.weight': 1.0, '2.weight': 1.0}
    >>> blocks = BlockStructure((2, 4))
    >>> masks = blocks.bind(net)
    >>> blocks.prune_(masks, MagnitudeImportance(), sparsity=0.5, scope="layer")
    >>> blocks.layer_sparsity(masks)  # fractions of blocks
    {'0.weight': 0.5, '2.weight': 0.5}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.importance import Importance
from lightning_prune.masking import MaskSet
from lightning_prune.selection import prune_lowest_
from lightning_prune.structures import Scope, Structure, Target, Unstructured, layer_targets

__all__ = ["BlockStructure", "NMStructure"]


# ---------------------------------------------------------------------------------------------- shared
def _layer(name: str) -> str:
    """The module name of a parameter name, as ``ignore`` takes it."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _check_entry_importance(structure: Structure, importance: Importance) -> None:
    if not isinstance(importance, Importance):
        raise TypeError(f"`importance` must be an Importance object, got {type(importance).__name__}.")
    if not getattr(importance, "scores_entries", True):
        raise ValueError(
            f"{structure!r} needs a score for every single weight (magnitude, l1, l2, taylor, fisher), but "
            f"{importance!r} scores whole channels only. Use structure='channel' for it."
        )
    try:
        Unstructured().check_importance(importance)
    except ValueError as err:
        raise ValueError(
            f"{structure!r} needs a score for every single weight (magnitude, l1, l2, taylor, fisher): {err} "
            "Criteria that score whole channels need structure='channel'."
        ) from err


def _entry_scores(structure: Structure, importance: Importance, name: str, param: Tensor) -> Tensor:
    """``importance``'s score of every entry of ``param``, with a clear error when it cannot give them."""
    try:
        scores = importance(name, param)
    except (NotImplementedError, TypeError) as err:
        raise ValueError(
            f"{structure!r} needs a score for every weight of {name!r}, but {importance!r} cannot score single "
            f"entries ({type(err).__name__}: {err}). Use a per-entry criterion (magnitude, l1, l2, taylor, "
            "fisher), or structure='channel' for channel criteria."
        ) from err
    if not isinstance(scores, Tensor) or scores.shape != param.shape:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"{structure!r} needs a score for every weight of {name!r} (shape {tuple(param.shape)}), but "
            f"{importance!r} returned {shape}. Use a per-entry criterion (magnitude, l1, l2, taylor, fisher), or "
            "structure='channel' for channel criteria."
        )
    return scores


def _check_matrix(structure: Structure, name: str, param: Tensor) -> None:
    if param.dim() < 2:
        raise ValueError(
            f"{structure!r} prunes weight matrices (Linear and Conv weights), but {name!r} has shape "
            f"{tuple(param.shape)}. Add {_layer(name)!r} to `ignore`."
        )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> str:
    rows = [tuple(header), *[tuple(r) for r in rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return title + "\n" + "\n".join(lines)


def _groups_of(masks: MaskSet, per_layer: list[float] | None, scope: Scope) -> list[list[int]]:
    """Indices of the tensors ranked together: all of them for one global target, else one by one."""
    indices = list(range(len(masks.params)))
    return [indices] if per_layer is None and scope == "global" else [[i] for i in indices]


def _single(sparsity: Target) -> float:
    return 0.0 if isinstance(sparsity, Mapping) else float(sparsity)


# ---------------------------------------------------------------------------------------------- blocks
class BlockStructure(Structure):
    """Prune whole ``block_shape`` tiles of every weight's 2-D GEMM view.

    The GEMM view of a Linear weight is ``(out_features, in_features)``; of a convolution's,
    ``(out_channels, in_channels / groups * prod(kernel_size))``, the im2col matrix, whose columns run over input
    channels, then kernel positions (for any weight: its first dimension by the rest, flattened). Tiles start at
    ``(0, 0)``; where the block does not divide a dimension, the last row or column of tiles is partial (smaller).

    A tile's score is the mean of the importance's per-entry scores over its entries. For
    :class:`~lightning_prune.importance.LpNormImportance` ``(p)`` (magnitude, ``l1``, ``l2``) that is
    ``sum |w|^p / size``, the p-th power of the tile's Lp norm normalised by its size, which ranks tiles exactly as
    the normalised norm does; for any other per-entry criterion, the sum of its scores over the size. Dividing by
    the size lets a partial edge tile compete fairly with full ones.

    ``sparsity`` counts tiles: exactly ``round(sparsity * B)`` are pruned, ``B`` counting every tile
    (``scope="global"``: one ranking across layers) or each weight's own (``scope="layer"``); a mapping
    ``{layer-name pattern: sparsity}`` prunes each weight to its own fraction of tiles. :meth:`sparsity` and
    :meth:`layer_sparsity` report fractions of tiles (a partial tile counts as one, so the fraction of zero
    weights can differ slightly). The lowest-scored tiles go first, ties to the earliest (layer order, then tile
    row by tile row); a tile is pruned when all its entries are masked, and pruned tiles are never revived.

    Args:
        block_shape: ``(rows, columns)`` of a tile, positive integers; an int ``b`` means ``(b, b)``.
            ``(1, k)`` prunes runs of ``k`` weights along a row.

    Raises:
        ValueError: ``block_shape`` is not one or two positive integers; at :meth:`bind` or pruning, a weight
            whose GEMM view is smaller than a block.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune.importance import MagnitudeImportance
        >>> conv = nn.Sequential(nn.Conv2d(2, 4, 3))
        >>> structure = BlockStructure((2, 9))  # two filters by one input channel's 3x3 kernel
        >>> masks = structure.bind(conv)
        >>> structure.prune_(masks, MagnitudeImportance(), sparsity=0.5)
        >>> structure.sparsity(masks), masks.sparsity()
        (0.5, 0.5)
        >>> zero = conv[0].weight.detach().abs().sum((2, 3)) == 0  # (out, in): whole 3x3 kernels are zero
        >>> int(zero.sum())
        4
    """

    name = "block"

    def __init__(self, block_shape: int | Sequence[int] = (4, 4)) -> None:
        shape = (block_shape, block_shape) if isinstance(block_shape, int) else block_shape
        valid = (
            not isinstance(block_shape, (bool, str))
            and isinstance(shape, Sequence)
            and len(shape) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in shape)
        )
        if not valid:
            raise ValueError(
                f"`block_shape` must be two positive integers (rows, columns) such as (4, 4), or one for a square "
                f"block, got {block_shape!r}."
            )
        self.block_shape: tuple[int, int] = (int(shape[0]), int(shape[1]))

    def __repr__(self) -> str:
        return f"BlockStructure(block_shape={self.block_shape})"

    def bind(self, module: nn.Module, ignore: Sequence[str] = (), example_inputs: Any = None) -> MaskSet:
        masks = super().bind(module, ignore, example_inputs)
        self._check_layers(masks)
        return masks

    def _check_layers(self, masks: MaskSet) -> None:
        bh, bw = self.block_shape
        for name, param in zip(masks.names, masks.params):
            _check_matrix(self, name, param)
            rows, cols = param.shape[0], param[0].numel()
            if bh > rows or bw > cols:
                raise ValueError(
                    f"Block shape {bh}x{bw} is larger than the {rows}x{cols} GEMM view of {name!r} (shape "
                    f"{tuple(param.shape)}). Add {_layer(name)!r} to `ignore` or use a smaller `block_shape`."
                )

    def kept_blocks(self, masks: MaskSet) -> list[Tensor]:
        """Per masked tensor, a boolean ``(ceil(rows / bh), ceil(cols / bw))`` tensor: True where a tile is
        kept (some entry of it is not masked)."""
        self._check_layers(masks)
        bh, bw = self.block_shape
        return [_tiles(m.view(m.shape[0], -1), bh, bw, fill=False).any(dim=(1, 3)) for m in masks.masks]

    def sparsity(self, masks: MaskSet) -> float:
        """The fraction of pruned tiles over all masked tensors."""
        kept = self.kept_blocks(masks)
        total = sum(k.numel() for k in kept)
        return (total - sum(int(k.sum()) for k in kept)) / total

    def layer_sparsity(self, masks: MaskSet) -> dict[str, float]:
        """The fraction of pruned tiles per masked tensor."""
        return {n: (k.numel() - int(k.sum())) / k.numel() for n, k in zip(masks.names, self.kept_blocks(masks))}

    def check_importance(self, importance: Importance) -> None:
        _check_entry_importance(self, importance)

    def check_target(self, masks: MaskSet, sparsity: Target, scope: Scope = "global") -> None:
        layer_targets(masks.names, sparsity, scope)
        self._check_layers(masks)

    def summary(self, masks: MaskSet) -> str:
        bh, bw = self.block_shape
        rows = []
        blocks = self.kept_blocks(masks)
        for name, mask, kept in zip(masks.names, masks.masks, blocks):
            pruned = kept.numel() - int(kept.sum())
            zeros = mask.numel() - int(torch.count_nonzero(mask))
            rows.append(
                (
                    name,
                    f"{mask.shape[0]}x{mask[0].numel()}",
                    f"{pruned} / {kept.numel()}",
                    f"{pruned / kept.numel():.2%}",
                    f"{zeros / mask.numel():.2%}",
                )
            )
        total = sum(k.numel() for k in blocks)
        pruned = total - sum(int(k.sum()) for k in blocks)
        rows.append(("total", "", f"{pruned} / {total}", f"{pruned / total:.2%}", f"{masks.sparsity():.2%}"))
        header = ("parameter", "GEMM view", "pruned blocks", "block sparsity", "weight sparsity")
        return _table(header, rows, f"Block pruning summary ({bh}x{bw} blocks)")

    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        per_layer = layer_targets(masks.names, sparsity, scope)
        kept = self.kept_blocks(masks)
        bh, bw = self.block_shape
        scores: dict[int, Tensor] = {}
        for group in _groups_of(masks, per_layer, scope):
            target = _single(sparsity) if per_layer is None else per_layer[group[0]]
            total = sum(kept[i].numel() for i in group)
            pruned = total - sum(int(kept[i].sum()) for i in group)
            k = round(target * total) - pruned
            if k <= 0:
                continue
            for i in group:
                name, param = masks.names[i], masks.params[i]
                entry = _entry_scores(self, importance, name, param)
                scores[i] = _block_means(entry.reshape(param.shape[0], -1), bh, bw)
            prune_lowest_(
                [scores[i] for i in group], [kept[i] for i in group], k, names=[masks.names[i] for i in group]
            )
        for i in scores:  # the tensors whose tiles may have changed
            mask = masks.masks[i]
            rows, cols = mask.shape[0], mask[0].numel()
            grown = kept[i].repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
            mask.view(rows, cols).logical_and_(grown)
        masks.apply_()


def _tiles(matrix: Tensor, bh: int, bw: int, fill: float | bool) -> Tensor:
    """``matrix`` padded with ``fill`` to whole tiles, as ``(tile rows, bh, tile columns, bw)``."""
    rows, cols = matrix.shape
    nr, nc = math.ceil(rows / bh), math.ceil(cols / bw)
    if nr * bh != rows or nc * bw != cols:
        matrix = F.pad(matrix, (0, nc * bw - cols, 0, nr * bh - rows), value=fill)
    return matrix.reshape(nr, bh, nc, bw)


def _block_means(scores: Tensor, bh: int, bw: int) -> Tensor:
    """The mean score of every tile (partial edge tiles over their own size), in float64."""
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    rows, cols = scores.shape
    sums = _tiles(scores, bh, bw, fill=0.0).sum(dim=(1, 3)).double()
    nr, nc = sums.shape
    heights = torch.full((nr,), float(bh), dtype=torch.float64, device=sums.device)
    heights[-1] = rows - (nr - 1) * bh
    widths = torch.full((nc,), float(bw), dtype=torch.float64, device=sums.device)
    widths[-1] = cols - (nc - 1) * bw
    return sums / (heights[:, None] * widths[None, :])


# ---------------------------------------------------------------------------------------------- N:M
class NMStructure(Structure):
    """N:M sparsity: in every group of ``m`` consecutive input weights, exactly ``n`` are zero (e.g. 2:4).

    Groups run along the input dimension, as NVIDIA's ASP and cuSPARSELt expect: a Linear weight's
    ``in_features`` (each row split into runs of ``m``), a convolution's input channels at each (output channel,
    kernel position), i.e. along dimension 1 of its weight. That dimension must be a multiple of ``m``.

    ``sparsity`` is the fraction of zero weights, at most ``n / m`` (:attr:`default_sparsity`, where every group
    has exactly ``n`` zeros). Gradual schedules work: at a target ``s <= n / m``, exactly ``round(s * N)`` entries
    are pruned, ``N`` counting every masked weight (``scope="global"``) or each weight's own (``scope="layer"``);
    a mapping ``{layer-name pattern: sparsity}`` gives each weight its own target. The entries pruned are the
    lowest-scored among the *eligible* ones, a group's eligible entries being its ``n - (zeros it already has)``
    lowest-scored kept entries, so no group ever exceeds ``n`` zeros and the last step completes every group. Ties
    go to the earliest entry (within a group, then tensor order and flat index). Pruned entries are never revived.

    Args:
        n: zeros per group, ``1 <= n < m`` (``n == m`` would empty every layer).
        m: group size, at least 2.

    Raises:
        ValueError: bad ``n`` or ``m``; at :meth:`bind` or pruning, a weight whose input dimension is not a
            multiple of ``m`` or a transposed convolution (whose weight puts the outputs along dimension 1); a
            target above ``n / m``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune.importance import MagnitudeImportance
        >>> layer = nn.Linear(4, 1)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.1, -3.0, 0.2, 4.0]]))
        >>> structure = NMStructure.from_string("2:4")
        >>> masks = structure.bind(nn.Sequential(layer))
        >>> structure.prune_(masks, MagnitudeImportance(), sparsity=0.25)  # gradual: 1 of the 2 zeros
        >>> (layer.weight == 0).tolist()
        [[True, False, False, False]]
        >>> structure.prune_(masks, MagnitudeImportance(), sparsity=0.5)
        >>> (layer.weight == 0).tolist()
        [[True, False, True, False]]
    """

    name = "n:m"

    def __init__(self, n: int = 2, m: int = 4) -> None:
        for arg, value in (("n", n), ("m", m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`{arg}` must be an integer, got {value!r}.")
        if m < 2:
            raise ValueError(f"`m` must be at least 2 (a group of m weights), got m={m}.")
        if not 1 <= n < m:
            raise ValueError(
                f"`n` must satisfy 1 <= n < m (n zeros in every group of m weights), got {n}:{m}"
                + (": n == m would empty every layer." if n == m else ".")
            )
        self.n = n
        self.m = m

    @classmethod
    def from_string(cls, spec: str) -> NMStructure:
        """Parse ``"N:M"``, such as ``"2:4"``.

        Example:
            >>> NMStructure.from_string("1:4").default_sparsity
            0.25
        """
        parts = spec.split(":") if isinstance(spec, str) else []
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"{spec!r} is not an N:M pattern: expected two integers such as '2:4' (n zeros of m).")
        return cls(int(parts[0]), int(parts[1]))

    @property
    def default_sparsity(self) -> float:
        """``n / m``, the sparsity at which every group has exactly ``n`` zeros: the natural final target."""
        return self.n / self.m

    def __repr__(self) -> str:
        return f"NMStructure(n={self.n}, m={self.m})"

    def bind(self, module: nn.Module, ignore: Sequence[str] = (), example_inputs: Any = None) -> MaskSet:
        masks = super().bind(module, ignore, example_inputs)
        owners = {f"{name}.weight": m for name, m in module.named_modules() if name}
        for name in masks.names:
            if isinstance(owners.get(name), nn.modules.conv._ConvTransposeNd):
                raise ValueError(
                    f"{self.n}:{self.m} sparsity groups the input weights of Linear and Conv layers, but "
                    f"{_layer(name)!r} is a transposed convolution (its weight's dimension 1 holds outputs). Add "
                    f"{_layer(name)!r} to `ignore`."
                )
        self._check_layers(masks)
        return masks

    def _check_layers(self, masks: MaskSet) -> None:
        for name, param in zip(masks.names, masks.params):
            _check_matrix(self, name, param)
            inputs = param.shape[1]
            if inputs % self.m:
                what = "input features" if param.dim() == 2 else "input channels (per group)"
                raise ValueError(
                    f"{self.n}:{self.m} sparsity groups every {self.m} consecutive input weights, but {name!r} "
                    f"(shape {tuple(param.shape)}) has {inputs} {what}, not a multiple of {self.m}. Add "
                    f"{_layer(name)!r} to `ignore`, or choose an m that divides {inputs}."
                )

    def check_importance(self, importance: Importance) -> None:
        _check_entry_importance(self, importance)

    def check_target(self, masks: MaskSet, sparsity: Target, scope: Scope = "global") -> None:
        per_layer = layer_targets(masks.names, sparsity, scope)
        self._check_layers(masks)
        limit = self.default_sparsity
        label = f"{self.n}:{self.m} prunes at most {limit:.0%} of the weights ({self.n} of every {self.m})"
        if per_layer is None:
            if _single(sparsity) > limit + 1e-9:
                raise ValueError(f"{label}, got `sparsity`={sparsity!r}. Use a target <= {limit:.4g}.")
            return
        over = {n: t for n, t in zip(masks.names, per_layer) if t > limit + 1e-9}
        if over:
            raise ValueError(f"{label}, but these layers' targets are higher: {over}. Use targets <= {limit:.4g}.")

    def complete_groups(self, masks: MaskSet) -> dict[str, float]:
        """Per masked tensor, the fraction of its groups of ``m`` that have exactly ``n`` zeros (1.0 once the
        pattern is complete)."""
        self._check_layers(masks)
        return {
            name: float(((~_groups(mask, self.m)).sum(1) == self.n).double().mean())
            for name, mask in zip(masks.names, masks.masks)
        }

    def summary(self, masks: MaskSet) -> str:
        complete = self.complete_groups(masks)
        rows = []
        for name, mask in zip(masks.names, masks.masks):
            zeros = mask.numel() - int(torch.count_nonzero(mask))
            rows.append(
                (
                    name,
                    "x".join(map(str, mask.shape)),
                    f"{zeros} / {mask.numel()}",
                    f"{zeros / mask.numel():.2%}",
                    f"{complete[name]:.2%}",
                )
            )
        rows.append(("total", "", f"{masks.num_pruned()} / {masks.numel()}", f"{masks.sparsity():.2%}", ""))
        header = ("parameter", "shape", "pruned / total", "sparsity", f"groups at {self.n}:{self.m}")
        return _table(header, rows, f"{self.n}:{self.m} pruning summary")

    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        self.check_target(masks, sparsity, scope)
        per_layer = layer_targets(masks.names, sparsity, scope)
        limit = self.default_sparsity
        for group in _groups_of(masks, per_layer, scope):
            target = min(_single(sparsity) if per_layer is None else per_layer[group[0]], limit)
            total = sum(masks.masks[i].numel() for i in group)
            pruned = sum(masks.masks[i].numel() - int(torch.count_nonzero(masks.masks[i])) for i in group)
            k = round(target * total) - pruned
            if k <= 0:
                continue
            eligible: list[Tensor] = []
            scores: list[Tensor] = []
            for i in group:
                entry = _entry_scores(self, importance, masks.names[i], masks.params[i])
                eligible.append(self._eligible(masks.names[i], masks.masks[i], entry))
                scores.append((masks.params[i].detach() if importance.pointwise else entry).contiguous())
            chosen = [e.clone() for e in eligible]
            prune_lowest_(
                scores,
                chosen,
                k,
                transform=importance.transform_ if importance.pointwise else None,
                names=[masks.names[i] for i in group],
            )
            for i, before, after in zip(group, eligible, chosen):
                masks.masks[i].logical_and_(~before | after)  # clear what prune_lowest_ took from `before`
        masks.apply_()

    def _eligible(self, name: str, mask: Tensor, scores: Tensor) -> Tensor:
        """Shaped like ``mask``: True at each group's ``n - zeros`` lowest-scored kept entries (ties: the earlier
        in the group). Works through chunks of groups, so temporaries stay small whatever the layer's size."""
        m = self.m
        kept_groups, score_groups = _groups(mask, m), _groups(scores, m)
        chosen = torch.empty_like(kept_groups)
        for start in range(0, kept_groups.shape[0], _GROUP_CHUNK):
            kept = kept_groups[start : start + _GROUP_CHUNK].t().contiguous()  # (m, groups): rows are contiguous
            quota = kept.view(torch.uint8).sum(0, dtype=torch.int16) - (m - self.n)  # zeros each group may take
            if bool((quota < 0).any()):
                raise ValueError(
                    f"The masks of {name!r} have groups of {m} with more than {self.n} zeros, so they do not follow "
                    f"the {self.n}:{self.m} pattern (were they made by another structure?); pruned entries are never "
                    "revived. Start from dense masks."
                )
            ranked = score_groups[start : start + _GROUP_CHUNK].t().contiguous().masked_fill_(~kept, float("inf"))
            rank = _rank_in_group(ranked)
            chosen[start : start + _GROUP_CHUNK] = (kept & (rank < quota)).t()
        return _ungroup(chosen, mask.shape)


#: Groups processed at once by :meth:`NMStructure._eligible` (a few MB of temporaries).
_GROUP_CHUNK = 1 << 18


def _rank_in_group(ranked: Tensor) -> Tensor:
    """For ``(m, groups)`` scores, each entry's rank within its group (column): how many entries score lower,
    or equal and come earlier. A stable sort's positions, by ``m^2`` vector comparisons for small groups."""
    m = ranked.shape[0]
    if m > 16:
        order = torch.argsort(ranked, dim=0, stable=True)
        positions = torch.arange(m, device=ranked.device)[:, None].expand_as(order)
        return torch.empty_like(order).scatter_(0, order, positions)
    rank = torch.zeros(ranked.shape, dtype=torch.uint8, device=ranked.device)
    for j in range(m):
        for i in range(m):
            if i != j:
                rank[j] += (ranked[i] <= ranked[j] if i < j else ranked[i] < ranked[j]).view(torch.uint8)
    return rank


def _groups(t: Tensor, m: int) -> Tensor:
    """``t`` as ``(groups, m)``: runs of ``m`` along dimension 1 at each position of the other dimensions."""
    return t.movedim(1, -1).reshape(-1, m)


def _ungroup(groups: Tensor, shape: torch.Size) -> Tensor:
    """The inverse of :func:`_groups`: a contiguous tensor of ``shape``."""
    moved = (shape[0], *shape[2:], shape[1])
    return groups.reshape(moved).movedim(-1, 1).contiguous()
