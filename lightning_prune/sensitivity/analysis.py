"""The analysis: prune each layer alone at a grid of ratios, evaluate, restore.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(32, 4)
    >>> analyze(net, [(x, net(x).argmax(1))], ratios=[0.5]).baseline
    1.0
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._helpers import eval_mode, forward, is_number, output_tensors
from lightning_prune.criteria import build_importance
from lightning_prune.criteria.base import Importance
from lightning_prune.masks.channels import ChannelMaskSet
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.sensitivity.table import LayerSensitivity, MacTerm, SensitivityPoint, SensitivityTable
from lightning_prune.structures import build_structure
from lightning_prune.structures.base import Structure

__all__ = ["DEFAULT_RATIOS", "analyze", "check_ratios"]

#: The grid of :func:`analyze`: every tenth up to 0.9, then 0.95 and 0.98.
DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)

Batches = Iterable[Any]  # yields (inputs, labels) batches, e.g. a DataLoader
Evaluate = Callable[[nn.Module], float]

# Module types whose MACs are counted, as lightning_prune.deploy.profile.count_macs counts them.
_MAC_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_ratios(ratios: object) -> tuple[float, ...]:
    """``ratios`` sorted and without repeats, or a ``ValueError`` unless it is a non-empty sequence of numbers
    in [0, 1).

    Example:
        >>> check_ratios([0.5, 0.1, 0.5])
        (0.1, 0.5)
    """
    values = list(ratios) if isinstance(ratios, Iterable) and not isinstance(ratios, (str, bytes)) else None
    bad = values is None or not values
    if values is not None:
        for r in values:
            if not is_number(r) or not 0.0 <= float(r) < 1.0:
                bad = True
    if bad:
        raise ValueError(
            f"`ratios` must be a non-empty list of numbers in [0, 1), e.g. {list(DEFAULT_RATIOS[:3])}, got {ratios!r}."
        )
    return tuple(sorted({float(r) for r in values or ()}))


def analyze(
    model: nn.Module,
    data: Batches | None = None,
    *,
    evaluate: Evaluate | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    structure: str | Structure = "unstructured",
    importance: str | Importance = "magnitude",
    ignore: Sequence[str] = (),
    example_inputs: Any = None,
    metric: str | None = None,
) -> SensitivityTable:
    """Prune each prunable layer of ``model`` alone at every ratio of ``ratios`` and evaluate the metric.

    This is the per-layer sensitivity analysis of Han et al. (2015, "Learning both Weights and Connections for
    Efficient Neural Networks", for weights) and Li et al. (2017, "Pruning Filters for Efficient ConvNets", for
    filters), as in Distiller's ``sensitivity_analysis`` (Zmora et al., 2019).

    For each layer and ratio the layer is pruned from its dense state to that ratio with ``structure`` and
    ``importance`` (``scope="layer"``), the metric is evaluated, and the layer's parameters are copied back,
    so the model is bitwise unchanged afterwards (also when an evaluation raises). A layer is what the
    structure prunes as a unit: each weight (``"unstructured"``), or each coupled channel group
    (``"channel"``, named by its root layer; a ``ChannelStructure``'s ``max_layer_sparsity`` and
    ``round_to`` apply, and ratios it cannot reach are recorded as skipped).

    Cost: ``1 + layers x ratios`` evaluations of the metric (e.g. 4 layers x 11 ratios: 45), plus one trace
    of the model for channels. The model is in eval mode throughout (each module's mode is restored after)
    and every evaluation runs under ``torch.inference_mode()``.

    Args:
        model: The network, e.g. a LightningModule (layer names are then ``model.<...>``, as the
            ``PruningCallback`` names them).
        data: Validation batches ``(inputs, labels)`` (e.g. a ``DataLoader``; batches of 64 work well on a
            CPU); the metric is then top-1 accuracy. Also the source of ``example_inputs`` when those are
            not given.
        evaluate: Instead of accuracy, any ``evaluate(model) -> float`` where higher is better; for a loss,
            return its negative (``lambda m: -val_loss(m)``): a drop is then a rise of the loss.
        ratios: The fractions of each layer to prune, in [0, 1).
        structure: ``"unstructured"``, ``"channel"`` or a :class:`~lightning_prune.structures.base.Structure`.
        importance: The criterion, as for ``PruningCallback``: a name or an
            :class:`~lightning_prune.criteria.base.Importance` (one that needs statistics must have collected
            them already).
        ignore: Module-name patterns left out of the analysis (as for ``PruningCallback(ignore=...)``).
        example_inputs: What the model's forward takes (a tensor, tuple or dict), to count MACs and, for
            channels, to trace the couplings; default: the inputs of the first batch of ``data``.
        metric: The metric's name in the table; default ``"accuracy"`` or the name of ``evaluate``.

    Returns:
        The :class:`SensitivityTable`.

    Raises:
        ValueError: neither ``data`` nor ``evaluate``, bad ``ratios``, no example inputs, an evaluation that is
            not a finite number, or what the structure and importance refuse.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(32, 4)
        >>> table = analyze(net, [(x, net(x).argmax(1))], ratios=[0.5])
        >>> [(layer.name, layer.size, layer.macs) for layer in table.layers]
        [('0.weight', 32, 32), ('2.weight', 16, 16)]
    """
    start = time.perf_counter()
    grid = check_ratios(ratios)
    run, metric_name = _metric(data, evaluate, metric)
    if example_inputs is None:
        example_inputs = _first_inputs(data)
    example_inputs = _to(example_inputs, _device(model))
    structure = build_structure(structure)
    importance = build_importance(importance)
    structure.check_importance(importance)
    masks = structure.bind(model, ignore, example_inputs)
    units = _layers(masks, model)
    mac_terms, layer_macs = _mac_terms(model, example_inputs, masks)
    evaluations = 0
    layers: list[LayerSensitivity] = []
    with eval_mode(model):
        baseline = _evaluate(run, model, "the unpruned model")
        evaluations += 1
        for name, sub, size in units:
            points: list[SensitivityPoint] = []
            skipped: list[tuple[float, str]] = []
            for ratio in grid:
                if ratio == 0.0:
                    points.append(SensitivityPoint(0.0, 0.0, baseline, 0.0))
                    continue
                try:
                    structure.check_target(sub, ratio, "layer")
                except ValueError as err:
                    skipped.append((ratio, str(err)))
                    continue
                with _restored(sub):
                    structure.prune_(sub, importance, ratio, "layer")
                    reached = float(structure.sparsity(sub))
                    value = _evaluate(run, model, f"layer {name!r} pruned to {ratio:g}")
                evaluations += 1
                points.append(SensitivityPoint(ratio, reached, value, baseline - value))
            layers.append(LayerSensitivity(name, size, layer_macs.get(name, 0), tuple(points), tuple(skipped)))
    return SensitivityTable(
        metric=metric_name,
        baseline=baseline,
        unit="channels" if isinstance(masks, ChannelMaskSet) else "weights",
        structure=repr(structure),
        importance=repr(importance),
        ratios=grid,
        layers=tuple(layers),
        mac_terms=tuple(mac_terms),
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
    )


def _metric(data: Batches | None, evaluate: Evaluate | None, name: str | None) -> tuple[Evaluate, str]:
    if evaluate is not None:
        if not callable(evaluate):
            raise TypeError(f"`evaluate` must be a callable `evaluate(model) -> float`, got {evaluate!r}.")
        return evaluate, name or str(getattr(evaluate, "__name__", "metric"))
    if data is None:
        raise ValueError(
            "analyze needs validation data: pass `data` (batches of (inputs, labels), for accuracy) or "
            "`evaluate` (a callable `evaluate(model) -> float`, higher is better)."
        )
    if isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"`data` must be an iterable of (inputs, labels) batches, e.g. a DataLoader, got {data!r}.")
    if iter(data) is data:
        raise TypeError(
            f"`data` is evaluated once per layer and ratio, but a {type(data).__name__} can be read only once: pass "
            "a DataLoader or a list of batches (e.g. `list(batches)`)."
        )

    def accuracy(model: nn.Module) -> float:
        return _accuracy(model, data)

    return accuracy, name or "accuracy"


def _accuracy(model: nn.Module, data: Batches) -> float:
    """Top-1 accuracy over ``data``'s ``(inputs, labels)`` batches (the caller sets eval and inference mode)."""
    device = _device(model)
    correct = total = 0
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                f"`data` must yield (inputs, labels) batches, got a {type(batch).__name__}; pass `evaluate` for "
                "other batch formats."
            )
        inputs, labels = batch[0], batch[1]
        logits = forward(model, _to(inputs, device))
        if not isinstance(logits, Tensor) or logits.dim() < 2:
            raise ValueError(
                "The default metric needs the model to return logits of shape (batch, classes); pass `evaluate` "
                "for other outputs."
            )
        labels = labels.to(logits.device)
        correct += int((logits.argmax(dim=1) == labels).sum())
        total += labels.numel()
    if total == 0:
        raise ValueError("`data` yielded no samples.")
    return correct / total


def _evaluate(run: Evaluate, model: nn.Module, what: str) -> float:
    with torch.inference_mode():
        value = run(model)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not is_number(value):
        raise TypeError(f"The metric must be a number (higher is better), got {value!r} for {what}.")
    if not math.isfinite(value):
        raise ValueError(f"The metric is {value} for {what}; it must be a finite number.")
    return float(value)


def _first_inputs(data: Batches | None) -> Any:
    if data is None or isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise ValueError(
            "analyze needs `example_inputs` (what the model's forward takes) to count MACs and trace the model "
            "when `data` is not given."
        )
    for batch in data:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return inputs[:2] if isinstance(inputs, Tensor) else inputs
    raise ValueError("`data` yielded no batch to take `example_inputs` from.")


def _layers(masks: MaskSet, model: nn.Module) -> list[tuple[str, MaskSet, int]]:
    """``(name, masks of that layer alone, size)`` per layer, in the model's order: a weight, or a channel
    group (by its root layer)."""
    if isinstance(masks, ChannelMaskSet):
        named = dict(zip(masks.names, masks.params))
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        groups = sorted(masks.groups, key=lambda g: order.get(g.name, len(order)))
        return [(g.name, ChannelMaskSet({p: named[p] for p in g.params()}, [g]), g.channels) for g in groups]
    if type(masks) is MaskSet:
        return [(n, MaskSet({n: p}), p.numel()) for n, p in zip(masks.names, masks.params)]
    raise TypeError(
        f"analyze splits a MaskSet into its weights and a ChannelMaskSet into its channel groups; the structure "
        f"returned a {type(masks).__name__}, which it cannot split into layers."
    )


@contextlib.contextmanager
def _restored(masks: MaskSet) -> Iterator[None]:
    """Inside the block ``masks``' parameters may be pruned; afterwards their values are copied back bitwise
    and the masks reset to keep everything."""
    saved = [p.detach().clone() for p in masks.params]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(masks.params, saved):
                param.copy_(value)
            for mask in masks.masks:
                mask.fill_(True)


def _mac_terms(model: nn.Module, example_inputs: Any, masks: MaskSet) -> tuple[list[MacTerm], dict[str, int]]:
    """Every Linear and Conv weight's dense MACs per sample with the layers that prune it, and each layer's
    MACs (what pruning all its units alone saves)."""
    uses = _weight_uses(model, example_inputs)
    terms: list[MacTerm] = []
    layer_macs: dict[str, int] = {}
    owners = {id(p): n for n, p in zip(masks.names, masks.params)}
    masked = dict(zip(masks.names, masks.params))
    for name, (weight, count) in uses.items():
        macs = weight.numel() * count
        dims: list[tuple[tuple[str, float], ...]] = []
        if isinstance(masks, ChannelMaskSet):
            by_dim: dict[int, list[tuple[str, float]]] = {}
            for group in masks.groups:
                owned = 0
                for s in group.slices:
                    if not s.scored or masked.get(s.param) is not weight:
                        continue
                    extent = s.extent(weight)  # a grouped convolution's input channels, not its weight's columns
                    by_dim.setdefault(s.dim, []).append((group.name, len(s.index) / extent))
                    owned += count * (weight.numel() // extent) * len(s.index)
                if owned:  # a grouped convolution's rows and columns are in one group: its MACs count once
                    layer_macs[group.name] = layer_macs.get(group.name, 0) + min(owned, macs)
            dims = [tuple(pairs) for _, pairs in sorted(by_dim.items())]
        elif id(weight) in owners:
            layer = owners[id(weight)]
            dims = [((layer, 1.0),)]
            layer_macs[layer] = layer_macs.get(layer, 0) + macs
        terms.append(MacTerm(name, macs, tuple(dims)))
    return terms, layer_macs


def _weight_uses(model: nn.Module, example_inputs: Any) -> dict[str, tuple[Tensor, int]]:
    """Per Linear/Conv weight (by parameter name): how often one sample applies it, as ``count_macs`` counts."""
    batch = _batch_size(example_inputs)
    names = {id(p): n for n, p in model.named_parameters()}
    uses: dict[str, tuple[Tensor, int]] = {}

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        weight = module.weight
        if not isinstance(weight, Tensor) or not isinstance(output, Tensor) or id(weight) not in names:
            return
        # Conv: once per output position of (batch, channels, *spatial); Linear: once per row of the leading dims.
        count = math.prod(output.shape[2:]) if isinstance(module, _CONVS) else math.prod(output.shape[:-1]) // batch
        name = names[id(weight)]
        uses[name] = (weight, uses.get(name, (weight, 0))[1] + count)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _MAC_TYPES)]
    try:
        with eval_mode(model), torch.no_grad():
            forward(model, _to(example_inputs, _device(model)))
    except Exception as err:
        raise ValueError(
            f"{type(model).__name__} cannot run on the `example_inputs` to count MACs: {type(err).__name__}: {err}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    return uses


def _batch_size(example_inputs: Any) -> int:
    tensors = output_tensors(example_inputs)
    if not tensors or tensors[0].dim() < 1 or tensors[0].shape[0] < 1:
        raise ValueError(
            "`example_inputs` must be a batch (a tensor, or a tuple or dict holding tensors) with at least one "
            f"sample, got {type(example_inputs).__name__}."
        )
    return int(tensors[0].shape[0])


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
