"""Block-by-block one-shot pruning of a whole model from calibration batches, in bounded memory."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_prune._helpers import check_flag
from lightning_prune.masks import MaskSet, prunable_parameters
from lightning_prune.masks.distributed import all_reduce_sum_
from lightning_prune.oneshot._bits import PackedMask
from lightning_prune.oneshot._hooks import Collector, ErrorMeter, Layer, SequentialPruning, StopBlock, move_outside
from lightning_prune.oneshot.base import Allocation, OneShotMethod, OneShotStructure, build_oneshot_structure
from lightning_prune.oneshot.blocks import (
    CapturedInputs,
    ForwardFn,
    call_model,
    capture_block_inputs,
    find_blocks,
    iterate_batches,
    merge_captured,
)
from lightning_prune.oneshot.layers import LinearMap
from lightning_prune.oneshot.registry import LAYER_TYPES, build_allocation, build_method
from lightning_prune.oneshot.report import BlockProgress, LayerReport, OneShotReport
from lightning_prune.oneshot.statistics import ColumnSquares, Statistic
from lightning_prune.oneshot.wanda import input_norms
from lightning_prune.structures.base import check_sparsity, resolve_layer_targets
from lightning_prune.structures.nm import NMStructure

__all__ = ["Offload", "prune_one_shot"]

logger = logging.getLogger(__name__)

Offload = Literal["none", "activations", "blocks"]


@torch.no_grad()
def prune_one_shot(
    model: nn.Module,
    dataloader: Iterable[Any],
    method: str | OneShotMethod = "wanda",
    sparsity: float | Mapping[str, float] | None = None,
    structure: str | OneShotStructure = "unstructured",
    allocation: str | Allocation | None = None,
    blocks: str | Sequence[str] | None = None,
    num_samples: int | None = 128,
    ignore: Sequence[str] = (),
    forward_fn: ForwardFn | None = None,
    device: torch.device | str | None = None,
    offload: Offload = "none",
    error_batches: int | None = 1,
    layer_types: Mapping[type[nn.Module], LinearMap] | None = None,
    progress: Callable[[BlockProgress], None] | None = None,
    sequential: bool = False,
) -> tuple[MaskSet, OneShotReport]:
    """Prune ``model`` in one shot from calibration batches, block by block, and return its masks and a report.

    The blocks (:func:`~lightning_prune.oneshot.blocks.find_blocks`) are pruned in order: the inputs of block 0
    are captured by running the model on each batch until block 0 and stopping there; then for each block the
    linear layers inside it are hooked, the captured inputs run through it to accumulate each layer's statistic
    (summed over processes under ``torch.distributed``), each layer is pruned by ``method``, and the block runs
    again with its pruned weights to give the next block its inputs. Memory: the model, one block's statistics
    and the activations of the calibration batches (one set, overwritten block by block), and the keep-masks
    packed one bit per weight until they are unpacked into the returned ``MaskSet`` at the end. Layers outside the
    blocks (embeddings, the output head) stay dense, as in the papers. See :mod:`~lightning_prune.oneshot.blocks`
    for how batches are read and the model is called.

    Args:
        model: the model, on its compute device (or on the CPU with ``offload="blocks"``).
        dataloader: calibration batches: tensors, ``(inputs, targets)`` tuples or dicts (``input_ids``,
            ``attention_mask``). Under ``torch.distributed`` each process passes its own share (at least one batch:
            every process takes part in each block's all-reduce).
        method: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` (see :data:`~lightning_prune.oneshot.METHODS`) or a
            :class:`~lightning_prune.oneshot.base.OneShotMethod` such as ``SparseGPT(blocksize=64)``.
        sparsity: the fraction of each layer's weights to prune; None means 0.5 (unstructured) or ``n / m``
            (N:M). A mapping ``{layer-name pattern: sparsity}`` gives layers their own targets (layers no pattern
            matches stay dense; see :func:`~lightning_prune.structures.resolve_layer_targets`).
        structure: ``"unstructured"``, an ``"N:M"`` pattern such as ``"2:4"`` or ``"4:8"``, or the structure object.
        allocation: None (the same target for every layer) or ``"owl"`` /
            :class:`~lightning_prune.oneshot.owl.OWL` (non-uniform targets with the same total; one extra dense
            pass over the blocks, and the loader is read twice: keep it deterministic). Unstructured only.
        blocks: None (find them), the name of their container, or their names.
        num_samples: calibration samples to use (per process), None for the whole loader.
        ignore: module-name patterns to leave dense (``fnmatch``, as for
            :func:`~lightning_prune.masks.prunable_parameters`).
        forward_fn: ``forward_fn(model, batch)`` to call the model on a batch (default:
            :func:`~lightning_prune.oneshot.blocks.call_model`).
        device: the compute device; default: that of block 0's first parameter.
        offload: ``"activations"`` keeps the captured activations on the CPU between blocks; ``"blocks"`` also
            keeps the model on the CPU and moves one block at a time to ``device``.
        error_batches: on how many calibration batches (per process) each layer's relative reconstruction error
            is measured: 0 for none, None for all. It costs one more matmul per layer on those batches (and a
            second pass of the last block over them), so the default measures on the first batch only.
        layer_types: the layer types pruned and their adapters (default
            :data:`~lightning_prune.oneshot.LAYER_TYPES`: ``nn.Linear``).
        progress: called with a :class:`~lightning_prune.oneshot.report.BlockProgress` after each block (progress
            is also logged at INFO level through :mod:`logging`).
        sequential: run each block once instead of twice ("true sequential", as an option of the SparseGPT
            reference code): the calibration batches are concatenated into one batch (see
            :func:`~lightning_prune.oneshot.blocks.merge_captured`), and each layer is pruned when that batch
            reaches it, from the statistic of its inputs, before it computes its outputs; the layers after it
            (in the block and in the next blocks) see the pruned layer's outputs, and the block's outputs are the
            pruned block's. About half the time of the default (which gathers every layer's statistic on the
            dense block, then runs the pruned block again). Memory: the block's intermediate activations on all
            calibration samples at once, as one forward pass with a batch of ``num_samples`` (the default holds
            those of one batch). The layer's error is measured on the samples of the first ``error_batches``
            batches. Equal to the default for a block with a single pruned layer.

    Returns:
        ``(masks, report)``: a :class:`~lightning_prune.masks.MaskSet` over the pruned weights whose masks mark
        exactly the pruned entries (all zero in the model), ready for :class:`~lightning_prune.PruningCallback`
        recovery fine-tuning, and a :class:`~lightning_prune.oneshot.report.OneShotReport`.

    Raises:
        ValueError: an unknown method, structure or allocation; a bad target (a sparsity outside [0, 1), an N:M
            target other than ``n / m``, an input width that is not a multiple of ``m``); no repeated blocks; an
            empty calibration loader or batches of other shapes; a singular SparseGPT Hessian. Each message names
            the layer or argument and what to change.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> body = nn.Sequential(*[nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2)])
        >>> model = nn.Sequential(nn.Linear(4, 8), body)  # the blocks: the two children of `body`
        >>> data = [torch.randn(16, 4) for _ in range(2)]
        >>> masks, report = prune_one_shot(model, data, method="wanda", sparsity=0.5)
        >>> masks.names[:2], masks.sparsity()
        (['1.0.0.weight', '1.0.2.weight'], 0.5)
    """

    start = time.perf_counter()
    pruner = build_method(method)
    shape = build_oneshot_structure(structure)
    allocator = build_allocation(allocation)
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise ValueError(f"`num_samples` must be a positive integer or None (the whole loader), got {num_samples!r}.")
    bad_errors = isinstance(error_batches, bool) or not isinstance(error_batches, int) or error_batches < 0
    if error_batches is not None and bad_errors:
        raise ValueError(
            f"`error_batches` must be an integer >= 0 (0: no error measured) or None (all), got {error_batches!r}."
        )
    if offload not in ("none", "activations", "blocks"):
        raise ValueError(f"`offload` must be 'none', 'activations' or 'blocks', got {offload!r}.")
    if allocator is not None and isinstance(shape, NMStructure):
        raise ValueError(
            f"allocation={allocator!r} gives layers different sparsities, but {shape.n}:{shape.m} fixes every layer at "
            f"{shape.n / shape.m:.4g}. Use structure='unstructured' with an allocation."
        )
    if allocator is not None and iter(dataloader) is dataloader:
        raise ValueError(
            f"allocation={allocator!r} reads the calibration batches twice (a dense pass, then pruning), but "
            "`dataloader` is an iterator that can be read once. Pass a list or a DataLoader."
        )
    check_flag("sequential", sequential)
    if allocator is not None and isinstance(sparsity, Mapping):
        raise ValueError("Pass either per-layer targets in `sparsity` or an `allocation`, not both.")
    adapters = dict(LAYER_TYPES if layer_types is None else layer_types)
    found = find_blocks(model, blocks)

    # The pruned layers: weights of adapted layers inside the blocks, outside `ignore`.
    prunable = set(prunable_parameters(model, ignore, types=tuple(adapters)))
    block_layers: list[list[Layer]] = []
    qualified = {id(m): n for n, m in model.named_modules()}
    for index, (_, block) in enumerate(found):
        layers = []
        for module in block.modules():
            adapter = adapters.get(type(module))
            name = qualified.get(id(module))
            if adapter is not None and name is not None and f"{name}.{adapter.parameter_name()}" in prunable:
                layers.append(Layer(index, name, module, adapter))
        block_layers.append(layers)
    all_layers = [layer for layers in block_layers for layer in layers]
    if not all_layers:
        raise ValueError(
            f"The blocks of {type(model).__name__} ({found[0][0]!r}, ...) hold no layer to prune of types "
            f"{[t.__name__ for t in adapters]} outside `ignore`={list(ignore)}."
        )

    # Targets.
    default = shape.n / shape.m if isinstance(shape, NMStructure) else 0.5
    if isinstance(sparsity, Mapping):
        resolved = resolve_layer_targets([layer.name for layer in all_layers], sparsity)
        for layer in all_layers:
            layer.target = resolved[layer.name]
    else:
        uniform = default if sparsity is None else sparsity
        check_sparsity(uniform)
        for layer in all_layers:
            layer.target = float(uniform)
    for layer in all_layers:
        pruner.check_target(layer.name, layer.shape, shape, layer.target)

    target_device = torch.device(device) if device is not None else next(found[0][1].parameters()).device
    store = torch.device("cpu") if offload != "none" else target_device
    blocks_only = [b for _, b in found]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    call = forward_fn or call_model
    report = OneShotReport(repr(pruner), repr(shape), None if allocator is None else repr(allocator), 0, len(found))
    packed: dict[str, PackedMask] = {}

    measure_error = error_batches != 0
    needs_data = pruner.needs_calibration or measure_error or allocator is not None
    one_pass = sequential and needs_data
    error_samples: int | None = None  # in one pass: the samples of the first `error_batches` batches

    def capture() -> list[CapturedInputs]:
        began = time.perf_counter()
        if offload == "blocks":
            move_outside(model, blocks_only, target_device)
        try:
            batches = iterate_batches(dataloader, num_samples, target_device)
            captured = capture_block_inputs(model, found[0][1], found[0][0], batches, call, store)
            if one_pass:
                nonlocal error_samples
                if error_batches is not None:
                    error_samples = sum(c.samples for c in captured[:error_batches])
                captured = [merge_captured(captured, found[0][0])]
        finally:
            if offload == "blocks":
                move_outside(model, blocks_only, torch.device("cpu"))
        report.capture_seconds += time.perf_counter() - began
        return captured

    def run(
        index: int,
        acts: list[CapturedInputs],
        keep: bool,
        collector: Collector | None = None,
        meter: ErrorMeter | None = None,
    ) -> None:
        name, block = found[index]
        for j, cap in enumerate(acts):
            if meter is not None:
                meter.active = error_batches is None or j < error_batches
            hidden = cap.hidden.to(target_device)
            try:
                out = cap.call(block, hidden, target_device, name)
            except StopBlock:
                out = None
            if collector is not None:
                collector.end_pass()
            if keep and out is not None:
                cap.hidden = out.to(store)

    def prune_layer(layer: Layer, stat: Statistic | None, deltas: dict[str, Tensor]) -> None:
        tick = time.perf_counter()
        weight = layer.adapter.matrix(layer.module)
        dense = weight.to(torch.float32, copy=True) if measure_error else None  # a copy even for float32
        keep = pruner.prune_(layer.name, weight, stat, shape, layer.target)
        if dense is not None:
            deltas[layer.name] = dense.sub_(weight.float())
        packed[layer.name] = PackedMask(_as_parameter_layout(layer, keep))
        layer.sparsity = 1.0 - int(torch.count_nonzero(keep)) / keep.numel()
        layer.seconds = time.perf_counter() - tick

    try:
        acts = capture() if needs_data else []
        samples = torch.tensor(float(sum(c.samples for c in acts)), dtype=torch.float64)
        report.samples = int(all_reduce_sum_(samples))

        if allocator is not None:  # a dense pass: observe every block, then capture again
            allocator.reset()
            for index, layers in enumerate(block_layers):
                if offload == "blocks":
                    found[index][1].to(target_device)
                observer = Collector(layers, ColumnSquares, early_stop=False)
                try:
                    run(index, acts, keep=True, collector=observer)
                finally:
                    observer.remove()
                observer.reduce_(layers)
                observed = []
                for layer in layers:
                    norms = input_norms(observer.statistic(layer), layer.name)
                    observed.append((layer.name, layer.adapter.matrix(layer.module), norms))
                allocator.observe_block(index, observed)
                if offload == "blocks":
                    found[index][1].to("cpu")
            sizes = {layer.name: layer.shape[0] * layer.shape[1] for layer in all_layers}
            targets = allocator.targets(sizes, float(default if sparsity is None else sparsity))  # type: ignore[arg-type]
            for layer in all_layers:
                layer.target = targets[layer.name]
                pruner.check_target(layer.name, layer.shape, shape, layer.target)
            del acts
            acts = capture()

        for index, layers in enumerate(block_layers):
            began = time.perf_counter()
            name, block = found[index]
            if offload == "blocks":
                block.to(target_device)
            deltas: dict[str, Tensor] = {}
            last = index == len(found) - 1
            if one_pass:
                make = _factory(pruner) if pruner.needs_calibration else None
                hooks = SequentialPruning(layers, make, partial(prune_layer, deltas=deltas))
                meter = ErrorMeter(layers, deltas, samples=error_samples, once=True) if measure_error else None
                try:
                    run(index, acts, keep=not last, meter=meter)
                finally:
                    hooks.remove()
                    if meter is not None:
                        for layer, error in zip(layers, meter.remove()):
                            layer.error = error
                for layer in layers:  # not called on the calibration batches: the method says what to do
                    if layer.name not in hooks.pruned:
                        prune_layer(layer, None, deltas)
            else:
                collector: Collector | None = None
                if pruner.needs_calibration and layers:
                    collector = Collector(layers, _factory(pruner), early_stop=True)
                    try:
                        run(index, acts, keep=False, collector=collector)
                    finally:
                        collector.remove()
                    collector.reduce_(layers)
                last_users = set() if collector is None else collector.last_users(layers)
                for layer in layers:
                    prune_layer(layer, None if collector is None else collector.statistic(layer), deltas)
                    if collector is not None and layer.name in last_users:
                        collector.release(layer)  # free its statistic (a SparseGPT Hessian) before the next layer's
                del collector
                if needs_data and (not last or measure_error):
                    meter = ErrorMeter(layers, deltas) if measure_error else None
                    try:  # the last block's outputs are not needed: run it on the measured batches only
                        run(index, acts[:error_batches] if last else acts, keep=not last, meter=meter)
                    finally:
                        if meter is not None:
                            for layer, error in zip(layers, meter.remove()):
                                layer.error = error
            del deltas
            if offload == "blocks":
                block.to("cpu")
            pruned = sum(x.sparsity * x.shape[0] * x.shape[1] for x in layers)
            total = sum(x.shape[0] * x.shape[1] for x in layers)
            info = BlockProgress(
                index,
                len(found),
                name,
                tuple(x.name for x in layers),
                pruned / max(total, 1),
                time.perf_counter() - began,
            )
            logger.info(
                "one-shot %s: block %d/%d (%s) pruned %d layers to %.2f%% in %.1f s",
                pruner.name,
                index + 1,
                len(found),
                name,
                len(layers),
                100 * info.sparsity,
                info.seconds,
            )
            if progress is not None:
                progress(info)
        del acts
    finally:
        for module, mode in modes.items():
            module.training = mode

    masks = MaskSet({layer.name: _parameter(layer) for layer in all_layers})
    for name, mask in zip(masks.names, masks.masks):
        packed.pop(name).unpack_into(mask)
    report.layers = [
        LayerReport(l.name, l.block, l.shape, l.target, l.sparsity, l.error, l.seconds)
        for l in all_layers  # noqa: E741
    ]
    report.seconds = time.perf_counter() - start
    return masks, report


def _factory(method: OneShotMethod) -> Callable[[int, torch.device], Statistic]:
    def make(in_features: int, device: torch.device) -> Statistic:
        stat = method.statistic(in_features, device)
        if stat is None:
            raise RuntimeError(f"{method!r} needs calibration data but makes no statistic")  # a method's bug
        return stat

    return make


def _parameter(layer: Layer) -> nn.Parameter:
    param = getattr(layer.module, layer.adapter.parameter_name())
    if not isinstance(param, nn.Parameter):
        raise TypeError(f"{layer.name!r} is not an nn.Parameter, so it cannot be masked.")
    return param


def _as_parameter_layout(layer: Layer, keep: Tensor) -> Tensor:
    """A keep-mask in the layout of the parameter (the adapter's matrix may be a transposed view of it)."""
    param = _parameter(layer)
    if keep.shape == param.shape:
        return keep
    if keep.t().shape == param.shape:
        return keep.t()
    raise ValueError(
        f"The adapter of {layer.name!r} gives a {tuple(keep.shape)} matrix for a parameter of shape "
        f"{tuple(param.shape)}: adapters must give the parameter or its transpose."
    )
