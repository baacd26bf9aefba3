"""Activation criteria for channels: APoZ and mean absolute activation, from forward hooks.

Both score the channels of :class:`~lightning_prune.structures.channel.ChannelStructure` groups from statistics of
their activations, collected by forward pre-hooks that exist only while a window is open
(:meth:`~lightning_prune.criteria.base.Importance.start` to :meth:`~lightning_prune.criteria.base.Importance.stop`,
and only until ``batches`` steps are recorded): a running sum and a count per channel, no stored activations.

**Where a channel's activation is measured.** At the input of every convolution and linear layer that reads
the channel: the layers whose input columns the channel's group owns (the next convolution, the linear layer
after a flatten, a depthwise convolution). That is the activation after the nonlinearity and whatever else
runs between (pooling, a residual addition), the tensor the network actually passes on, so:

* APoZ counts the exact zeros a ReLU (or ReLU6, or a max-pool of them) leaves, as Hu et al. define it,
  without guessing them from the sign of a pre-activation; a channel that is always zero where it is read
  scores 0 and goes first, and removing it changes nothing.
* A residual group, whose channel several producers write into one sum, needs no special case: its readers
  see the sum after its nonlinearity. A channel read in several places (a residual stream read by every
  block, a depthwise convolution and the pointwise one after it) pools its statistics over all of them.
* After a flatten, a channel owns a block of the linear layer's input columns; its statistics pool them.

* Heads and neurons of :class:`~lightning_prune.structures.heads.HeadStructure` are measured the same way: a head
  at the input of the output projection (its output, before the heads are mixed), a neuron at the input of the
  down projection (Hugging Face's transposed ``Conv1D`` included). ``nn.MultiheadAttention`` never calls its
  ``out_proj`` as a module, nor torchvision's Swin attention its ``proj``, so their hooks recompute the head
  outputs from the attention's inputs (one more attention pass per recorded forward, only while the window is
  open).

The producing layer's own output (the convolution, or its BatchNorm) would be the pre-activation: zeros
would have to be assumed from its sign, and another nonlinearity or an addition on the way would be missed.

Only forward passes in training mode are recorded by default (validation passes inside a window do not
count); ``training_only=False`` records every pass, e.g. calibration batches run in eval mode. Activation
statistics differ from process to process under DDP: :meth:`~ActivationStatistics.reduce_` sums them over
the ranks, after which every rank scores the same.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.structures.channel import ChannelStructure
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> structure = ChannelStructure()
    >>> masks = structure.bind(net, example_inputs=torch.randn(2, 4))
    >>> apoz = APoZImportance(batches=2)
    >>> apoz.start(net, masks)
    >>> for _ in range(2):
    ...     _ = net(torch.randn(32, 4))
    ...     _ = apoz.observe(masks)  # once per step: the window is full after 2, and the hooks go
    >>> apoz.stop()
    >>> structure.prune_(masks, apoz, sparsity=0.5)
    >>> masks.channel_sparsity()
    0.5
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune._attention import attention_context, projections, sequence_first, window_attention
from lightning_prune.criteria.base import STATE_VERSION, AllReduce, StatisticsImportance
from lightning_prune.masks.channels import ChannelGroup, ChannelMaskSet
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.masks.params import hf_conv1d_type


@dataclass(frozen=True)
class _Reader:
    """Positions ``index`` along a reading layer's input channels belong to channel ``root`` of group ``key``;
    ``positions[c]`` counts the positions of channel c."""

    key: str
    index: Tensor
    root: Tensor
    positions: Tensor
    #: ``index`` and ``root`` are both ``0 .. channels - 1``: the statistics add up without indexing.
    identity: bool = False


def _reads(module: nn.Module, dim: int) -> bool:
    """Whether a group slice along ``dim`` of ``module``'s weight is on the module's input side."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return module.groups == 1 and dim == 0
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups == 1:
            return dim == 1
        if module.groups == module.in_channels == module.out_channels:  # depthwise: input c is output c
            return True
        return dim == 1 and module.in_channels == module.out_channels  # a grouped convolution's input channels
    conv1d = hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return dim == 0  # Hugging Face's Conv1D: a linear layer with an (in, out) weight
    return isinstance(module, nn.Linear) and dim == 1


#: The arguments of ``nn.MultiheadAttention.forward`` a hook needs, in order.
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def _is_window_attention(module: nn.Module) -> bool:
    """Swin's window attention (torchvision's, or a compact one): a ``qkv`` and a ``proj`` layer, a position bias."""
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "proj", None), nn.Linear)
        and callable(getattr(module, "get_relative_position_bias", None))
        and hasattr(module, "window_size")
    )


def _window_head_outputs(module: Any, x: object) -> Tensor | None:
    """The concatenated head outputs of Swin's window attention ``module`` for input ``x``: torchvision applies its
    ``proj`` with ``F.linear``, never as a module, so they are recomputed."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        return None
    num_heads = int(module.num_heads)
    head_dim = int(getattr(module, "head_dim", module.qkv.out_features // 3 // num_heads))
    logit_scale = getattr(module, "logit_scale", None)
    return window_attention(
        x, module.qkv.weight, module.qkv.bias, module.get_relative_position_bias(), module.window_size,
        module.shift_size, num_heads, head_dim, logit_scale=logit_scale if isinstance(logit_scale, Tensor) else None,
    )  # fmt: skip


def _head_outputs(module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The concatenated head outputs of ``module`` for a call with ``args`` and ``kwargs``: the input its
    ``out_proj`` would read, which ``nn.MultiheadAttention`` never calls as a module (None for nested tensors)."""
    values = dict(zip(_MHA_ARGS, args))
    values.update(kwargs)
    query, key, value = values.get("query"), values.get("key"), values.get("value")
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return None
    if query.is_nested or key.is_nested or value.is_nested:
        return None
    q, k, v, padding, _ = sequence_first(query, key, value, values.get("key_padding_mask"), module.batch_first)
    context, _ = attention_context(
        q, k, v, projections(module), module.num_heads, module.head_dim,
        key_padding_mask=padding, attn_mask=values.get("attn_mask"),
    )  # fmt: skip
    return context


def _channel_dim(module: nn.Module, x: Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1 if x.dim() == len(module.kernel_size) + 2 else 0
    return x.dim() - 1


class ActivationStatistics(StatisticsImportance):
    """Base of the channel criteria that hook the layers reading each channel (see the module docstring).

    Per channel it keeps the sum of a per-activation statistic (:meth:`_per_position`) and the number of
    activations seen; :meth:`_score` turns their ratio into the channel's score.

    Args:
        batches: the optimizer steps (calls of :meth:`observe` after at least one recorded forward pass) to
            collect over; the hooks are removed once they are recorded.
        training_only: record only forward passes of layers in training mode.
    """

    collects = "activations"
    scores_entries = False
    scores_channels = True

    def __init__(self, batches: int = 16, training_only: bool = True) -> None:
        super().__init__(batches)
        if not isinstance(training_only, bool):
            raise TypeError(f"`training_only` must be True or False, got {training_only!r}.")
        self.training_only = training_only
        self._local: dict[str, Tensor] = {}  # (2, channels) float64: [sum, count], this process since reduce_
        self._reduced: dict[str, Tensor] = {}  # the same, summed over every process by reduce_
        self._plan: dict[nn.Module, list[_Reader]] = {}
        self._read_by: dict[str, list[str]] = {}  # reading layers per group, for messages
        self._handles: list[RemovableHandle] = []
        self._fired = False

    def __call__(self, name: str, param: Tensor) -> Tensor:
        raise ValueError(
            f"{self!r} scores whole channels from their activations and cannot score the single entries of "
            f"{name!r}: use it with structure='channel'. For single weights, blocks or N:M use 'magnitude', "
            "'taylor' or 'fisher'."
        )

    @property
    def readers(self) -> dict[str, list[str]]:
        """By channel group (its root layer's name), the layers whose inputs are measured (set by :meth:`start`)."""
        return {k: list(v) for k, v in self._read_by.items()}

    @property
    def hooked(self) -> bool:
        """True while forward hooks are installed."""
        return bool(self._handles)

    # ------------------------------------------------------------------ protocol
    def start(self, module: nn.Module, masks: MaskSet) -> None:
        """Install a forward pre-hook on every layer of ``module`` that reads a channel of ``masks``' groups.

        Raises:
            TypeError: ``masks`` is not a :class:`~lightning_prune.masks.channels.ChannelMaskSet`.
            ValueError: ``masks`` was not built on ``module``, a group has no reading convolution or linear
                layer, or loaded statistics do not fit the groups.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        groups = self._groups(masks)
        self._remove_hooks()
        self._plan, self._read_by = _plan(self, module, groups)
        self._bind(groups, self._plan)
        self._collecting = True
        self._fired = False
        self._install()

    def observe(self, masks: MaskSet) -> bool:
        """Close one step: True when a forward pass was recorded since the last step. Once :attr:`batches`
        steps are recorded the hooks are removed."""
        if not self._collecting or self.ready or not self._fired:
            return False
        self._fired = False
        self._steps += 1
        if self.ready:
            self._remove_hooks()
        return True

    def stop(self) -> None:
        """Remove every hook; the statistics stay for scoring."""
        self._remove_hooks()
        self._collecting = False

    @torch.no_grad()
    def reduce_(self, all_reduce: AllReduce) -> None:
        """Sum this process's statistics over all ranks with ``all_reduce`` (one call, on one flat float64
        tensor; a collective: every rank must call it). Statistics reduced before are not summed again, so
        calling it twice, or collecting more and reducing again, counts everything once.

        Raises:
            ValueError: ``all_reduce`` returned a tensor of another shape.
        """
        keys = sorted(self._local)
        if not keys:
            return
        device = self._local[keys[0]].device
        flat = torch.cat([self._local[k].reshape(-1).to(device) for k in keys])
        out = all_reduce(flat)
        summed = out if isinstance(out, Tensor) else flat
        if summed.shape != flat.shape:
            raise ValueError(
                f"`all_reduce` returned a tensor of shape {tuple(summed.shape)} for one of shape {tuple(flat.shape)}; "
                "it must sum the tensor over the processes, in place or into a tensor of the same shape."
            )
        offset = 0
        for k in keys:
            local = self._local[k]
            self._reduced[k] += summed[offset : offset + local.numel()].view_as(local).to(self._reduced[k].device)
            offset += local.numel()
            local.zero_()

    def reset(self) -> None:
        """Forget the statistics; an open window starts afresh (its hooks are reinstalled if it was full)."""
        self._steps = 0
        self._fired = False
        if self._collecting and self._local:
            for t in (*self._local.values(), *self._reduced.values()):
                t.zero_()
            self._install()
        else:
            self._local, self._reduced = {}, {}

    def state_dict(self) -> dict[str, Any]:
        """``criterion``, ``version``, ``steps`` and, by group (its root layer's name), ``local`` and
        ``reduced`` statistics: CPU float64 tensors of shape ``(2, channels)``, the sum and the count."""
        return {
            "criterion": self.criterion,
            "version": STATE_VERSION,
            "steps": self._steps,
            "local": {k: t.detach().cpu().clone() for k, t in self._local.items()},
            "reduced": {k: t.detach().cpu().clone() for k, t in self._reduced.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], masks: MaskSet | None = None) -> None:
        """Restore :meth:`state_dict`. Under DDP a checkpoint holds rank zero's statistics, which then stand for
        every rank's: the scores are ratios, so they stay rank zero's own until reduced with new statistics.

        Raises:
            ValueError: another criterion's state, a malformed one, or (with ``masks``, else at :meth:`start`)
                statistics that do not fit the channel groups.
        """
        if isinstance(state, Mapping) and not state:
            self.reset()
            return
        steps = self._check_state(state)
        parts = [state.get("local"), state.get("reduced")]
        for part in parts:
            if not isinstance(part, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Tensor) and v.dim() == 2 and v.shape[0] == 2
                for k, v in part.items()
            ):
                raise ValueError(
                    f"Saved {self.criterion} statistics must map channel groups to tensors of shape (2, channels), "
                    f"got {part!r}."
                )
        local, reduced = cast(Mapping[str, Tensor], parts[0]), cast(Mapping[str, Tensor], parts[1])
        if set(local) != set(reduced) or any(local[k].shape != reduced[k].shape for k in local):
            raise ValueError(f"Saved {self.criterion} statistics hold local and reduced parts of other groups.")
        self._local = {k: v.detach().to(torch.float64).clone() for k, v in local.items()}
        self._reduced = {k: v.detach().to(torch.float64).clone() for k, v in reduced.items()}
        self._steps = steps
        if masks is not None:
            self._bind(self._groups(masks), {})

    # ------------------------------------------------------------------ scores
    def channel_scores(self, masks: ChannelMaskSet, group: ChannelGroup) -> Tensor:
        """The score of each channel of ``group`` (float64, on the CPU), from every process's statistics
        once :meth:`reduce_` ran.

        Raises:
            ValueError: no activation of the group was recorded, some channel was never seen, or the
                statistics hold NaN or infinity.
        """
        key = group.name
        if key not in self._local:
            raise ValueError(self._no_statistics(key))
        stats = self._local[key] + self._reduced[key].to(self._local[key].device)
        if stats.shape != (2, group.channels):
            raise ValueError(
                f"The {self.criterion} statistics of group {key!r} have {stats.shape[1]} channels, the group "
                f"{group.channels}; they were collected for another model: call reset() to collect afresh."
            )
        sums, counts = stats[0].cpu(), stats[1].cpu()
        readers = self._read_by.get(key)
        where = f" (read by {readers})" if readers else ""
        if not bool(torch.isfinite(sums).all()):
            raise ValueError(
                f"The activations of channel group {key!r}{where} held NaN or infinite values while {self.criterion} "
                "collected them: training diverged. The masks were not changed; lower the learning rate, clip "
                "gradients or check the data."
            )
        if not bool(counts.any()):
            raise ValueError(self._no_statistics(key))
        unseen = int((counts == 0).sum())
        if unseen:
            raise ValueError(
                f"{unseen} of the {group.channels} channels of group {key!r}{where} were never seen by "
                f"{self.criterion}: their reading layers did not run on them. Use importance='l1' for this model."
            )
        return self._score(sums / counts)

    def _per_position(self, x: Tensor, dims: tuple[int, ...], per: int) -> Tensor:
        """The statistic summed over ``dims``: one float64 per input channel position of ``x``."""
        raise NotImplementedError

    def _score(self, mean: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _groups(self, masks: MaskSet) -> list[ChannelGroup]:
        if not isinstance(masks, ChannelMaskSet):
            raise TypeError(
                f"{self!r} scores channels and needs the ChannelMaskSet of structure='channel' "
                f"(ChannelStructure().bind(model, example_inputs=...)), got {type(masks).__name__}. For single "
                "weights use 'magnitude', 'taylor' or 'fisher'."
            )
        names = [g.name for g in masks.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"Channel groups must have distinct names to keep statistics by, got {names}.")
        return masks.groups

    def _bind(self, groups: list[ChannelGroup], plan: Mapping[nn.Module, list[_Reader]]) -> None:
        """Allocate the statistics of ``groups`` (on their readers' device), or check that those held fit."""
        devices = {r.key: r.index.device for readers in plan.values() for r in readers}
        if not self._local:
            for g in groups:
                device = devices.get(g.name, torch.device("cpu"))
                self._local[g.name] = torch.zeros(2, g.channels, dtype=_float64(device), device=device)
                self._reduced[g.name] = torch.zeros_like(self._local[g.name])
            return
        expected = {g.name: g.channels for g in groups}
        held = {k: int(t.shape[1]) for k, t in self._local.items()}
        if held != expected:
            missing = sorted(set(expected) - set(held))
            unexpected = sorted(set(held) - set(expected))
            other = sorted(k for k in set(held) & set(expected) if held[k] != expected[k])
            raise ValueError(
                f"The {self.criterion} statistics do not fit the channel groups: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, other widths {other[:5]}. They were collected (or saved) for another model or "
                "`ignore`; call reset() to collect afresh."
            )
        for k, device in devices.items():
            if self._local[k].device != device:
                self._local[k] = self._local[k].to(device=device, dtype=_float64(device))
                self._reduced[k] = self._reduced[k].to(device=device, dtype=_float64(device))

    def _install(self) -> None:
        if self._handles or not self._collecting or self.ready:
            return
        for module, readers in self._plan.items():
            hook = functools.partial(self._record, readers=readers)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], readers: list[_Reader]) -> None:
        if (self.training_only and not module.training) or self.ready:
            return
        x = None
        if isinstance(module, nn.MultiheadAttention):
            x = _head_outputs(module, args, kwargs)
        elif _is_window_attention(module):
            x = _window_head_outputs(module, args[0] if args else kwargs.get("x"))
        x = x if x is not None else (args[0] if args else kwargs.get("input"))
        if not isinstance(x, Tensor) or x.is_nested:
            return
        x = x.detach()
        if x.dim() == 1:
            x = x.unsqueeze(0)
        dim = _channel_dim(module, x)
        per = x.numel() // max(x.shape[dim], 1)
        dims = tuple(i for i in range(x.dim()) if i != dim)
        values = self._per_position(x, dims, per)
        for r in readers:
            stats = self._local[r.key]
            device = stats.device
            if r.identity and values.numel() == stats.shape[1]:  # the common case: a layer reads the whole group
                stats[0].add_(values.to(device))
                stats[1].add_(per)
                continue
            stats[0].index_add_(0, r.root.to(device), values.to(device).index_select(0, r.index.to(device)))
            stats[1].add_(r.positions.to(device), alpha=per)
        self._fired = True

    def _no_statistics(self, key: str) -> str:
        return (
            f"{self!r} cannot score the channels of {key!r}: no activation was recorded yet. They come from the "
            "forward passes of training steps: with PruningCallback, start pruning at least one epoch after "
            "training starts (`start_epoch` >= 1), so that an epoch of steps precedes it; in a plain loop, call "
            "start(model, masks) before the forward passes (in training mode, or with training_only=False), "
            "observe(masks) once per step, then stop(), before pruning. Or use importance='l1', which needs no data."
        )

    def __repr__(self) -> str:
        extra = "" if self.training_only else ", training_only=False"
        return f"{type(self).__name__}(batches={self.batches}{extra})"


class APoZImportance(ActivationStatistics):
    """Average Percentage of Zeros (Hu et al., 2016, "Network Trimming: A Data-Driven Neuron Pruning Approach
    towards Efficient Deep Architectures"): the fraction of a channel's activations that are exactly zero.

    A channel that is mostly zero contributes little, so the score is ``1 - APoZ`` (higher = more important;
    a channel that is always zero scores 0). The activations are those the next layers read (see the module
    docstring): after the ReLU, and after any pooling before the reading layer (a max-pooled window is zero
    only when all its inputs are). Meant for ReLU-family networks: with a nonlinearity that leaves no exact
    zeros (GELU, SiLU, Tanh) every channel scores 1 and the earliest channels go first.

    Cost: memory, four float64 per channel; time, per recorded forward pass of each reading layer, one
    ``count_nonzero`` reduction over its input, while the window is open and until ``batches`` steps are
    recorded; nothing otherwise.

    Args:
        batches: the optimizer steps to collect over.
        training_only: record only forward passes in training mode.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune.structures.channel import ChannelStructure
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0], [-1.0]])), net[0].bias.zero_()
        >>> masks = ChannelStructure().bind(net, example_inputs=torch.randn(2, 1))
        >>> apoz = APoZImportance(batches=1)
        >>> apoz.start(net, masks)
        >>> _ = net(torch.tensor([[1.0], [2.0], [-1.0], [3.0]]))  # unit 0 is zero once, unit 1 three times
        >>> apoz.observe(masks), apoz.hooked
        (True, False)
        >>> apoz.channel_scores(masks, masks.groups[0]).tolist()  # 1 - APoZ
        [0.75, 0.25]
    """

    criterion = "apoz"

    def _per_position(self, x: Tensor, dims: tuple[int, ...], per: int) -> Tensor:
        return (per - torch.count_nonzero(x, dim=dims)).to(torch.float64)

    def _score(self, mean: Tensor) -> Tensor:
        return 1.0 - mean


class ActivationImportance(ActivationStatistics):
    """Mean absolute activation of each channel, one of the criteria Molchanov et al. (2017, "Pruning
    Convolutional Neural Networks for Resource Efficient Inference", ICLR) compare.

    A channel whose activations are small where the next layers read them (see the module docstring)
    contributes little to their inputs; the score is ``mean |a|`` over every activation of the channel.

    Cost: as :class:`APoZImportance`: four float64 per channel, one L1 reduction over each reading layer's
    input per recorded forward pass, nothing outside the window.

    Args:
        batches: the optimizer steps to collect over.
        training_only: record only forward passes in training mode.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune.structures.channel import ChannelStructure
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0], [-1.0]])), net[0].bias.zero_()
        >>> masks = ChannelStructure().bind(net, example_inputs=torch.randn(2, 1))
        >>> activation = ActivationImportance(batches=1)
        >>> activation.start(net, masks)
        >>> _ = net(torch.tensor([[1.0], [2.0], [-1.0], [3.0]]))
        >>> _ = activation.observe(masks)
        >>> activation.channel_scores(masks, masks.groups[0]).tolist()  # mean |relu(x)|, mean |relu(-x)|
        [1.5, 0.25]
    """

    criterion = "activation"

    def _per_position(self, x: Tensor, dims: tuple[int, ...], per: int) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.linalg.vector_norm(x, ord=1, dim=dims, dtype=dtype).to(torch.float64)

    def _score(self, mean: Tensor) -> Tensor:
        return mean


def _plan(
    owner: ActivationStatistics, module: nn.Module, groups: list[ChannelGroup]
) -> tuple[dict[nn.Module, list[_Reader]], dict[str, list[str]]]:
    """The reading layers of every group's channels in ``module``, with the positions each channel owns."""
    modules = dict(module.named_modules())
    plan: dict[nn.Module, list[_Reader]] = {}
    read_by: dict[str, list[str]] = {}
    for group in groups:
        read_by[group.name] = []
        for s in group.slices:
            layer_name, _, attr = s.param.rpartition(".")
            layer = modules.get(layer_name)
            if layer is None or not isinstance(getattr(layer, attr, None), nn.Parameter):
                raise ValueError(
                    f"The channel masks name {s.param!r}, which {type(module).__name__} does not have: pass "
                    f"{owner.criterion} the module the masks were built on (ChannelStructure.bind)."
                )
            if not s.scored or not _reads(layer, s.dim):
                continue
            device = getattr(layer, attr).device
            attention_name, _, child = layer_name.rpartition(".")
            parent = modules.get(attention_name)
            if (child == "out_proj" and isinstance(parent, nn.MultiheadAttention)) or (
                child == "proj" and parent is not None and _is_window_attention(parent)
            ):
                layer_name, layer = attention_name, parent  # hooked there: see _head_outputs, _window_head_outputs
            positions = torch.bincount(s.root, minlength=group.channels).to(device=device, dtype=_float64(device))
            arange = torch.arange(group.channels)
            identity = torch.equal(s.index, arange) and torch.equal(s.root, arange)
            reader = _Reader(group.name, s.index.to(device), s.root.to(device), positions, identity)
            plan.setdefault(layer, []).append(reader)
            read_by[group.name].append(layer_name)
        if not read_by[group.name]:
            raise ValueError(
                f"{owner.criterion} measures a channel where a convolution or linear layer reads it, but no layer "
                f"of {type(module).__name__} reads the channels of group {group.name!r}. Add {group.name!r} to "
                "`ignore`, or use importance='l1'."
            )
    return plan, read_by


def _float64(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
