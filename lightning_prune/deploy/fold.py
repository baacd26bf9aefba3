"""Inference copies of a network: BatchNorm folded into the layer before it, channels-last memory format.

After channel pruning and compaction a network is smaller, but each BatchNorm still runs as a separate pass
over its activations. In eval mode a BatchNorm is an affine map per channel, so when it directly follows a
convolution (or a linear layer) and is that layer's only consumer it can be folded into the layer's weight and
bias (Ioffe & Szegedy, "Batch Normalization", ICML 2015; Jacob et al., "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, section 3.2).

:func:`deployable` does this on a copy and checks the copy against the original on the example inputs.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> fast = deployable(net, torch.randn(1, 3, 8, 8))
    >>> type(fast[1]).__name__, fast.training
    ('Identity', False)
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.utils import _pytree as pytree

from lightning_prune._helpers import check_flag, positional_tensors

ModuleT = TypeVar("ModuleT", bound=nn.Module)


# (layer, norm) pairs that fold, as in torch.fx.experimental.optimization.fuse; types are matched exactly, so
# subclasses (e.g. parametrized convolutions) are left alone.
_PATTERNS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
)


def deployable(
    model: ModuleT,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    fold_bn: bool = True,
    channels_last: bool = True,
) -> ModuleT:
    """A new eval-mode copy of ``model`` for inference, with BatchNorms folded and channels-last weights.

    ``model`` itself is not changed. The copy keeps ``model``'s class, attributes and module names: a folded
    BatchNorm's scale and shift move into the preceding convolution's (or linear layer's) weight and bias,
    computed by ``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` (the functions behind
    ``torch.fx.experimental.optimization.fuse``), and the BatchNorm is replaced by ``nn.Identity``.

    Which pairs fold is read from a ``torch.fx`` trace, with the rules of ``fuse``: a ``Conv{1,2,3}d``
    followed by a ``BatchNorm{1,2,3}d`` of the same dimension, or a ``Linear`` followed by a ``BatchNorm1d``,
    where the BatchNorm is the layer's only consumer and tracks running statistics. On top of ``fuse``'s rules,
    a pair is left alone when either module is called more than once or has its parameters read elsewhere in
    the trace, when either carries forward hooks, or (Linear) when the layer's output is not 2-D in the example
    forward, since ``BatchNorm1d`` then normalises a different dimension. ``fuse`` itself is not used because
    it returns a ``GraphModule`` that drops the model's class, methods, hooks and non-module attributes. When the
    whole model cannot be traced (data-dependent control flow, for instance), each child module is traced
    instead, recursively, so the traceable parts (blocks, ``nn.Sequential`` stages) still fold.

    The copy is then run on ``example_inputs`` and compared with ``model`` in eval mode; if the outputs differ
    by more than ``1e-4`` relative (L2 norm over each output tensor), the folding is undone with a
    ``UserWarning`` naming the difference: a fold that changes what the model computes on the example inputs
    (a layer also called from code the trace did not see, say) does not go unnoticed.

    With ``channels_last=True``, 4-D parameters and buffers are stored channels-last
    (``model.to(memory_format=torch.channels_last)``); oneDNN's convolutions then keep their activations
    channels-last too, even for contiguous inputs.

    Measured on a 2-core AMD EPYC (AVX-512), ``torch.set_num_threads(2)``, 32x32 inputs, speed-up over the same
    model unchanged in eval mode (``benchmarks/compaction.py``, median of 15 alternating blocks; VGG-11, ResNet-20
    and torchvision's ResNet-18 with a CIFAR stem). On the dense models, 1.0-1.9x at batch 1 and 1.03-1.34x at
    batch 64. On the same models with 30-70% of their channels pruned and compacted, 1.2-2.2x at batch 1 and
    1.12-1.63x at batch 64; there, BatchNorm folding alone gives 1.03-1.09x at batch 64 and channels-last alone
    0.98-1.54x (below 1 only for ResNet-20 at 70%, whose layers keep 5-19 channels). Both are on by default.
    Channels-last inputs (``x.contiguous(memory_format=torch.channels_last)``) gained another 2-12% at batch 64.

    Args:
        model: The network (any mode; it is copied, the copy is put in eval mode).
        example_inputs: One input batch (a tensor or a tuple of positional inputs) to check the copy with.
        fold_bn: Fold BatchNorms into the layer before them.
        channels_last: Store 4-D weights channels-last.

    Returns:
        The eval-mode copy, of the same class as ``model``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, ``example_inputs`` is not a tensor or a tuple of them,
            or a flag is not a bool.

    Example:
        >>> from lightning_prune.models import resnet20
        >>> net = resnet20().eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> fast = deployable(net, x)
        >>> sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # all 21 folded
        0
        >>> torch.allclose(fast(x), net(x), rtol=1e-4, atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    inputs = positional_tensors(example_inputs)
    check_flag("fold_bn", fold_bn)
    check_flag("channels_last", channels_last)

    deployed = copy.deepcopy(model).eval()
    with torch.inference_mode():
        reference = deployed(*inputs)
    folded = _fold_batchnorms_(deployed, inputs) if fold_bn else 0
    if channels_last and _has_4d_weights(deployed):
        deployed = deployed.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        output = deployed(*inputs)
    error = relative_error(output, reference)
    if folded and error > 1e-4:
        warnings.warn(
            f"Folding {folded} BatchNorm(s) changed the outputs on `example_inputs` by {error:.2e} relative "
            "(more than 1e-4): the model probably calls a folded layer or BatchNorm outside what torch.fx could "
            "trace. Returning the copy without folding; pass `fold_bn=False` to skip the attempt.",
            UserWarning,
            stacklevel=2,
        )
        deployed = copy.deepcopy(model).eval()
        if channels_last and _has_4d_weights(deployed):
            deployed = deployed.to(memory_format=torch.channels_last)
    return deployed


def _has_4d_weights(model: nn.Module) -> bool:
    return any(p.dim() == 4 for p in model.parameters())


def relative_error(output: object, reference: object) -> float:
    """The largest ``||output - reference|| / ||reference||`` (L2) over the floating tensors of two outputs.

    Outputs are matched as PyTorch's pytrees (tensors, tuples, lists, dicts). A structure, shape or non-floating
    value that differs gives ``inf``, and so does any NaN.

    Example:
        >>> relative_error(torch.tensor([0.0, 5.05]), torch.tensor([0.0, 5.0]))  # doctest: +ELLIPSIS
        0.0100...
        >>> relative_error((torch.ones(2),), [torch.ones(2)])
        inf
    """
    outs, out_spec = pytree.tree_flatten(output)
    refs, ref_spec = pytree.tree_flatten(reference)
    if out_spec != ref_spec:
        return math.inf
    worst = 0.0
    for out, ref in zip(outs, refs):
        if not isinstance(ref, torch.Tensor):
            if out != ref:
                return math.inf
            continue
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(ref.shape):
            return math.inf
        if not ref.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(out.to(ref.dtype), ref) else math.inf)
            continue
        diff = float(torch.linalg.vector_norm((out.double() - ref.double()).reshape(-1)))
        scale = float(torch.linalg.vector_norm(ref.double().reshape(-1)))
        error = diff / scale if scale > 0 else diff
        worst = max(worst, math.inf if math.isnan(error) else error)
    return worst


def _fold_batchnorms_(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Fold every foldable (layer, BatchNorm) pair of the eval-mode ``model`` in place; return how many."""
    linear_out_dims = _linear_output_dims(model, inputs)
    modules = dict(model.named_modules())
    pairs = [pair for prefix, graph in _traced_graphs(model) for pair in _foldable_pairs(graph, prefix, modules)]
    folded = 0
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        if isinstance(layer, nn.Linear):
            if linear_out_dims.get(layer_name) != {2}:
                continue
            fused: nn.Module = fuse_linear_bn_eval(layer, bn)
        else:
            fused = fuse_conv_bn_eval(layer, bn)
        _set_module(model, layer_name, fused)
        _set_module(model, bn_name, nn.Identity())
        folded += 1
    return folded


def _linear_output_dims(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, set[int]]:
    """Number of dimensions of each Linear layer's outputs in one forward of ``model``."""
    dims: dict[str, set[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:

            def hook(_m: nn.Module, _i: object, out: object, _name: str = name) -> None:
                dims.setdefault(_name, set()).add(out.dim() if isinstance(out, torch.Tensor) else -1)

            handles.append(module.register_forward_hook(hook))
    if handles:
        try:
            with torch.inference_mode():
                model(*inputs)
        finally:
            for handle in handles:
                handle.remove()
    return dims


def _traced_graphs(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, fx.Graph]]:
    """fx graphs of ``module``, or of its children (recursively) where ``module`` cannot be traced."""
    if not any(True for _ in module.children()):
        return
    try:
        graph = fx.Tracer().trace(module)
    except Exception:  # fx raises many types (TraceError, TypeError, NotImplementedError...): try the children
        for name, child in module.named_children():
            yield from _traced_graphs(child, f"{prefix}{name}.")
        return
    yield prefix, graph


def _foldable_pairs(graph: fx.Graph, prefix: str, modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """(layer, BatchNorm) module names in ``graph`` whose BatchNorm can be folded into the layer."""
    calls: dict[str, int] = {}
    attributes: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            attributes.append(str(node.target))

    def alone(target: str) -> bool:
        module = modules[prefix + target]
        read_elsewhere = any(a == target or a.startswith(target + ".") for a in attributes)
        hooked = bool(module._forward_hooks or module._forward_pre_hooks)
        return calls.get(target) == 1 and not read_elsewhere and not hooked

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        layer_target, bn_target = str(source.target), str(node.target)
        layer, bn = modules[prefix + layer_target], modules[prefix + bn_target]
        if (type(layer), type(bn)) not in _PATTERNS:
            continue
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            continue
        if alone(layer_target) and alone(bn_target):
            pairs.append((prefix + layer_target, prefix + bn_target))
    return pairs


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
