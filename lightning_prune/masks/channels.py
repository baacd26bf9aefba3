"""Channel groups and the masks that prune whole channels.

A :class:`ChannelGroup` lists, for every parameter a coupled channel touches, the *slices* it owns: the positions
along one dimension of one parameter (a producer's output rows and bias, BatchNorm's gamma and beta, a consumer's
input columns). A :class:`ChannelMaskSet` is an ordinary :class:`~lightning_prune.masks.MaskSet` over those
parameters that also knows the groups: a channel is pruned when every entry it owns is masked, so the masks alone
are the state to save. The groups come from tracing a model
(:func:`~lightning_prune.structures.tracing.channel_groups`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> rows = ChannelSlice("0.weight", 0, torch.arange(3), torch.arange(3))
    >>> columns = ChannelSlice("2.weight", 1, torch.arange(3), torch.arange(3))
    >>> group = ChannelGroup("0", 3, (rows, columns))
    >>> masks = ChannelMaskSet(dict(net.named_parameters()), [group])
    >>> masks.prune_channels_(group, torch.tensor([False, True, False])); masks.apply_()
    >>> masks.kept(group).tolist(), masks.channel_sparsity()
    ([True, False, True], 0.3333333333333333)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_prune.masks.maskset import MaskSet

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class ChannelSlice:
    """The entries of one parameter that a group's channels own.

    Position ``index[j]`` along dimension ``dim`` of parameter ``param`` belongs to group channel ``root[j]``
    (several positions can share a channel: a flatten maps one channel to a block of linear columns).
    ``scored`` marks the weights of convolutions and linear layers, which a channel's score is computed
    from; biases and normalisation parameters are masked with the channel but not scored.
    """

    param: str
    dim: int
    index: Tensor
    root: Tensor
    scored: bool = True

    def rows(self, tensor: Tensor) -> Tensor:
        """``tensor``'s positions of this slice, one row each: shape ``(len(index), -1)`` (a copy)."""
        return tensor.movedim(self.dim, 0).index_select(0, self.index.to(tensor.device)).reshape(len(self.index), -1)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together: one per output channel of the layer ``name``."""

    name: str
    channels: int
    slices: tuple[ChannelSlice, ...]

    def params(self) -> list[str]:
        return list(dict.fromkeys(s.param for s in self.slices))

    @cached_property
    def parts(self) -> tuple[Tensor, ...]:
        """The channel subsets that one layer owns alone, when it owns fewer than all the group's channels.

        A concatenation that feeds a residual sum makes one group of its producers' channels: producer ``a``
        owns channels 0-7, producer ``b`` channels 8-63. Each part must keep a channel of its own, or its layer
        would be emptied. Each part is a sorted tensor of channel indices; a plain group has none.
        """
        seen: dict[tuple[int, ...], Tensor] = {}
        for s in self.slices:
            root = torch.unique(s.root)
            if 0 < len(root) < self.channels:
                seen.setdefault(tuple(root.tolist()), root)
        return tuple(seen.values())


# ---------------------------------------------------------------------------------------------- masks
class ChannelMaskSet(MaskSet):
    """A :class:`~lightning_prune.masks.maskset.MaskSet` over every parameter that channel groups touch, plus the
    groups. Whole channels are pruned by :class:`ChannelStructure`; which channels are kept is read from the
    masks (a channel is pruned when every entry it owns is masked), so the masks alone are the state to save.

    Args:
        params: the parameters by qualified name (those the groups' slices name).
        groups: the channel groups, from :func:`channel_groups`.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], groups: Sequence[ChannelGroup]) -> None:
        super().__init__(params)
        self.groups: list[ChannelGroup] = list(groups)
        self._index = {n: i for i, n in enumerate(self.names)}
        missing = sorted({s.param for g in self.groups for s in g.slices} - set(self._index))
        if missing:
            raise ValueError(f"Channel groups name parameters that are not masked: {missing}.")

    def mask(self, name: str) -> Tensor:
        return self.masks[self._index[name]]

    def param(self, name: str) -> nn.Parameter:
        return self.params[self._index[name]]

    def kept(self, group: ChannelGroup) -> Tensor:
        """Boolean, one per channel of ``group``: True where the channel is kept."""
        alive = torch.zeros(group.channels, dtype=torch.long)
        for s in group.slices:
            alive.index_add_(0, s.root, s.rows(self.mask(s.param)).any(1).long().cpu())
        return alive > 0

    def prune_channels_(self, group: ChannelGroup, drop: Tensor) -> None:
        """Mask the channels of ``group`` where the boolean ``drop`` is True (call :meth:`apply_` after)."""
        for s in group.slices:
            positions = s.index[drop[s.root]]
            if len(positions):
                self.mask(s.param).movedim(s.dim, 0)[positions.to(self.mask(s.param).device)] = False

    def num_channels(self) -> int:
        return sum(g.channels for g in self.groups)

    def num_pruned_channels(self) -> int:
        return sum(int((~self.kept(g)).sum()) for g in self.groups)

    def channel_sparsity(self) -> float:
        """Fraction of pruned channels over all groups."""
        return self.num_pruned_channels() / self.num_channels()

    def group_sparsity(self) -> dict[str, float]:
        """Fraction of pruned channels per group, by the group's root layer name."""
        return {g.name: float((~self.kept(g)).float().mean()) for g in self.groups}
