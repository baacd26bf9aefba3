"""Channel pruning: coupled channel groups, channel masks, and physical compaction.

Removing one convolution filter is only correct for a plain chain. BatchNorm after it still adds beta to the
"removed" channel, a residual addition ties the channel to every other layer writing into the sum, a
depthwise convolution ties its input and output channels, and a flatten in front of a linear layer turns one
channel into a block of input columns. `Torch-Pruning <https://github.com/VainF/Torch-Pruning>`_'s
``DependencyGraph`` traces these couplings (Fang et al., 2023, "DepGraph: Towards Any Structural Pruning");
this module turns each traced group into *slices*, the positions along one dimension of one parameter that a
group channel owns, and uses them three ways:

* :class:`ChannelStructure` scores each group channel by the Lp norm over all its slices and grows boolean
  masks so whole channels are pruned: producer rows and biases, BatchNorm gamma and beta, the consumers'
  input columns. Shapes never change during training, so the masks are kept exact by the same hooks as
  unstructured pruning (:class:`~lightning_prune.masking.MaskSet`).
* :func:`compact` removes every channel whose slices are all zero (the masked ones) from a copy of the
  model with Torch-Pruning's layer surgery, and checks the copy computes what the original computes.
* :func:`compact_state` / :func:`load_compact` save a compacted model as a state dict plus its layer widths,
  and rebuild it from a fresh, full-width instance of the same architecture.

A group is left whole when its channels reach the model's output (the classifier's logits), when one of its
output layers is under ``ignore``, or when it runs through a layer whose channels cannot be masked exactly
(GroupNorm and LayerNorm pool statistics across channels; general grouped convolutions): a warning names it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
    >>> x = torch.randn(2, 3, 8, 8)
    >>> masks = prune_channels_(net, x, sparsity=0.5)
    >>> masks.channel_sparsity()
    0.5
    >>> small = compact(net.eval(), x)
    >>> small[0].out_channels, small[1].num_features, small[3].in_channels
    (8, 8, 8)
    >>> torch.allclose(small(x), net(x), rtol=1e-5, atol=1e-6)
    True
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_prune.importance import Importance, LpNormImportance, build_importance
from lightning_prune.masking import MaskSet, matching_modules
from lightning_prune.structures import Scope, Structure, Target, check_sparsity, layer_targets

if TYPE_CHECKING:
    import torch_pruning as tp

__all__ = [
    "ChannelGroup",
    "ChannelMaskSet",
    "ChannelSlice",
    "ChannelStructure",
    "channel_groups",
    "channel_table",
    "compact",
    "compact_state",
    "load_compact",
    "prune_channels_",
    "save_compact",
]

ExampleInputs = Any  # a tensor, or a tuple / dict of what the model's forward takes

_COMPACT_FORMAT = "lightning_prune.compact"
_COMPACT_VERSION = 1
#: Module attributes that describe widths; saved with a compact model so a fresh instance can be resized.
_WIDTH_ATTRS = (
    "in_channels",
    "out_channels",
    "in_features",
    "out_features",
    "num_features",
    "num_parameters",
    "groups",
)


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


def _slice_dims(module: nn.Module, out: bool) -> list[tuple[str, int]] | None:
    """(parameter, dimension) pairs that a channel prune of ``module`` touches; ``None`` when the module's
    channels cannot be masked exactly."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            return None
        return [("weight", 1), ("bias", 0)] if out else [("weight", 0)]
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups == 1:
            return [("weight", 0), ("bias", 0)] if out else [("weight", 1)]
        if module.groups == module.in_channels == module.out_channels:  # depthwise: input c feeds output c
            return [("weight", 0), ("bias", 0)]
        return None
    if isinstance(module, nn.Linear):
        return [("weight", 0), ("bias", 0)] if out else [("weight", 1)]
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return [("weight", 0), ("bias", 0)]
    if isinstance(module, nn.PReLU):
        return [("weight", 0)] if module.num_parameters > 1 else []
    if not any(True for _ in module.parameters(recurse=False)):
        return []
    return None


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block (no BatchNorm statistics updates, no dropout); each module's mode after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _forward(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _check_example(model: nn.Module, example_inputs: ExampleInputs) -> None:
    if example_inputs is None:
        raise ValueError(
            f"Channel pruning needs `example_inputs` to trace {type(model).__name__}: a batch (or a tuple of "
            "the forward's arguments) shaped like real inputs."
        )
    with _eval_mode(model), torch.no_grad():
        try:
            _forward(model, example_inputs)
        except Exception as err:
            raise ValueError(
                f"{type(model).__name__} cannot run on the `example_inputs` ({_describe(example_inputs)}): "
                f"{type(err).__name__}: {err}. Pass inputs shaped like a real batch."
            ) from err


def _describe(example_inputs: ExampleInputs) -> str:
    if isinstance(example_inputs, Tensor):
        return f"tensor of shape {tuple(example_inputs.shape)}"
    if isinstance(example_inputs, (tuple, list)):
        return ", ".join(_describe(x) for x in example_inputs)
    if isinstance(example_inputs, Mapping):
        return ", ".join(f"{k}: {_describe(v)}" for k, v in example_inputs.items())
    return type(example_inputs).__name__


def _trace(
    model: nn.Module, example_inputs: ExampleInputs, ignore: Sequence[str]
) -> tuple[tp.DependencyGraph, list[tuple[tp.Group, ChannelGroup]]]:
    """Torch-Pruning's dependency graph of ``model`` and its prunable groups, each with our slices."""
    import torch_pruning as tp

    _check_example(model, example_inputs)
    ignored = matching_modules(model, ignore)
    names = {m: n for n, m in model.named_modules()}
    outputs: list[Tensor] = []

    def keep_outputs(out: Any) -> Any:
        outputs.extend(_tensors(out))
        return out

    # Torch-Pruning follows autograd's graph: gradients must be on, even inside a caller's no_grad().
    with _eval_mode(model), torch.enable_grad():
        try:
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, output_transform=keep_outputs, verbose=False
            )
            tp_groups = list(graph.get_all_groups(ignored_layers=ignored))
        except Exception as err:
            raise ValueError(
                f"Torch-Pruning could not trace the channel couplings of {type(model).__name__}: "
                f"{type(err).__name__}: {err}"
            ) from err
    groups: list[tuple[tp.Group, ChannelGroup]] = []
    skipped: list[str] = []
    returned = {t.grad_fn for t in outputs if t.grad_fn is not None}
    for tp_group in tp_groups:
        group = _channel_group(graph, tp_group, names, returned, skipped)
        if group is not None:
            groups.append((tp_group, group))
    if skipped:
        warnings.warn(
            "Channel pruning leaves these layers' channel groups whole: " + "; ".join(skipped) + ".",
            stacklevel=3,
        )
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no channel group to prune: every group reaches the model's output, "
            f"is under `ignore`={list(ignore)!r}, or runs through a layer that cannot be masked."
        )
    return graph, groups


def _channel_group(
    graph: tp.DependencyGraph,
    tp_group: tp.Group,
    names: Mapping[nn.Module, str],
    returned: set[Any],
    skipped: list[str],
) -> ChannelGroup | None:
    import torch_pruning as tp

    root = tp_group[0].dep.target.module
    root_name = names.get(root, str(root))
    slices: dict[tuple[str, int], ChannelSlice] = {}
    for item in tp_group.items:
        node, handler = item.dep.target, item.dep.handler
        out = graph.is_out_channel_pruning_fn(handler)
        if out and (not node.outputs or node.grad_fn in returned):
            return None  # the channels reach the model's output: its shape must not change
        if node.type in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.SLICE):
            # Torch-Pruning 1.6 can map a split's channels to the wrong branch: leave such groups whole.
            skipped.append(f"{root_name} (through a split or slice of channels)")
            return None
        module = node.module
        if not isinstance(module, nn.Module):
            skipped.append(f"{root_name} (couples a bare parameter)")
            return None
        dims = _slice_dims(module, out)
        if dims is None:
            skipped.append(f"{root_name} (through {names.get(module, '?')}: {type(module).__name__})")
            return None
        index = torch.as_tensor([int(i) for i in item.idxs], dtype=torch.long)
        root_index = torch.as_tensor([int(i) for i in item.root_idxs], dtype=torch.long)
        for attr, dim in dims:
            param = getattr(module, attr, None)
            if not isinstance(param, nn.Parameter):
                continue
            name = f"{names[module]}.{attr}" if names[module] else attr
            dim = dim % param.dim()
            if len(index) and int(index.max()) >= param.shape[dim]:  # a coupling the tracer got wrong
                skipped.append(f"{root_name} (an index beyond {name}'s {param.shape[dim]} channels)")
                return None
            scored = attr == "weight" and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
            slices.setdefault((name, dim), ChannelSlice(name, dim, index, root_index, scored))
    channels = len(tp_group[0].idxs)
    return ChannelGroup(root_name, channels, tuple(slices.values()))


def channel_groups(model: nn.Module, example_inputs: ExampleInputs, ignore: Sequence[str] = ()) -> list[ChannelGroup]:
    """The coupled channel groups of ``model`` that can be pruned, traced with Torch-Pruning.

    Args:
        model: the network (a ``LightningModule`` works: its ``forward`` is traced).
        example_inputs: what ``model``'s forward takes: a tensor, a tuple of arguments or a dict of keyword
            arguments. Two samples are enough; the model runs in eval mode and its mode is restored.
        ignore: module-name patterns (``fnmatch``, as for ``PruningCallback(ignore=...)``) whose output
            channels stay whole.

    Raises:
        ValueError: the model does not run on ``example_inputs``, cannot be traced, an ``ignore`` pattern
            matches nothing, or no group is left to prune.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [(g.name, g.channels, g.params()) for g in channel_groups(net, torch.randn(2, 4))]
        [('0', 8, ['0.weight', '0.bias', '2.weight'])]
    """
    _, groups = _trace(model, example_inputs, ignore)
    return [g for _, g in groups]


# ---------------------------------------------------------------------------------------------- masks
class ChannelMaskSet(MaskSet):
    """A :class:`~lightning_prune.masking.MaskSet` over every parameter that channel groups touch, plus the
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

    @classmethod
    def from_model(cls, model: nn.Module, example_inputs: ExampleInputs, ignore: Sequence[str] = ()) -> ChannelMaskSet:
        """Trace ``model`` (see :func:`channel_groups`) and mask every parameter its groups touch."""
        groups = channel_groups(model, example_inputs, ignore)
        named = dict(model.named_parameters())
        params = {name: named[name] for g in groups for name in g.params()}
        return cls(params, groups)

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

    Args:
        round_to: keep a multiple of this many channels in every group that is pruned (8 or 16 suits SIMD
            kernels); the count is rounded to the nearest multiple, so the achieved sparsity can differ
            slightly from the target.
        max_layer_sparsity: the largest fraction of a group's channels that may be pruned, in [0, 1); at
            least one channel (and at least ``round_to``) always stays, so no layer is ever emptied.

    Example:
        >>> from torch import nn
        >>> from lightning_prune.importance import build_importance
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
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"`round_to` must be a positive integer, got {round_to!r}.")
        check_sparsity(max_layer_sparsity, "max_layer_sparsity")
        self.round_to = round_to
        self.max_layer_sparsity = float(max_layer_sparsity)

    def __repr__(self) -> str:
        return f"ChannelStructure(round_to={self.round_to}, max_layer_sparsity={self.max_layer_sparsity})"

    def bind(
        self, module: nn.Module, ignore: Sequence[str] = (), example_inputs: ExampleInputs = None
    ) -> ChannelMaskSet:
        masks = ChannelMaskSet.from_model(module, example_inputs, ignore)
        for g in masks.groups:
            self._min_keep(g)  # fail now on a `round_to` that cannot fit a group
        return masks

    def sparsity(self, masks: MaskSet) -> float:
        return _channel_masks(masks).channel_sparsity()

    def layer_sparsity(self, masks: MaskSet) -> dict[str, float]:
        return _channel_masks(masks).group_sparsity()

    def check_importance(self, importance: Importance) -> None:
        _norm_order(importance)

    def check_target(self, masks: MaskSet, sparsity: Target, scope: Scope = "global") -> None:
        masks = _channel_masks(masks)
        per_group = layer_targets([g.name for g in masks.groups], sparsity, scope)
        if isinstance(sparsity, Mapping):  # per-layer targets: fractions of each group's channels
            over = {g.name: t for g, t in zip(masks.groups, per_group or []) if t > self.max_layer_sparsity}
            if over:
                raise ValueError(
                    f"Cannot prune these layers' channels to their targets with `max_layer_sparsity`="
                    f"{self.max_layer_sparsity}: {over}. Lower their targets or raise `max_layer_sparsity`."
                )
            return
        if scope == "layer":
            if sparsity > self.max_layer_sparsity:
                raise ValueError(
                    f"Cannot prune {sparsity:.0%} of every layer's channels with `max_layer_sparsity`="
                    f"{self.max_layer_sparsity}. Lower the sparsity or raise `max_layer_sparsity`."
                )
            return
        total = masks.num_channels()
        room = sum(g.channels - self._min_keep(g) for g in masks.groups)
        if round(sparsity * total) > room:
            raise ValueError(
                f"Cannot prune {sparsity:.0%} of the channels: with `max_layer_sparsity`={self.max_layer_sparsity} "
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
        keep = max(1, math.ceil((1.0 - self.max_layer_sparsity) * group.channels - 1e-9))
        return min(math.ceil(keep / r) * r, group.channels)

    def _rounded(self, group: ChannelGroup, wanted: int, kept: int) -> int:
        """The channel count to keep: ``wanted`` rounded to a multiple of ``round_to``, within the cap and
        never more than the ``kept`` channels (nothing is revived)."""
        r = self.round_to
        if wanted >= kept:
            return kept
        rounded = max(round(wanted / r), 1) * r if r > 1 else wanted
        return min(max(rounded, self._min_keep(group)), kept)

    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        masks = _channel_masks(masks)
        per_group = layer_targets([g.name for g in masks.groups], sparsity, scope)
        single = 0.0 if isinstance(sparsity, Mapping) else float(sparsity)
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
            order = torch.sort(s[candidates], stable=True).indices[:excess]
            drop = torch.zeros(g.channels, dtype=torch.bool)
            drop[candidates[order]] = True
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
        values = torch.cat([s[k] for s, k in zip(scores, kept)])
        owner = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
        order = torch.sort(values, stable=True).indices.tolist()
        remaining = list(counts)
        taken = 0
        for j in order:
            i = int(owner[j])
            if remaining[i] > floors[i]:
                remaining[i] -= 1
                taken += 1
                if taken == to_prune:
                    break
        return [self._rounded(g, want, c) for g, want, c in zip(groups, remaining, counts)]


def channel_table(masks: ChannelMaskSet) -> str:
    """A plain-text table per channel group: root layer, kept / total channels, fraction pruned."""
    rows = [("group (root layer)", "kept / channels", "pruned")]
    for g in masks.groups:
        kept = int(masks.kept(g).sum())
        rows.append((g.name, f"{kept} / {g.channels}", f"{1 - kept / g.channels:.2%}"))
    total, pruned = masks.num_channels(), masks.num_pruned_channels()
    rows.append(("total", f"{total - pruned} / {total}", f"{pruned / total:.2%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "Channel pruning summary\n" + "\n".join(lines)


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


# ---------------------------------------------------------------------------------------------- compaction
def compact(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ignore: Sequence[str] = (),
    *,
    verify: bool = True,
    rtol: float = 1e-4,
) -> nn.Module:
    """A physically smaller copy of ``model`` without its pruned channels; ``model`` is left unchanged.

    A channel of a coupled group is removed when every entry it owns is exactly zero, which is what
    :class:`ChannelStructure`'s masks leave (at least one channel of a group always stays). Removing such a
    channel changes no output: its consumers' input columns are zero. The layer surgery is Torch-Pruning's.

    Args:
        model: the masked network, e.g. ``pl_module`` after channel pruning, or its inner ``nn.Module``.
        example_inputs: what ``model``'s forward takes (see :func:`channel_groups`).
        ignore: module-name patterns whose output channels are kept whole.
        verify: run both models in eval mode on ``example_inputs`` and raise unless the outputs agree to
            ``rtol`` (relative to the largest output magnitude).
        rtol: the tolerance of ``verify``.

    Returns:
        The compact model, in ``model``'s training mode.

    Raises:
        ValueError: the model does not run on ``example_inputs``, cannot be traced, or has no channel group.
        RuntimeError: the surgery failed or the compact model computes something else (``model`` is then
            unchanged all the same: only the copy was touched).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> _ = prune_channels_(net, torch.randn(2, 4), sparsity=0.5)
        >>> compact(net, torch.randn(2, 4))
        Sequential(
          (0): Linear(in_features=4, out_features=5, bias=True)
          (1): ReLU()
          (2): Linear(in_features=5, out_features=2, bias=True)
        )
    """
    small = copy.deepcopy(model)
    graph, groups = _trace(small, example_inputs, ignore)  # checks the example inputs on the copy
    named = dict(small.named_parameters())
    plan: list[tuple[tp.Group, list[int]]] = []
    for tp_group, group in groups:
        zero = _zero_channels(group, named)
        if len(zero) == group.channels:
            zero = zero[1:]  # an all-zero group keeps one channel so that the layer stays valid
        if zero:
            plan.append((tp_group, zero))
    try:
        for tp_group, zero in plan:
            root = tp_group[0].dep
            graph.get_pruning_group(root.target.module, root.handler, zero).prune()
    except Exception as err:
        raise RuntimeError(
            f"Compacting {type(model).__name__} failed in the layer surgery ({type(err).__name__}: {err}); "
            "the model is unchanged."
        ) from err
    small.train(model.training)
    if verify:
        _verify(model, small, example_inputs, rtol)
    return small


def _zero_channels(group: ChannelGroup, params: Mapping[str, Tensor]) -> list[int]:
    nonzero = torch.zeros(group.channels, dtype=torch.long)
    for s in group.slices:
        nonzero.index_add_(0, s.root, s.rows(params[s.param].detach()).ne(0).any(1).long().cpu())
    return torch.nonzero(nonzero == 0).flatten().tolist()


def _verify(model: nn.Module, small: nn.Module, example_inputs: ExampleInputs, rtol: float) -> None:
    with _eval_mode(model), _eval_mode(small), torch.no_grad():
        expected = _tensors(_forward(model, example_inputs))
        got = _tensors(_forward(small, example_inputs))
    shapes = [tuple(t.shape) for t in expected], [tuple(t.shape) for t in got]
    if shapes[0] != shapes[1]:
        raise RuntimeError(f"The compact model's outputs have shapes {shapes[1]}, the original's {shapes[0]}.")
    for e, g in zip(expected, got):
        if not e.is_floating_point():
            continue
        scale = float(e.abs().max()) if e.numel() else 0.0
        error = float((e - g).abs().max()) if e.numel() else 0.0
        if error > rtol * max(scale, 1e-12) and error > 1e-6:
            raise RuntimeError(
                f"The compact model differs from the original by {error:.3g} (outputs up to {scale:.3g}); "
                "a pruned channel was not exactly zero in every entry it owns, or a layer is not supported."
            )


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _tensors(v)]
    return []


# ---------------------------------------------------------------------------------------------- saving
def compact_state(model: nn.Module) -> dict[str, Any]:
    """What rebuilds a compact model from a fresh instance: its ``state_dict`` and its layers' widths.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> _ = prune_channels_(net, torch.randn(2, 4), sparsity=0.5)
        >>> state = compact_state(compact(net, torch.randn(2, 4)))
        >>> state["widths"]["0"]
        {'in_features': 4, 'out_features': 5}
        >>> load_compact(nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2)), state)[2]
        Linear(in_features=5, out_features=2, bias=True)
    """
    widths = {
        name: {a: copy.deepcopy(getattr(m, a)) for a in _WIDTH_ATTRS if hasattr(m, a)}
        for name, m in model.named_modules()
    }
    return {
        "format": _COMPACT_FORMAT,
        "version": _COMPACT_VERSION,
        "architecture": type(model).__qualname__,
        "widths": {n: w for n, w in widths.items() if w},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_compact(model: nn.Module, path: str | Path) -> Path:
    """Save :func:`compact_state` of ``model`` to ``path`` with ``torch.save``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(compact_state(model), path)
    return path


@torch.no_grad()
def load_compact(model: nn.Module, state: Mapping[str, Any] | str | Path) -> nn.Module:
    """Resize a fresh, full-width ``model`` to a saved compact model's widths and load its weights, in place.

    Args:
        model: a new instance of the architecture that was compacted (same constructor arguments).
        state: :func:`compact_state`'s dict or the path :func:`save_compact` wrote.

    Returns:
        ``model``, now compact.

    Raises:
        ValueError: ``state`` is not a compact model, or was saved from another architecture.
    """
    if isinstance(state, (str, Path)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or state.get("format") != _COMPACT_FORMAT:
        raise ValueError("`state` is not a compact model saved by lightning_prune.save_compact / compact_state.")
    if state.get("version") != _COMPACT_VERSION:
        raise ValueError(f"Compact model format version {state.get('version')!r} is not supported.")
    if state.get("architecture") != type(model).__qualname__:
        raise ValueError(
            f"The compact model was saved from a {state.get('architecture')}, not a {type(model).__qualname__}."
        )
    modules = dict(model.named_modules())
    unknown = [n for n in state["widths"] if n not in modules]
    if unknown:
        raise ValueError(f"The compact model has layers this {type(model).__qualname__} lacks: {unknown[:5]}.")
    current = model.state_dict()
    missing = sorted(set(current) - set(state["state_dict"]))
    unexpected = sorted(set(state["state_dict"]) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"The compact model's weights do not fit this {type(model).__qualname__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Build the model with the constructor arguments it was trained with."
        )
    for name, widths in state["widths"].items():
        for attr, value in widths.items():
            setattr(modules[name], attr, value)
    for key, saved in state["state_dict"].items():
        if key in current and current[key].shape != saved.shape:
            module_name, _, attr = key.rpartition(".")
            owner = modules[module_name]
            blank = torch.empty(saved.shape, dtype=current[key].dtype, device=current[key].device)
            if attr in owner._parameters:
                old = owner._parameters[attr]
                owner._parameters[attr] = nn.Parameter(blank, requires_grad=old is None or old.requires_grad)
            else:
                owner._buffers[attr] = blank
    model.load_state_dict(state["state_dict"], strict=True)
    return model
