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

    ``groups > 1`` marks the input side of a grouped convolution's weight, shaped ``(out, in / groups, ...)``
    with ``dim`` 1: ``index`` then holds *input channels* (every one of them, ``0 .. in - 1``), and input channel
    ``c`` owns column ``c % (in / groups)`` of the rows of convolution group ``c // (in / groups)`` only.

    Example:
        >>> weight = torch.arange(8.0).reshape(4, 2, 1, 1)  # Conv2d(4, 4, 1, groups=2): rows 0-1 read inputs 0-1
        >>> ChannelSlice("g.weight", 1, torch.arange(4), torch.arange(4), groups=2).rows(weight).tolist()
        [[0.0, 2.0], [1.0, 3.0], [4.0, 6.0], [5.0, 7.0]]
    """

    param: str
    dim: int
    index: Tensor
    root: Tensor
    scored: bool = True
    groups: int = 1

    def rows(self, tensor: Tensor) -> Tensor:
        """``tensor``'s positions of this slice, one row each: shape ``(len(index), -1)`` (a copy)."""
        index = self.index.to(tensor.device)
        if self.groups > 1:
            return self._by_input(tensor).index_select(0, index).reshape(len(self.index), -1)
        return tensor.movedim(self.dim, 0).index_select(0, index).reshape(len(self.index), -1)

    def extent(self, tensor: Tensor) -> int:
        """How many positions ``tensor`` has along this slice (a grouped convolution's input channels)."""
        return tensor.shape[self.dim] * self.groups

    def fill_(self, tensor: Tensor, positions: Tensor, value: bool | float) -> None:
        """Write ``value`` into every entry of the ``positions`` (of :attr:`index`) of ``tensor``, in place."""
        positions = positions.to(tensor.device)
        if self.groups == 1:
            tensor.movedim(self.dim, 0)[positions] = value
            return
        width, rows = tensor.shape[1], tensor.shape[0] // self.groups
        first = (positions // width).unsqueeze(1) * rows  # the first row of each input channel's convolution group
        tensor[first + torch.arange(rows, device=tensor.device), (positions % width).unsqueeze(1)] = value

    def _by_input(self, tensor: Tensor) -> Tensor:
        """A grouped convolution's weight as one row per input channel (a copy): ``(in, out / groups * ...)``."""
        out, width = tensor.shape[0], tensor.shape[1]
        grouped = tensor.reshape(self.groups, out // self.groups, width, -1).transpose(1, 2)
        return grouped.reshape(self.groups * width, -1)


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

    @cached_property
    def blocks(self) -> Tensor | None:
        """The block of each channel, when the group runs through grouped convolutions; ``None`` otherwise.

        A grouped convolution keeps its ``groups`` only if every convolution group keeps as many channels as the
        others, so the group's channels fall into equal blocks (those that share a convolution group in every
        grouped convolution of the group) and each block must lose the same number of channels. Block ids run
        from 0; every block is as large as the others.
        """
        ids = torch.zeros(self.channels, dtype=torch.long)
        grouped = False
        for s in self.slices:
            if s.groups > 1:
                grouped = True
                block = torch.zeros(self.channels, dtype=torch.long)
                block[s.root] = s.index // (len(s.index) // s.groups)
                ids = ids * s.groups + block
        return torch.unique(ids, return_inverse=True)[1] if grouped else None


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
                s.fill_(self.mask(s.param), positions, False)

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
