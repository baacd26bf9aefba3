"""The hooks of the block-by-block runner: statistics of each layer's inputs, and the reconstruction error."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.masks.distributed import all_reduce_sum_
from lightning_prune.oneshot.layers import LinearMap
from lightning_prune.oneshot.statistics import Statistic


class StopBlock(Exception):
    """Raised by a statistics hook once the last layer of a block has seen its input."""


class Layer:
    """One pruned layer: its names, module, adapter, target and results."""

    def __init__(self, block: int, module_name: str, module: nn.Module, adapter: LinearMap) -> None:
        self.block = block
        self.module_name = module_name
        self.name = f"{module_name}.{adapter.parameter_name()}"
        self.module = module
        self.adapter = adapter
        self.target = 0.0
        self.error: float | None = None
        self.seconds = 0.0
        self.sparsity = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.adapter.matrix(self.module).shape
        return int(rows), int(cols)


class Collector:
    """Forward pre-hooks that accumulate a statistic of each layer's inputs.

    Layers called with the very same input tensor (the q, k and v projections of an attention block) share one
    statistic, decided on the first pass. After the first pass, when the last layer to be called is called once
    per pass, the pass stops right after it has seen its input (``early_stop``): what follows it does not change
    the statistics.
    """

    def __init__(
        self, layers: Sequence[Layer], make: Callable[[int, torch.device], Statistic], early_stop: bool
    ) -> None:
        self.stats: dict[str, Statistic] = {}
        self.owner: dict[str, str] = {}
        self._make = make
        self._seen: list[tuple[Tensor, str]] = []
        self._order: list[str] = []
        self._recording = True
        self._early_stop = early_stop
        self.stop_at: str | None = None
        self._handles: list[RemovableHandle] = [
            layer.module.register_forward_pre_hook(partial(self._hook, layer)) for layer in layers
        ]

    def _hook(self, layer: Layer, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        owner = self.owner.get(layer.name)
        if owner is None:
            owner = next((o for t, o in self._seen if t is x), layer.name)
            self.owner[layer.name] = owner
            if owner == layer.name:
                self.stats[layer.name] = self._make(layer.shape[1], x.device)
        if owner == layer.name:
            self.stats[owner].add_(layer.adapter.rows(args))
            self._seen.append((x, owner))
        elif not any(t is x and o == owner for t, o in self._seen):
            raise RuntimeError(
                f"{layer.name!r} shared the input tensor of {owner!r} on the first calibration batch but not on a "
                "later one, so their statistics cannot be shared."
            )
        if self._recording:
            self._order.append(layer.name)
        elif layer.name == self.stop_at:
            raise StopBlock

    def end_pass(self) -> None:
        self._seen.clear()
        if self._recording:
            self._recording = False
            if self._early_stop and self._order and self._order.count(self._order[-1]) == 1:
                self.stop_at = self._order[-1]

    def statistic(self, layer: Layer) -> Statistic | None:
        owner = self.owner.get(layer.name)
        return None if owner is None else self.stats[owner]

    def release(self, layer: Layer) -> None:
        """Drop the statistic of ``layer`` (shared or not) once no layer needs it any more."""
        owner = self.owner.get(layer.name)
        if owner is not None:
            self.stats.pop(owner, None)

    def last_users(self, layers: Sequence[Layer]) -> set[str]:
        """The names of the layers, among ``layers`` in order, that are the last to need their statistic."""
        last = {self.owner[layer.name]: layer.name for layer in layers if layer.name in self.owner}
        return set(last.values())

    def reduce_(self, layers: Sequence[Layer]) -> None:
        """All-reduce every statistic, in the (rank-independent) order of the layers."""
        for layer in layers:
            stat = self.stats.get(layer.name)
            if stat is not None:
                stat.reduce_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class ErrorMeter:
    """Forward hooks that measure ``||(W - W') x||^2`` and ``||W x + b||^2`` on each call of a pruned layer.

    ``samples``: measure on the first ``samples`` entries of the batch dimension only (all when None).
    ``once``: drop each layer's difference ``W - W'`` after its first measured call (one pass over all samples).
    """

    def __init__(
        self, layers: Sequence[Layer], deltas: dict[str, Tensor], samples: int | None = None, once: bool = False
    ) -> None:
        self.deltas = deltas
        self.active = True
        self.samples = samples
        self.once = once
        self.sums = torch.zeros(len(layers), 2, dtype=torch.float64)
        self._handles = [
            layer.module.register_forward_hook(partial(self._hook, i, layer)) for i, layer in enumerate(layers)
        ]

    def _hook(self, i: int, layer: Layer, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        delta = self.deltas.pop(layer.name, None) if self.once else self.deltas.get(layer.name)
        if not self.active or delta is None:
            return
        if self.samples is not None:
            args = (args[0][: self.samples], *args[1:])
            output = output[: self.samples]
        error = layer.adapter.rows(args).to(delta.dtype) @ delta.t()
        dense = output.reshape(error.shape).to(delta.dtype) + error
        self.sums[i, 0] += float(error.square().sum(dtype=torch.float64))
        self.sums[i, 1] += float(dense.square().sum(dtype=torch.float64))

    def remove(self) -> list[float]:
        for handle in self._handles:
            handle.remove()
        all_reduce_sum_(self.sums)
        return [float(e / d) ** 0.5 if d > 0 else 0.0 for e, d in self.sums.tolist()]


class SequentialPruning:
    """Forward pre-hooks that prune each layer when the calibration inputs reach it, before it computes its output.

    The block runs once on all the calibration samples at once: each layer's hook accumulates the statistic of
    its input (all-reduced over processes), calls ``prune(layer, statistic)`` and returns, so that the layer
    computes its output with its pruned weight and the layers after it see the pruned layer's outputs. Layers
    called with the very same input tensor (the q, k and v projections of an attention block) share one
    statistic, held while that tensor is alive. A layer called twice in the pass is pruned on its first call.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        make: Callable[[int, torch.device], Statistic] | None,
        prune: Callable[[Layer, Statistic | None], None],
    ) -> None:
        self._make = make
        self._prune = prune
        self._shared: list[tuple[weakref.ref[Tensor], Statistic]] = []
        self.pruned: set[str] = set()
        self._handles: list[RemovableHandle] = [
            layer.module.register_forward_pre_hook(partial(self._hook, layer)) for layer in layers
        ]

    def _statistic(self, layer: Layer, args: tuple[Any, ...]) -> Statistic | None:
        if self._make is None:
            return None
        x = args[0]
        self._shared = [(ref, stat) for ref, stat in self._shared if ref() is not None]
        for ref, stat in self._shared:
            if ref() is x:
                return stat
        stat = self._make(layer.shape[1], x.device)
        stat.add_(layer.adapter.rows(args))
        stat.reduce_()
        if isinstance(x, Tensor):
            self._shared.append((weakref.ref(x), stat))
        return stat

    def _hook(self, layer: Layer, module: nn.Module, args: tuple[Any, ...]) -> None:
        if layer.name in self.pruned:
            return
        self.pruned.add(layer.name)
        self._prune(layer, self._statistic(layer, args))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._shared.clear()


def move_outside(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device) -> None:
    """Move the parameters and buffers of ``model`` that no block holds to ``device`` (in place)."""
    inside = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in inside:
                param.data = param.data.to(device)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if id(buffer) not in inside:
                setattr(module, name, buffer.to(device))
