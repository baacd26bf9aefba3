"""Block pruning: whole ``bh x bw`` tiles of each weight's 2-D GEMM view, for block-sparse kernels (Narang et al.,
2017, "Block-Sparse Recurrent Neural Networks"; Gray et al., 2017, "GPU Kernels for Block-Sparse Weights").

Example:
    >>> from torch import nn
    >>> from lightning_prune.criteria import MagnitudeImportance
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> blocks = BlockStructure((2, 4))
    >>> masks = blocks.bind(net)
    >>> blocks.prune_(masks, MagnitudeImportance(), sparsity=0.5, scope="layer")
    >>> blocks.layer_sparsity(masks)  # fractions of blocks
    {'0.weight': 0.5, '2.weight': 0.5}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune._helpers import is_int, text_table
from lightning_prune.criteria.base import Importance
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.masks.selection import prune_lowest_
from lightning_prune.structures._patterns import (
    check_entry_importance,
    check_matrix,
    entry_scores,
    groups_of,
    layer_name,
    single_target,
)
from lightning_prune.structures.base import Scope, Structure, Target, layer_targets


# ---------------------------------------------------------------------------------------------- blocks
class BlockStructure(Structure):
    """Prune whole ``block_shape`` tiles of every weight's 2-D GEMM view.

    The GEMM view of a Linear weight is ``(out_features, in_features)``; of a convolution's,
    ``(out_channels, in_channels / groups * prod(kernel_size))``, the im2col matrix, whose columns run over input
    channels, then kernel positions (for any weight: its first dimension by the rest, flattened). Tiles start at
    ``(0, 0)``; where the block does not divide a dimension, the last row or column of tiles is partial (smaller).

    A tile's score is the mean of the importance's per-entry scores over its entries. For
    :class:`~lightning_prune.criteria.magnitude.LpNormImportance` ``(p)`` (magnitude, ``l1``, ``l2``) that is
    ``sum |w|^p / size``, the p-th power of the tile's Lp norm normalised by its size, which ranks tiles exactly as
    the normalised norm does; for any other per-entry criterion, the sum of its scores over the size. Dividing by
    the size lets a partial edge tile compete fairly with full ones.

    ``sparsity`` counts tiles: exactly ``round(sparsity * B)`` are pruned, ``B`` counting every tile
    (``scope="global"``: one ranking across layers) or each weight's own (``scope="layer"``); a mapping
    ``{layer-name pattern: sparsity}`` prunes each weight to its own fraction of tiles. :meth:`sparsity` and
    :meth:`layer_sparsity` report fractions of tiles (a partial tile counts as one, so the fraction of zero
    weights can differ slightly). The lowest-scored tiles go first, ties to the earliest (layer order, then tile
    row by tile row); a tile is pruned when all its entries are masked, and pruned tiles are never revived.

    Sharded weights (FSDP2's row shards, :class:`~lightning_prune.masks.sharded.ShardedMaskSet`): every shard must
    hold whole tiles, i.e. start at a row that is a multiple of the block height and end at one or at the last
    row; then each rank scores its own tiles and the selection is exact over every rank's, so the masks are those
    one process computes on the whole weights.

    Args:
        block_shape: ``(rows, columns)`` of a tile, positive integers; an int ``b`` means ``(b, b)``.
            ``(1, k)`` prunes runs of ``k`` weights along a row.

    Raises:
        ValueError: ``block_shape`` is not one or two positive integers; at :meth:`bind` or pruning, a weight
            whose GEMM view is smaller than a block, or a sharded weight whose shards split tiles.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune.criteria import MagnitudeImportance
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
            and all(is_int(b) and b >= 1 for b in shape)
        )
        if not valid:
            raise ValueError(
                f"`block_shape` must be two positive integers (rows, columns) such as (4, 4), or one for a square "
                f"block, got {block_shape!r}."
            )
        self.block_shape: tuple[int, int] = (int(shape[0]), int(shape[1]))

    def __repr__(self) -> str:
        return f"BlockStructure(block_shape={self.block_shape})"

    def check_bound(self, module: nn.Module, masks: MaskSet) -> None:
        self._check_layers(masks)
        self._kept_counts(masks)  # sharded masks count their tiles from now on (binding is a collective)

    def _check_layers(self, masks: MaskSet) -> None:
        bh, bw = self.block_shape
        for i, (name, param) in enumerate(zip(masks.names, masks.params)):
            check_matrix(self, name, param)
            rows, cols = param.shape[0], math.prod(param.shape[1:])
            if bh > rows or bw > cols:
                raise ValueError(
                    f"Block shape {bh}x{bw} is larger than the {rows}x{cols} GEMM view of {name!r} (shape "
                    f"{tuple(param.shape)}). Add {layer_name(name)!r} to `ignore` or use a smaller `block_shape`."
                )
            shards = masks.row_shards(i)
            split = [(a, b) for a, b in shards if b > a and (a % bh or (b % bh and b != rows))]
            if split:
                held = ", ".join(f"[{a}:{b})" for a, b in shards)
                per = shards[0][1] - shards[0][0]
                raise ValueError(
                    f"Block pruning with {bh}-row tiles needs every row shard to hold whole tiles, but {name!r} "
                    f"(shape {tuple(param.shape)}) is sharded over {len(shards)} processes as rows {held}: rows "
                    f"[{split[0][0]}:{split[0][1]}) cut a tile. Use a block height that divides {per} (the rows "
                    f"of a shard), give the layer a multiple of {len(shards) * bh} rows, or add "
                    f"{layer_name(name)!r} to `ignore`."
                )

    def kept_blocks(self, masks: MaskSet) -> list[Tensor]:
        """Per masked tensor, a boolean ``(ceil(rows / bh), ceil(cols / bw))`` tensor: True where a tile is
        kept (some entry of it is not masked). For sharded masks, the tiles of this rank's rows."""
        self._check_layers(masks)
        return [self._kept(m) for m in masks.masks]

    def _kept(self, mask: Tensor) -> Tensor:
        bh, bw = self.block_shape
        return _tiles(mask.reshape(mask.shape[0], math.prod(mask.shape[1:])), bh, bw, fill=False).any(dim=(1, 3))

    def _kept_counts(self, masks: MaskSet) -> list[int]:
        """Per masked tensor, its kept tiles (over the whole tensor: the shards hold whole tiles)."""
        bh, bw = self.block_shape
        return masks.tally(f"{bh}x{bw} kept blocks", lambda mask: int(self._kept(mask).sum()))

    def _tile_counts(self, masks: MaskSet) -> list[int]:
        """Per masked tensor, all its tiles."""
        bh, bw = self.block_shape
        return [math.ceil(p.shape[0] / bh) * math.ceil(math.prod(p.shape[1:]) / bw) for p in masks.params]

    def sparsity(self, masks: MaskSet) -> float:
        """The fraction of pruned tiles over all masked tensors."""
        self._check_layers(masks)
        total = sum(self._tile_counts(masks))
        return (total - sum(self._kept_counts(masks))) / total

    def layer_sparsity(self, masks: MaskSet) -> dict[str, float]:
        """The fraction of pruned tiles per masked tensor."""
        self._check_layers(masks)
        counts = zip(masks.names, self._tile_counts(masks), self._kept_counts(masks))
        return {n: (total - kept) / total for n, total, kept in counts}

    def check_importance(self, importance: Importance) -> None:
        check_entry_importance(self, importance)

    def check_target(self, masks: MaskSet, sparsity: Target, scope: Scope = "global") -> None:
        layer_targets(masks.names, sparsity, scope)
        self._check_layers(masks)

    def summary(self, masks: MaskSet) -> str:
        bh, bw = self.block_shape
        rows = []
        self._check_layers(masks)
        tiles, kept = self._tile_counts(masks), self._kept_counts(masks)
        numel, zeros = masks.entry_counts()
        for i, (name, param) in enumerate(zip(masks.names, masks.params)):
            pruned = tiles[i] - kept[i]
            rows.append(
                (
                    name,
                    f"{param.shape[0]}x{math.prod(param.shape[1:])}",
                    f"{pruned} / {tiles[i]}",
                    f"{pruned / tiles[i]:.2%}",
                    f"{zeros[i] / numel[i]:.2%}",
                )
            )
        total = sum(tiles)
        pruned = total - sum(kept)
        rows.append(("total", "", f"{pruned} / {total}", f"{pruned / total:.2%}", f"{masks.sparsity():.2%}"))
        header = ("parameter", "GEMM view", "pruned blocks", "block sparsity", "weight sparsity")
        return text_table([header, *rows], f"Block pruning summary ({bh}x{bw} blocks)")

    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        per_layer = layer_targets(masks.names, sparsity, scope)
        kept = self.kept_blocks(masks)  # this rank's tiles when sharded: its rows hold whole tiles
        tiles, kept_now = self._tile_counts(masks), self._kept_counts(masks)
        local = masks.local_tensors()
        bh, bw = self.block_shape
        scores: dict[int, Tensor] = {}
        for group in groups_of(masks, per_layer, scope):
            target = single_target(sparsity) if per_layer is None else per_layer[group[0]]
            total = sum(tiles[i] for i in group)
            pruned = total - sum(kept_now[i] for i in group)
            k = round(target * total) - pruned
            if k <= 0:
                continue
            for i in group:
                entry = entry_scores(self, importance, masks.names[i], local[i])
                scores[i] = _block_means(entry.reshape(entry.shape[0], math.prod(entry.shape[1:])), bh, bw)
            args = masks.selection_args(group)
            if "offsets" in args:  # where each rank's tiles start in the whole tensor's tiles, row by row
                args["offsets"] = [masks.row_shards(i)[masks.rank][0] // bh * kept[i].shape[1] for i in group]
            prune_lowest_(
                [scores[i] for i in group], [kept[i] for i in group], k, names=[masks.names[i] for i in group], **args
            )
        for i in scores:  # the tensors whose tiles may have changed
            mask = masks.masks[i]
            rows, cols = mask.shape[0], math.prod(mask.shape[1:])
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
    if nr == 0:  # an empty shard
        return sums
    heights = torch.full((nr,), float(bh), dtype=torch.float64, device=sums.device)
    heights[-1] = rows - (nr - 1) * bh
    widths = torch.full((nc,), float(bw), dtype=torch.float64, device=sums.device)
    widths[-1] = cols - (nc - 1) * bw
    return sums / (heights[:, None] * widths[None, :])
