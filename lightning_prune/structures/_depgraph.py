"""Torch-Pruning's dependency graph, driven so that it can neither crash nor run away.

Torch-Pruning 1.6 builds its graph in four steps (trace, dependencies, shapes, index mappings) and re-runs the
whole index-mapping pass for every group it is asked for. On some models one mapping raises (ShuffleNetV2's
channel shuffle: ``ZeroDivisionError``), the repeated pass makes tracing quadratic (Swin, MaxViT: minutes, and a
flatten with a large stride expands each channel into thousands of Python index objects: gigabytes), and some ops
are followed as if they kept the channel axis where it was (``permute``, ``transpose``, batched matrix products).

Here the four steps run once each, the index mappings node by node: a node whose mapping fails, or an op that
moves or mixes the channel axis, is *cut*. A group that reaches a cut node is left whole, with the reason, and so
is a group whose indices would exceed :data:`MAX_INDICES` or that is still being followed when the time budget
runs out. When tracing a module fails outright, its children are traced one by one from the inputs they received
(channels that cross between children stay whole).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from lightning_prune._helpers import output_tensors

#: The most channel indices one group item may hold (a flatten maps a channel to ``stride`` indices).
MAX_INDICES = 1 << 18

#: grad_fn names (lower case, substrings) of ops that move the channel axis or mix channels: Torch-Pruning
#: follows them as element-wise ops, which maps a channel to the wrong position.
_CUT_OPS = ("permute", "transpose", "bmm", "roll", "pixelshuffle", "pixelunshuffle", "channelshuffle", "im2col")

#: How deep a module whose trace fails is split into its children.
MAX_DEPTH = 6


def is_grouped(module: Any) -> TypeGuard[nn.modules.conv._ConvNd]:
    """Whether ``module`` is a general grouped convolution (``1 < groups < channels``) whose input channel ``c`` can
    be coupled to its output channel ``c``: as many inputs as outputs, not transposed."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and 1 < module.groups < module.out_channels
        and module.in_channels == module.out_channels
    )


def grouped_pruner() -> Any:
    """Torch-Pruning's pruner of a grouped convolution treated like a depthwise one: input channel ``c`` goes with
    output channel ``c`` (one function prunes both, which couples them in the graph), and each convolution group
    loses as many channels as the others, so ``groups`` stays and every group gets narrower."""
    from torch_pruning.pruner import function

    class GroupedConvPruner(function.ConvPruner):
        def prune_out_channels(self, layer: nn.modules.conv._ConvNd, idxs: Any) -> nn.Module:
            channels, groups = layer.out_channels, layer.groups
            width = channels // groups
            drop = torch.zeros(channels, dtype=torch.bool)
            drop[torch.as_tensor(list(idxs), dtype=torch.long)] = True
            counts = drop.view(groups, width).sum(1)
            if bool((counts != counts[0]).any()) or int(counts[0]) == width:
                raise ValueError(
                    f"Cannot remove channels {sorted(int(i) for i in idxs)} of a convolution with groups={groups}: "
                    f"every group of {width} channels must lose as many as the others and keep at least one "
                    f"(it would lose {counts.tolist()})."
                )
            keep = torch.nonzero(~drop).flatten()
            columns = torch.nonzero(~drop.view(groups, width)).reshape(groups, -1, 2)[..., 1]  # kept, per group
            weight = layer.weight.detach()[keep.to(layer.weight.device)]
            rows_per_group = len(keep) // groups
            gather = columns.repeat_interleave(rows_per_group, 0).to(weight.device)  # (kept rows, kept columns)
            view = weight.reshape(len(keep), width, -1)
            weight = view.gather(1, gather.unsqueeze(-1).expand(-1, -1, view.shape[-1]))
            shape = (len(keep), len(keep) // groups, *layer.weight.shape[2:])
            layer.weight = nn.Parameter(weight.reshape(shape).contiguous(), layer.weight.requires_grad)
            if layer.bias is not None:
                layer.bias = nn.Parameter(layer.bias.detach()[keep.to(layer.bias.device)], layer.bias.requires_grad)
            layer.out_channels = layer.in_channels = len(keep)
            return layer

        prune_in_channels = prune_out_channels

    return GroupedConvPruner()


class TraceBudgetExceeded(RuntimeError):
    """Tracing ran past its time budget."""


@dataclass
class Traced:
    """One traced graph: the (sub)module it covers, its cut nodes with reasons, and the autograd nodes of its
    outputs (channels that reach them stay whole)."""

    graph: Any  # tp.DependencyGraph
    module: nn.Module
    cut: dict[Any, str] = field(default_factory=dict)
    returned: set[Any] = field(default_factory=set)
    grouped: Any = None  # the GroupedConvPruner whose function couples the graph's grouped convolutions


def _op_name(node: Any) -> str:
    grad_fn = getattr(node, "grad_fn", None)
    return grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else type(node.module).__name__


def build(model: nn.Module, example_inputs: Any, deadline: float) -> Traced:
    """Trace ``model`` once (Torch-Pruning's trace and dependencies), then its shapes and index mappings node by
    node. Raises whatever the trace itself raises, or :class:`TraceBudgetExceeded`."""
    from torch_pruning.dependency import shape_infer
    from torch_pruning.dependency.graph import DependencyGraph
    from torch_pruning.ops import OPTYPE

    outputs: list[Tensor] = []

    def keep_outputs(out: Any) -> Any:
        outputs.extend(output_tensors(out))
        return out

    graph = DependencyGraph()
    # DependencyGraph.build_dependency without its final index-mapping pass, which raises on some models.
    graph.verbose = False
    graph.model = model
    graph._module2name = {m: n for n, m in model.named_modules()}
    graph.ignored_params = []
    graph._param_to_name, graph.unwrapped_parameters = graph._detect_unwrapped_parameters(None)
    graph.module2node = graph._trace(model, example_inputs, None, output_transform=keep_outputs)
    graph._build_dependency(graph.module2node)
    grouped = _couple_grouped(graph)
    _check_time(deadline)
    traced = Traced(graph, model, returned={t.grad_fn for t in outputs if t.grad_fn is not None}, grouped=grouped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Maximum recursive depth reached!": we cut such nodes ourselves
        try:
            shape_infer.init_shape_information(graph)
        except Exception as err:  # a shape Torch-Pruning cannot infer: cut every split
            for node in graph.module2node.values():
                if node.type == OPTYPE.SPLIT:
                    traced.cut[node] = f"{_op_name(node)}, whose sizes could not be inferred ({type(err).__name__})"
        for node in graph.module2node.values():
            name = _op_name(node)
            if node.type == OPTYPE.ELEMENTWISE and any(op in name.lower() for op in _CUT_OPS):
                traced.cut[node] = f"{name}, which moves or mixes the channel axis"
        # Twice, as Torch-Pruning's repeated passes do: a mapping can need a shape that a later node's sets.
        remap(traced, deadline)
        remap(traced, deadline)
    return traced


def _couple_grouped(graph: Any) -> Any:
    """Give every :func:`is_grouped` convolution the pruner that couples its input and output channels: Torch-
    Pruning follows a general grouped convolution's inputs and outputs as separate groups, which no mask can prune
    exactly (its input channel feeds one convolution group only)."""
    pruner = grouped_pruner()  # one per graph: Torch-Pruning matches handlers by identity
    fn = pruner.prune_out_channels
    graph._in_channel_pruning_fn.add(fn)
    graph._out_channel_pruning_fn.add(fn)
    for node in graph.module2node.values():
        for dep in node.dependencies:
            if is_grouped(node.module):
                dep.trigger = fn
            if is_grouped(dep.target.module):
                dep.handler = fn
    return pruner


def remap(traced: Traced, deadline: float, sizes_only: bool = False) -> None:
    """Torch-Pruning's index mappings, node by node: a node whose mapping fails (or that the time budget does not
    reach) is cut. ``sizes_only``: only the concatenations and splits, whose offsets change when a layer in front
    of them is resized (between two layer surgeries)."""
    from torch_pruning.dependency import index_mapping
    from torch_pruning.ops import OPTYPE

    update = {
        OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
        OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
        OPTYPE.SLICE: index_mapping.update_slice_index_mapping,
        OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
    }
    if not sizes_only:
        update[OPTYPE.RESHAPE] = index_mapping.update_reshape_index_mapping
        update[OPTYPE.EXPAND] = index_mapping.update_expand_index_mapping
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for node in traced.graph.module2node.values():
            fn = update.get(node.type)
            if fn is None or node in traced.cut:
                continue
            if time.process_time() > deadline:
                traced.cut[node] = f"{_op_name(node)}, not mapped within the time budget"
                continue
            try:
                fn(traced.graph, node)
            except Exception as err:  # Torch-Pruning cannot map this op: leave it to the groups
                traced.cut[node] = f"{_op_name(node)}, which Torch-Pruning cannot map ({type(err).__name__}: {err})"


def _check_time(deadline: float) -> None:
    if time.process_time() > deadline:
        raise TraceBudgetExceeded("the time budget for tracing ran out")


def group(traced: Traced, module: nn.Module, handler: Callable[..., Any], idxs: list[int], deadline: float) -> Any:
    """Torch-Pruning's group rooted at ``module`` (its ``get_pruning_group`` without re-mapping every index),
    or a string saying why the group must stay whole."""
    from torch_pruning import _helpers
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.group import Group
    from torch_pruning.pruner import function

    graph, cut = traced.graph, traced.cut
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1:
        handler = function.prune_depthwise_conv_out_channels
    elif is_grouped(module) and traced.grouped is not None:
        handler = traced.grouped.prune_out_channels
    hybrid = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
    found = Group()
    root = graph.module2node[module]
    found.add_dep(dep=Dependency(handler, handler, source=root, target=root), idxs=hybrid)
    visited = set()
    stack = [(found[0].dep, hybrid)]
    while stack:
        if time.process_time() > deadline:
            return "not followed within the time budget"
        dep, current = stack.pop()
        node, fn = dep.target, dep.handler
        visited.add(node)
        for new_dep in node.dependencies:
            if not new_dep.is_triggered_by(fn):
                continue
            if new_dep.target in cut:
                return f"through {cut[new_dep.target]}"
            new = current
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            if len(new) > MAX_INDICES:
                return f"through {_op_name(new_dep.target)}, which maps a channel to too many positions"
            if len(new) == 0:
                continue
            if new_dep.target in visited and found.has_pruning_op(new_dep, new):
                continue
            found.add_dep(new_dep, new)
            stack.append((new_dep, new))
    merged = Group()
    for dep, current in found.items:
        merged.add_and_merge(dep, current)
    merged._DG = graph
    for i in range(len(merged)):
        hybrid_idxs = merged[i].idxs
        item = _helpers.GroupItem(merged[i].dep, _helpers.to_plain_idxs(hybrid_idxs))
        item.root_idxs = _helpers.to_root_idxs(hybrid_idxs)
        merged[i] = item
    return merged


def all_groups(traced: Traced, ignored: list[nn.Module], deadline: float) -> Iterator[tuple[nn.Module, Any]]:
    """Every group rooted at a convolution or linear layer, as Torch-Pruning's ``get_all_groups`` finds them:
    ``(root module, group or reason it stays whole)``."""
    from torch_pruning.ops import TORCH_CONV, TORCH_LINEAR

    graph = traced.graph
    visited: set[nn.Module] = set()
    for m in list(graph.module2node):
        if m in ignored or not isinstance(m, (TORCH_CONV, TORCH_LINEAR)) or m in visited:
            continue
        pruner = graph.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        found = group(traced, m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))), deadline)
        if isinstance(found, str):
            visited.add(m)
            yield m, found
            continue
        prunable = True
        for dep, _ in found:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
                prunable = prunable and dep.target.module not in ignored
        if prunable:
            yield m, found


def child_inputs(module: nn.Module, example_inputs: Any, call: Callable[[nn.Module, Any], Any]) -> dict[str, Any]:
    """What each direct child of ``module`` received on its first call during one forward: a tuple of
    positional arguments or a dict of keyword arguments (children called with both are left out)."""
    seen: dict[str, Any] = {}
    hooks = []

    def recorder(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name in seen:
                return
            seen[name] = args if not kwargs else (kwargs if not args else None)

        return hook

    for name, child in module.named_children():
        hooks.append(child.register_forward_pre_hook(recorder(name), with_kwargs=True))
    try:
        with torch.no_grad():
            call(module, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: v for n, v in seen.items() if v is not None}
