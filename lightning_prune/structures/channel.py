"""Channel pruning: whole coupled channels, scored by a norm of their weights or by a channel criterion.

:class:`ChannelStructure` scores each channel of a traced group (:mod:`lightning_prune.structures.tracing`) and
grows boolean masks so that whole channels are pruned: producer rows and biases, BatchNorm gamma and beta, the
consumers' input columns. Shapes never change during training, so the masks are kept exact by the same hooks as
unstructured pruning; :func:`lightning_prune.deploy.compact` then removes the pruned channels.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
    >>> masks = prune_channels_(net, torch.randn(2, 3, 8, 8), sparsity=0.5)
    >>> masks.channel_sparsity()
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_prune._helpers import is_int, text_table
from lightning_prune.criteria import build_importance
from lightning_prune.criteria.base import Importance
from lightning_prune.criteria.magnitude import LpNormImportance
from lightning_prune.masks.channels import ChannelGroup, ChannelMaskSet
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.structures._patterns import single_target
from lightning_prune.structures.base import Scope, Structure, Target, check_sparsity, layer_targets
from lightning_prune.structures.tracing import ExampleInputs, channel_groups

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------------------------------------- structure
class ChannelStructure(Structure):
    """Prune whole coupled channels, scored by the Lp norm over every entry the channel owns.

    The score of channel c of a group is ``(sum of |w|^p over its weight slices)^(1/p)``: the rows of the
    convolutions and linear layers that produce it and the input columns of those that consume it (Li et
    al., 2017, "Pruning Filters for Efficient ConvNets", extended to coupled groups). Pruning a channel masks
    all it owns: those slices, the producers' biases and the BatchNorm gamma and beta.

    ``sparsity`` is the fraction of channels pruned, counted over all prunable groups (``scope="global"``)
    or within each group (``scope="layer"``). With a global scope each group's scores are divided by their
    mean over its kept channels, as in Torch-Pruning's global pruning, so layers of different width and
    weight scale compete on relative importance.

    A group that runs through grouped convolutions (ResNeXt, RegNet: input channel ``c`` goes with output channel
    ``c``) has equal blocks (:attr:`~lightning_prune.masks.channels.ChannelGroup.blocks`: the channels that share a
    convolution group), and every block loses as many channels as the others, its own lowest-scored ones, so the
    compact convolution keeps ``groups``. Its kept count is a multiple of the number of blocks (and of
    ``round_to``); with a global scope the k-th lowest channels of all blocks compete as one entry, by their mean
    score, taken when it brings the count pruned closer to the target.

    Args:
        round_to: keep a multiple of this many channels in every group that is pruned (8 or 16 suits SIMD
            kernels); the count is rounded to the nearest multiple, so the achieved sparsity can differ
            slightly from the target.
        max_layer_sparsity: the largest fraction of a group's channels that may be pruned, in [0, 1); at
            least one channel (and at least ``round_to``) always stays, so no layer is ever emptied.

    Example:
        >>> from torch import nn
        >>> from lightning_prune.criteria import build_importance
        >>> net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> structure = ChannelStructure(round_to=8)
        >>> masks = structure.bind(net, example_inputs=torch.randn(2, 4))
        >>> structure.prune_(masks, build_importance("l1"), sparsity=0.6)
        >>> masks.group_sparsity()  # 19.2 channels asked, 16 kept (a multiple of 8)
        {'0': 0.5}
    """

    name = "channel"
    needs_example_inputs = True

    def __init__(self, round_to: int = 1, max_layer_sparsity: float = 0.9) -> None:
        if not is_int(round_to) or round_to < 1:
            raise ValueError(f"`round_to` must be a positive integer, got {round_to!r}.")
        check_sparsity(max_layer_sparsity, "max_layer_sparsity")
        self.round_to = int(round_to)
        self.max_layer_sparsity = float(max_layer_sparsity)

    def __repr__(self) -> str:
        return f"ChannelStructure(round_to={self.round_to}, max_layer_sparsity={self.max_layer_sparsity})"

    def bind(
        self, module: nn.Module, ignore: Sequence[str] = (), example_inputs: ExampleInputs = None
    ) -> ChannelMaskSet:
        groups = channel_groups(module, example_inputs, ignore)
        named = dict(module.named_parameters())
        masks = ChannelMaskSet({name: named[name] for g in groups for name in g.params()}, groups)
        for g in masks.groups:
            self._min_keep(g)  # fail now on a `round_to` that cannot fit a group
        return masks

    def layer_names(self, masks: MaskSet) -> list[str]:
        return [g.name for g in _channel_masks(masks).groups]

    def sparsity(self, masks: MaskSet) -> float:
        return _channel_masks(masks).channel_sparsity()

    def layer_sparsity(self, masks: MaskSet) -> dict[str, float]:
        return _channel_masks(masks).group_sparsity()

    def check_importance(self, importance: Importance) -> None:
        _norm_order(importance)

    def check_target(self, masks: MaskSet, sparsity: Target, scope: Scope = "global") -> None:
        masks = _channel_masks(masks)
        per_group = layer_targets([g.name for g in masks.groups], sparsity, scope)
        if per_group is not None:  # per-layer targets: fractions of each group's channels
            over = {g.name: t for g, t in zip(masks.groups, per_group or []) if t > self.max_layer_sparsity}
            if over:
                raise ValueError(
                    f"Cannot prune these layers' channels to their targets with `max_layer_sparsity`="
                    f"{self.max_layer_sparsity}: {over}. Lower their targets or raise `max_layer_sparsity`."
                )
            return
        single = single_target(sparsity)  # one number: layer_targets checked it
        if scope == "layer":
            if single > self.max_layer_sparsity:
                raise ValueError(
                    f"Cannot prune {single:.0%} of every layer's channels with `max_layer_sparsity`="
                    f"{self.max_layer_sparsity}. Lower the sparsity or raise `max_layer_sparsity`."
                )
            return
        total = masks.num_channels()
        room = sum(g.channels - self._min_keep(g) for g in masks.groups)
        if round(single * total) > room:
            raise ValueError(
                f"Cannot prune {single:.0%} of the channels: with `max_layer_sparsity`={self.max_layer_sparsity} "
                f"and `round_to`={self.round_to} at most {room / total:.1%} can go. Lower the sparsity or raise "
                "`max_layer_sparsity`."
            )

    def summary(self, masks: MaskSet) -> str:
        return channel_table(_channel_masks(masks))

    def _min_keep(self, group: ChannelGroup) -> int:
        r = self.round_to
        if group.channels < r:
            raise ValueError(
                f"`round_to`={r} would empty layer {group.name!r}, which has {group.channels} channels. "
                f"Lower `round_to` or add {group.name!r} to `ignore`."
            )
        unit = self._unit(group)
        keep = self._floor(group.channels)
        return min(math.ceil(keep / unit) * unit, group.channels)

    def _unit(self, group: ChannelGroup) -> int:
        """The step of a group's kept-channel count: ``round_to``, and a multiple of the group's blocks (a grouped
        convolution's groups each keep as many channels as the others)."""
        return self.round_to if group.blocks is None else math.lcm(self.round_to, _num_blocks(group))

    def _floor(self, channels: int) -> int:
        """The fewest of ``channels`` that ``max_layer_sparsity`` lets stay (at least one)."""
        return max(1, math.ceil((1.0 - self.max_layer_sparsity) * channels - 1e-9))

    def _part_room(self, group: ChannelGroup, kept: Tensor) -> _PartRoom | None:
        return _PartRoom(group, kept, self._floor) if group.parts else None

    def _rounded(self, group: ChannelGroup, wanted: int, kept: int) -> int:
        """The channel count to keep: ``wanted`` rounded to a multiple of ``round_to``, within the cap and
        never more than the ``kept`` channels (nothing is revived)."""
        unit = self._unit(group)
        if wanted >= kept:
            return kept
        rounded = max(round(wanted / unit), 1) * unit if unit > 1 else wanted
        return min(max(rounded, self._min_keep(group)), kept)

    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        masks = _channel_masks(masks)
        per_group = layer_targets([g.name for g in masks.groups], sparsity, scope)
        single = 0.0 if per_group is not None else float(sparsity)  # type: ignore[arg-type]
        p = _norm_order(importance)
        self.check_target(masks, sparsity, scope)
        kept = [masks.kept(g) for g in masks.groups]
        if per_group is not None or scope == "layer":
            fractions = per_group if per_group is not None else [single] * len(masks.groups)
            targets = [
                self._rounded(g, g.channels - round(f * g.channels), int(k.sum()))
                for g, k, f in zip(masks.groups, kept, fractions)
            ]
            scores = [_channel_scores(masks, g, p, importance) for g in masks.groups]
        else:
            scores = [_relative(_channel_scores(masks, g, p, importance), k) for g, k in zip(masks.groups, kept)]
            targets = self._global_targets(masks, scores, kept, single)
        for g, k, s, target in zip(masks.groups, kept, scores, targets):
            excess = int(k.sum()) - target
            if excess <= 0:
                continue
            candidates = torch.nonzero(k).flatten()
            order = candidates[torch.sort(s[candidates], stable=True).indices]
            drop = torch.zeros(g.channels, dtype=torch.bool)
            room = self._part_room(g, k)
            if g.blocks is not None:  # each block keeps as many channels as the others: its own lowest go
                for block in _block_orders(g.blocks, k, s):
                    drop[block[: max(len(block) - target // _num_blocks(g), 0)]] = True
            elif room is None:
                drop[order[:excess]] = True
            else:  # every layer that owns part of the group keeps its own share (a concatenation's producers)
                for c in order.tolist():
                    if room.take(c):
                        drop[c] = True
                        excess -= 1
                        if excess == 0:
                            break
            masks.prune_channels_(g, drop)
        masks.apply_()

    def _global_targets(
        self, masks: ChannelMaskSet, scores: list[Tensor], kept: list[Tensor], sparsity: float
    ) -> list[int]:
        """Per group, how many channels to keep so that the lowest-scored channels overall go first."""
        groups = masks.groups
        counts = [int(k.sum()) for k in kept]
        total = masks.num_channels()
        to_prune = round(sparsity * total) - (total - sum(counts))
        if to_prune <= 0:
            return counts
        floors = [self._min_keep(g) for g in groups]
        # One entry per channel; a group with blocks has one entry per tier instead: the k-th lowest-scored channel
        # of every block, pruned together and ranked by their mean score.
        values, owner, channel, size = [], [], [], []
        for i, (g, s, k) in enumerate(zip(groups, scores, kept)):
            blocks = g.blocks
            if blocks is None:
                values.append(s[k])
                channel.append(torch.nonzero(k).flatten())
                owner.append(torch.full((counts[i],), i, dtype=torch.long))
                size.append(torch.ones(counts[i], dtype=torch.long))
                continue
            orders = _block_orders(blocks, k, s)
            tiers = min(len(o) for o in orders)
            values.append(torch.stack([s[o[:tiers]] for o in orders]).mean(0))
            channel.append(torch.full((tiers,), -1, dtype=torch.long))
            owner.append(torch.full((tiers,), i, dtype=torch.long))
            size.append(torch.full((tiers,), len(orders), dtype=torch.long))
        rooms = [self._part_room(g, k) for g, k in zip(groups, kept)]
        order = torch.sort(torch.cat(values), stable=True).indices.tolist()
        owners, channels, sizes = torch.cat(owner).tolist(), torch.cat(channel).tolist(), torch.cat(size).tolist()
        remaining = list(counts)
        taken = 0
        for j in order:
            i, n = owners[j], sizes[j]
            if n > 1 and taken + n - to_prune > to_prune - taken:
                continue  # a whole tier would overshoot the target by more than leaving it undershoots
            room = rooms[i]
            if remaining[i] - n >= floors[i] and (room is None or room.take(channels[j])):
                remaining[i] -= n
                taken += n
                if taken >= to_prune:
                    break
        return [self._rounded(g, want, c) for g, want, c in zip(groups, remaining, counts)]


def _num_blocks(group: ChannelGroup) -> int:
    return 0 if group.blocks is None else int(group.blocks.max()) + 1


def _block_orders(blocks: Tensor, kept: Tensor, scores: Tensor) -> list[Tensor]:
    """The kept channels of each block (:attr:`ChannelGroup.blocks`), lowest-scored first."""
    orders = []
    for b in range(int(blocks.max()) + 1):
        candidates = torch.nonzero(kept & (blocks == b)).flatten()
        orders.append(candidates[torch.sort(scores[candidates], stable=True).indices])
    return orders


class _PartRoom:
    """How many more channels each part of a group (:attr:`ChannelGroup.parts`) may lose before reaching its
    floor: the cap holds for every layer that owns part of the group, not only for the group as a whole."""

    def __init__(self, group: ChannelGroup, kept: Tensor, floor: Callable[[int], int]) -> None:
        self.room = [int(kept[p].sum()) - floor(len(p)) for p in group.parts]
        self.member: dict[int, list[int]] = {}
        for i, p in enumerate(group.parts):
            for c in p.tolist():
                self.member.setdefault(c, []).append(i)

    def take(self, channel: int) -> bool:
        """Count ``channel`` as pruned if every part that holds it has room; whether it was."""
        parts = self.member.get(channel, [])
        if any(self.room[i] <= 0 for i in parts):
            return False
        for i in parts:
            self.room[i] -= 1
        return True


def channel_table(masks: ChannelMaskSet) -> str:
    """A plain-text table per channel group: root layer, kept / total channels, fraction pruned."""
    rows = [("group (root layer)", "kept / channels", "pruned")]
    for g in masks.groups:
        kept = int(masks.kept(g).sum())
        rows.append((g.name, f"{kept} / {g.channels}", f"{1 - kept / g.channels:.2%}"))
    total, pruned = masks.num_channels(), masks.num_pruned_channels()
    rows.append(("total", f"{total - pruned} / {total}", f"{pruned / total:.2%}"))
    return text_table(rows, "Channel pruning summary")


def _channel_masks(masks: MaskSet) -> ChannelMaskSet:
    if not isinstance(masks, ChannelMaskSet):
        raise TypeError(
            f"Channel pruning needs a ChannelMaskSet (from ChannelStructure.bind), got {type(masks).__name__}."
        )
    return masks


def _norm_order(importance: Importance) -> int | None:
    """The order of a weight-norm criterion, or None for a criterion that scores channels itself."""
    p = getattr(importance, "p", None)
    if isinstance(importance, LpNormImportance) and p in (1, 2):
        return int(p)
    if getattr(importance, "scores_channels", False):
        return None
    raise ValueError(
        f"structure='channel' scores channels by a norm of their weights or by a channel criterion: it supports "
        f"importance 'l1', 'l2' or 'magnitude' (= 'l1'), and 'taylor', 'fisher', 'apoz' or 'activation' (from "
        f"gradients or activations collected in training), not {importance!r}. A custom criterion scores channels "
        "by setting `scores_channels = True` and implementing `channel_scores(masks, group)`."
    )


def _relative(scores: Tensor, kept: Tensor) -> Tensor:
    """Scores over their mean among the kept channels."""
    mean = scores[kept].mean() if bool(kept.any()) else scores.new_ones(())
    return scores / mean if float(mean) > 0 else scores


def _channel_scores(
    masks: ChannelMaskSet, group: ChannelGroup, p: int | None, importance: Importance | None = None
) -> Tensor:
    """The Lp norm of each channel over its weight slices (``p`` None: ``importance``'s own channel scores), in
    float64 on the CPU."""
    if p is None:
        if importance is None:
            raise TypeError("Channel scores of a criterion that scores channels itself need the `importance`.")
        scores = importance.channel_scores(masks, group)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (group.channels,):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(
                f"{importance!r} returned channel scores of shape {shape} for group {group.name!r}, which has "
                f"{group.channels} channels: it must return one score per channel."
            )
        scores = scores.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(
                f"{importance!r} returned NaN or infinite channel scores for group {group.name!r}; the masks were "
                "not changed."
            )
        return scores
    sums = torch.zeros(group.channels, dtype=torch.float64)
    for s in group.slices:
        if not s.scored:
            continue
        rows = s.rows(masks.param(s.param).detach()).to(torch.float64)
        per_row = rows.abs().sum(1) if p == 1 else rows.square().sum(1)
        sums.index_add_(0, s.root, per_row.cpu())
    return sums if p == 1 else sums.sqrt()


def prune_channels_(
    model: nn.Module,
    example_inputs: ExampleInputs,
    sparsity: float,
    importance: str | Importance = "l1",
    scope: Scope = "global",
    round_to: int = 1,
    max_layer_sparsity: float = 0.9,
    ignore: Sequence[str] = (),
) -> ChannelMaskSet:
    """One-shot channel pruning in place: zero the lowest-scored coupled channels of ``model``.

    The masks are returned but no hooks are installed: train on with :meth:`MaskSet.attach` to keep the
    channels at zero, or call :func:`compact` to remove them.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> prune_channels_(net, torch.randn(2, 4), sparsity=0.3).num_pruned_channels()
        3
    """
    structure = ChannelStructure(round_to=round_to, max_layer_sparsity=max_layer_sparsity)
    masks = structure.bind(model, ignore, example_inputs)
    structure.prune_(masks, build_importance(importance), sparsity, scope)
    return masks
