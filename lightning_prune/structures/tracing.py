"""Tracing the coupled channel groups of a model with Torch-Pruning.

Removing one convolution filter is only correct for a plain chain. BatchNorm after it still adds beta to the
"removed" channel, a residual addition ties the channel to every other layer writing into the sum, a depthwise
convolution ties its input and output channels, and a flatten in front of a linear layer turns one channel into a
block of input columns. `Torch-Pruning <https://github.com/VainF/Torch-Pruning>`_'s ``DependencyGraph`` traces
these couplings (Fang et al., 2023, "DepGraph: Towards Any Structural Pruning"); :func:`channel_groups` turns each
traced group into a :class:`~lightning_prune.masks.channels.ChannelGroup` of *slices*.

A general grouped convolution (``1 < groups < channels``, as in ResNeXt and RegNet) with as many input as output
channels is treated like a depthwise one: its input channel ``c`` is coupled with its output channel ``c``, so one
group holds both its producer's channels and its own. Every convolution group must then lose as many channels as
the others (:attr:`~lightning_prune.masks.channels.ChannelGroup.blocks`), so the compact convolution keeps its
``groups``, each group narrower; this is the rule Torch-Pruning applies to grouped convolutions.

A group is left whole when its channels reach the model's output (the classifier's logits), when one of its
output layers is under ``ignore``, or when it runs through a layer whose channels cannot be masked exactly
(GroupNorm and LayerNorm pool statistics across channels; a grouped convolution with more or fewer outputs than
inputs, or one only part of whose channels is in the group): a warning names it.

Tracing never fails from inside Torch-Pruning and is bounded (:mod:`lightning_prune.structures._depgraph`): a group
that runs through an op moving or mixing the channel axis (ShuffleNet's channel shuffle, Swin's shifted windows:
``transpose``, ``permute``, ``roll``, batched matrix products), through a mapping Torch-Pruning cannot make, or that
is not followed within :data:`TRACE_BUDGET_S` seconds stays whole, and the warning names it with the reason; a
module Torch-Pruning cannot trace at all is traced child by child from the inputs each child received.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [(g.name, g.channels, g.params()) for g in channel_groups(net, torch.randn(2, 4))]
    [('0', 8, ['0.weight', '0.bias', '2.weight'])]
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_prune._helpers import eval_mode, forward
from lightning_prune.masks.channels import ChannelGroup, ChannelSlice
from lightning_prune.masks.params import matching_modules
from lightning_prune.structures import _depgraph
from lightning_prune.structures._depgraph import Traced

if TYPE_CHECKING:
    import torch_pruning as tp


ExampleInputs = Any  # a tensor, or a tuple / dict of what the model's forward takes


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
        if _depgraph.is_grouped(module):  # input c goes with output c; the input side is a grouped slice
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


def _check_example(model: nn.Module, example_inputs: ExampleInputs) -> None:
    if example_inputs is None:
        raise ValueError(
            f"Channel pruning needs `example_inputs` to trace {type(model).__name__}: a batch (or a tuple of "
            "the forward's arguments) shaped like real inputs."
        )
    with eval_mode(model), torch.no_grad():
        try:
            forward(model, example_inputs)
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


#: CPU seconds (``time.process_time``: the same work gives the same groups however busy the machine is) that
#: tracing one model may take, its forward passes included; groups not followed by then stay whole.
TRACE_BUDGET_S = 60.0


def trace_groups(
    model: nn.Module, example_inputs: ExampleInputs, ignore: Sequence[str], budget_s: float = TRACE_BUDGET_S
) -> list[tuple[Traced, tp.Group, ChannelGroup]]:
    """The prunable groups of ``model``, each with the Torch-Pruning graph and group it came from and our slices.

    Tracing never raises from inside Torch-Pruning: a group it cannot follow (an op that moves the channel axis,
    a mapping that fails, the time budget spent) stays whole and a warning names it; a module that cannot be
    traced at all is traced child by child.
    """
    _check_example(model, example_inputs)
    ignored = matching_modules(model, ignore)
    names = {m: n for n, m in model.named_modules()}
    deadline = time.process_time() + budget_s
    skipped: list[str] = []
    untraced: list[str] = []  # modules Torch-Pruning could not trace, with the reason
    groups: list[tuple[Traced, tp.Group, ChannelGroup]] = []
    # Torch-Pruning follows autograd's graph: gradients must be on, even inside a caller's no_grad().
    with eval_mode(model), torch.enable_grad():
        for traced in _trace_parts(model, example_inputs, names, deadline, skipped, untraced, depth=0):
            for root, tp_group in _depgraph.all_groups(traced, ignored, deadline):
                if isinstance(tp_group, str):
                    skipped.append(f"{names.get(root, '?')} ({tp_group})")
                    continue
                group = _channel_group(traced.graph, tp_group, names, traced.returned, skipped)
                if group is not None:
                    groups.append((traced, tp_group, group))
    if skipped:
        warnings.warn(
            "Channel pruning leaves these layers' channel groups whole: " + _by_reason(skipped) + ".",
            stacklevel=3,
        )
    if not groups and untraced:
        raise ValueError(
            f"{type(model).__name__} has no channel group to prune: Torch-Pruning could not trace the channel "
            f"couplings of {untraced[0]}, and no part of it that could be traced has a group to prune."
        )
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no channel group to prune: every group reaches the model's output, "
            f"is under `ignore`={list(ignore)!r}, runs through a layer that cannot be masked, or could not be "
            "traced (see the warning)."
        )
    return groups


def _by_reason(skipped: Sequence[str]) -> str:
    """``"a (why); b (why)"`` entries with the same reason joined: ``"a, b (why)"``, in first-seen order."""
    names: dict[str, list[str]] = {}
    for entry in skipped:
        name, _, reason = entry.partition(" (")
        names.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(n)} ({reason}" if reason else ", ".join(n) for reason, n in names.items())


def _trace_parts(
    module: nn.Module,
    example_inputs: ExampleInputs,
    names: Mapping[nn.Module, str],
    deadline: float,
    skipped: list[str],
    untraced: list[str],
    depth: int,
) -> Iterator[Traced]:
    """The traced graph of ``module``, or where Torch-Pruning cannot trace it, of each of its children."""
    label = names.get(module) or type(module).__name__
    inputs = example_inputs if isinstance(example_inputs, (tuple, list, Mapping)) else (example_inputs,)
    try:
        yield _depgraph.build(module, inputs, deadline)
        return
    except Exception as err:  # whatever Torch-Pruning raises, the groups stay whole instead
        reason = f"{type(err).__name__}: {err}"
    children = [c for c in module.children() if any(True for _ in c.parameters())]
    if not children or depth >= _depgraph.MAX_DEPTH or time.process_time() > deadline:
        untraced.append(f"{label} ({reason})")
        skipped.append(f"{label} (could not be traced: {reason})")
        return
    try:
        received = _depgraph.child_inputs(module, inputs, forward)
    except Exception as err:
        skipped.append(f"{label} (could not be traced: {reason}; nor run: {type(err).__name__}: {err})")
        return
    untraced.append(f"{label} ({reason})")
    skipped.append(f"{label} as a whole (could not be traced: {reason}; its parts were traced one by one)")
    for name, child in module.named_children():
        if child not in set(children):
            continue
        if name not in received:
            skipped.append(f"{names.get(child, name)} (not called with inputs that can be traced)")
            continue
        yield from _trace_parts(child, received[name], names, deadline, skipped, untraced, depth + 1)


def pruning_group(
    traced: Traced, module: nn.Module, handler: Any, idxs: list[int], budget_s: float = TRACE_BUDGET_S
) -> tp.Group | str:
    """The Torch-Pruning group of ``idxs`` rooted at ``module`` in a graph from :func:`trace_groups`, ready for
    its layer surgery (``.prune()``), or a string saying why it cannot be followed."""
    deadline = time.process_time() + budget_s
    _depgraph.remap(traced, deadline, sizes_only=True)  # a surgery before this one may have moved an offset
    return _depgraph.group(traced, module, handler, idxs, deadline)


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
        if _depgraph.is_grouped(module):
            if not torch.equal(torch.sort(index).values, torch.arange(module.out_channels)):
                skipped.append(f"{root_name} (through {names[module]}: only part of a grouped convolution's channels)")
                return None
            name = f"{names[module]}.weight" if names[module] else "weight"
            slices.setdefault((name, 1), ChannelSlice(name, 1, index, root_index, True, module.groups))
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
    group = ChannelGroup(root_name, len(tp_group[0].idxs), tuple(slices.values()))
    if group.blocks is not None:
        sizes = torch.bincount(group.blocks)
        if group.parts or bool((sizes != sizes[0]).any()):
            grouped = ", ".join(s.param.rpartition(".")[0] for s in group.slices if s.groups > 1)
            skipped.append(f"{root_name} (through {grouped}: grouped convolutions whose groups cannot all stay equal)")
            return None
    return group


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
    return [g for _, _, g in trace_groups(model, example_inputs, ignore)]
