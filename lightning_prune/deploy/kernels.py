"""Sparse CPU inference for unstructured pruning: CSR kernels chosen per layer by measuring them.

Zeros in a dense weight save no time: a dense matrix product multiplies them like any other entry. A layer
whose weight is stored in compressed sparse row (CSR) form skips them, but sparse kernels pay for their index
arithmetic and irregular memory access, so they only win above a break-even sparsity that depends on the
layer's shape, the batch size, the threads and the library (Gale et al., "The State of Sparsity in Deep
Neural Networks", 2019, section 6; Han et al., "EIE", ISCA 2016, for the CSR-times-vector scheme). Which
kernel is fastest is not what one would guess either: on one machine PyTorch's CSR product is the fast one,
on another SciPy's. :func:`sparse_inference` therefore *measures*, for every ``nn.Linear`` and 1x1
``nn.Conv2d`` of a pruned model, the dense layer and each candidate kernel on the layer's actual input shape
at the batch sizes you deploy with, replaces the layer by the fastest, and leaves it dense where no sparse
kernel is faster.

The layers and their kernels are in :mod:`~lightning_prune.deploy.sparse_layers`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    >>> with torch.no_grad():
    ...     net[0].weight[torch.rand(256, 256, generator=torch.Generator().manual_seed(0)) < 0.95] = 0
    >>> result = sparse_inference(net, torch.randn(4, 256), kernel="torch_csr")  # no measuring: forced
    >>> type(result.model[0]).__name__, result.layers[0].kernel, type(result.model[2]).__name__
    ('SparseLinear', 'torch_csr', 'Linear')
    >>> x = torch.randn(3, 256)
    >>> with torch.inference_mode():
    ...     torch.allclose(result.model(x), net(x), rtol=1e-5, atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor, nn

from lightning_prune._helpers import (
    batched,
    check_batch_sizes,
    check_int,
    eval_mode,
    forward,
    is_number,
    num_threads,
    rotated,
    text_table,
    time_call,
)
from lightning_prune.deploy.fold import relative_error
from lightning_prune.deploy.sparse_layers import SPARSE_KERNELS, to_sparse_layer, unsupported_reason
from lightning_prune.masks.params import matches_own_name, name_matches


# ---------------------------------------------------------------------------------------------- measuring
def _timed_interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int, statistic: str = "median"
) -> dict[str, float]:
    """Median (or fastest) seconds of each call, the calls interleaved (a b c a b c ...) so that drifts hit all
    alike."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in rotated(names, r):
            times[name].append(time_call(calls[name]))
    pick = min if statistic == "min" else statistics.median
    return {name: pick(values) for name, values in times.items()}


def _check_kernels(kernels: Sequence[str], name: str = "candidates") -> tuple[str, ...]:
    chosen = (kernels,) if isinstance(kernels, str) else tuple(kernels)
    unknown = [k for k in chosen if k not in SPARSE_KERNELS]
    if not chosen or unknown:
        raise ValueError(f"`{name}` must be a non-empty list of {list(SPARSE_KERNELS)}, got {kernels!r}.")
    return chosen


def measure_kernels(
    layer: nn.Module,
    sample_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    kernels: Sequence[str] = SPARSE_KERNELS,
    *,
    repeats: int = 15,
    warmup: int = 3,
    threads: int | None = None,
    channels_last: bool = False,
    generator: torch.Generator | None = None,
    statistic: Literal["median", "min"] = "median",
) -> dict[str, dict[int, float]]:
    """Median (or fastest) milliseconds of one forward of ``layer`` dense and with each kernel, per batch size.

    The inputs are random, of shape ``(batch, *sample_shape)``; the dense layer and the kernels are timed in
    turn, call after call (``warmup`` untimed rounds, then ``repeats`` timed ones, the order rotating), under
    ``torch.inference_mode()``.

    Args:
        layer: An ``nn.Linear`` or 1x1 ``nn.Conv2d`` (see :func:`to_sparse_layer`).
        sample_shape: One sample's input shape: ``(in_features,)``, ``(tokens, in_features)``, or ``(C, H, W)``.
        batch_sizes: The batch sizes to time.
        kernels: The sparse kernels to time besides ``"dense"``.
        repeats: Timed calls of each kernel per batch size.
        warmup: Untimed calls first.
        threads: ``torch.set_num_threads`` while timing; None keeps the current setting.
        channels_last: Time a convolution on channels-last inputs.
        generator: For the random inputs.
        statistic: ``"median"`` of the timed calls, or ``"min"``: the fastest, which a busy machine's stalls
            (that hit multi-threaded dense products harder than single-threaded sparse ones) do not bias.

    Returns:
        ``{kernel: {batch: ms}}`` with ``"dense"`` first.

    Example:
        >>> times = measure_kernels(nn.Linear(32, 16), (32,), batch_sizes=(1, 4), repeats=3, warmup=1)
        >>> sorted(times), sorted(times["scipy_csr"])
        (['dense', 'scipy_csr', 'torch_csr'], [1, 4])
    """
    sizes = check_batch_sizes(batch_sizes)
    chosen = _check_kernels(kernels, "kernels")
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    if threads is not None:
        check_int("threads", threads, 1)
    if statistic not in ("median", "min"):
        raise ValueError(f"`statistic` must be 'median' or 'min', got {statistic!r}.")
    sparse = {k: to_sparse_layer(layer, k) for k in chosen}
    weight = cast(Tensor, layer.weight)  # a Linear's or Conv2d's: checked by to_sparse_layer
    result: dict[str, dict[int, float]] = {name: {} for name in ("dense", *chosen)}
    with num_threads(threads), eval_mode(layer), torch.inference_mode():
        for size in sizes:
            x = torch.randn(size, *sample_shape, generator=generator, dtype=weight.dtype)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            calls: dict[str, Callable[[], object]] = {"dense": functools.partial(layer, x)}
            calls.update({k: functools.partial(m, x) for k, m in sparse.items()})
            for name, seconds in _timed_interleaved(calls, repeats, warmup, statistic).items():
                result[name][size] = 1e3 * seconds
    return result


# ---------------------------------------------------------------------------------------------- conversion
@dataclass
class LayerChoice:
    """What :func:`sparse_inference` decided for one layer, and why."""

    name: str
    """The module's qualified name."""
    layer: str
    """``"Linear"`` or ``"Conv2d 1x1"``."""
    shape: tuple[int, int]
    """The weight as a matrix: ``(out, in)``."""
    sample_shape: tuple[int, ...]
    """One sample's input shape, as seen in the example forward."""
    sparsity: float
    """Fraction of zeros in the weight."""
    kernel: str
    """The kernel it runs with: ``"dense"`` (left as it was) or one of :data:`SPARSE_KERNELS`."""
    reason: str
    """Why."""
    times_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    """Measured ms per kernel and batch size, the fastest of the timed calls (empty when not measured)."""

    @property
    def speedup(self) -> float | None:
        """Geometric mean over batch sizes of dense time / chosen kernel's time (None if not measured)."""
        if not self.times_ms or self.kernel not in self.times_ms:
            return None
        return 1.0 / _score(self.times_ms, self.kernel)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON.

        Example:
            >>> LayerChoice("fc", "Linear", (4, 8), (8,), 0.9, "dense", "not measured").as_dict()["kernel"]
            'dense'
        """
        return {
            "name": self.name,
            "layer": self.layer,
            "shape": list(self.shape),
            "sample_shape": list(self.sample_shape),
            "sparsity": self.sparsity,
            "kernel": self.kernel,
            "reason": self.reason,
            "speedup": self.speedup,
            "times_ms": {k: {str(b): ms for b, ms in v.items()} for k, v in self.times_ms.items()},
        }


def _score(times: dict[str, dict[int, float]], kernel: str) -> float:
    """Geometric mean over batch sizes of ``kernel``'s time over the dense time (below 1: faster)."""
    dense = times["dense"]
    logs = [math.log(times[kernel][b] / dense[b]) for b in dense if dense[b] > 0 and times[kernel][b] > 0]
    return math.exp(sum(logs) / len(logs)) if logs else 1.0


class SparseInference(NamedTuple):
    """The result of :func:`sparse_inference`."""

    model: nn.Module
    """The converted copy, in eval mode."""
    layers: list[LayerChoice]
    """One entry per Linear / 1x1 Conv2d considered, in module order."""

    def converted(self) -> list[LayerChoice]:
        """The layers that now run with a sparse kernel."""
        return [c for c in self.layers if c.kernel != "dense"]

    def table(self) -> str:
        """A plain-text table: layer, shape, sparsity, kernel, speed-up and reason.

        Example:
            >>> choice = LayerChoice("fc", "Linear", (4, 8), (8,), 0.25, "dense", "sparsity 0.25 < min_sparsity 0.5")
            >>> print(SparseInference(nn.Linear(8, 4), [choice]).table())
            layer  type    shape  sparsity  kernel  speed-up  reason
            fc     Linear  4x8      25.00%  dense   -         sparsity 0.25 < min_sparsity 0.5
        """
        rows = [("layer", "type", "shape", "sparsity", "kernel", "speed-up", "reason")]
        for c in self.layers:
            speedup = c.speedup
            rows.append(
                (
                    c.name,
                    c.layer,
                    "x".join(map(str, c.shape)),
                    f"{c.sparsity:.2%}",
                    c.kernel,
                    "-" if speedup is None else f"{speedup:.2f}x",
                    c.reason,
                )
            )
        return text_table(rows, align="lllrlll", rule=False, strip=True)


def _record_inputs(model: nn.Module, inputs: Any, names: Sequence[str]) -> dict[str, Tensor]:
    """The first input tensor each named module gets in one eval forward of ``model``."""
    seen: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            if _name not in seen and args and isinstance(args[0], Tensor):
                seen[_name] = args[0].detach()

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def sparse_inference(
    model: nn.Module,
    example_inputs: Any,
    *,
    kernel: Literal["auto", "torch_csr", "scipy_csr"] = "auto",
    candidates: Sequence[str] = SPARSE_KERNELS,
    batch_sizes: Sequence[int] = (1, 64),
    layers: Sequence[str] | None = None,
    min_sparsity: float = 0.5,
    min_speedup: float = 1.1,
    repeats: int = 15,
    threads: int | None = None,
    rtol: float = 1e-5,
    check_speed: bool = True,
) -> SparseInference:
    """An eval-mode copy of ``model`` whose sparse enough Linear and 1x1 Conv2d layers run with the fastest
    CPU kernel, measured on each layer's own shape; ``model`` itself is not changed.

    For each candidate layer (every ``nn.Linear`` and 1x1 ``nn.Conv2d`` that the forward on ``example_inputs``
    calls, or those ``layers`` names) whose weight is at least ``min_sparsity`` zeros, the dense layer and each
    kernel of ``candidates`` are timed with :func:`measure_kernels` on random inputs shaped like the layer's
    input in the example forward, at every size of ``batch_sizes``. Each kernel's score is the geometric mean
    over batch sizes of its time over the dense time; the lowest wins if it is at least ``min_speedup`` times
    faster than dense, and otherwise the layer stays dense. Times are the fastest of ``repeats`` interleaved
    calls, which stalls on a busy machine do not bias. With ``check_speed``, the converted copy and ``model``
    are then timed end to end at the same batch sizes (on inputs shaped like ``example_inputs``), and if the
    copy is not faster every layer is put back to dense, the reason recorded. Measure with the threads and
    batch sizes you will deploy with, on a quiet machine: the choice is only as good as the measurement.
    ``kernel="torch_csr"`` or ``"scipy_csr"`` skips measuring and converts every candidate layer above
    ``min_sparsity`` to that kernel.

    The copy is then run on ``example_inputs`` against ``model`` (eval mode); if any output differs by more
    than ``rtol`` (L2 norm of the difference over that of ``model``'s output), a ``RuntimeError`` says so. The
    converted layers work at any batch size, under ``torch.inference_mode()``, ``torch.no_grad()`` and
    autograd (the inputs' gradients flow; the sparse weights are buffers, not trained).

    Args:
        model: The pruned network, its pruned weights zero (see
            :func:`~lightning_prune.deploy.archive.check_masks_applied`).
        example_inputs: What ``model``'s forward takes: a tensor, a tuple of arguments or a dict of keyword
            arguments, shaped like real inputs (only their per-sample shapes matter for measuring).
        kernel: ``"auto"`` (measure and choose) or one kernel for every candidate layer.
        candidates: The sparse kernels measured under ``"auto"``.
        batch_sizes: The batch sizes to measure at, e.g. ``(1,)`` for single-sample serving.
        layers: Module-name patterns (``fnmatch``, matching a name or a dotted suffix of it and everything
            under a match) restricting the candidates; None for all.
        min_sparsity: Layers with fewer zeros than this stay dense unmeasured.
        min_speedup: How much faster than dense a kernel must be to be chosen (margin against noise).
        repeats: Timed calls per kernel per batch size.
        threads: ``torch.set_num_threads`` while measuring (None: the current setting).
        rtol: Tolerance of the final check.
        check_speed: Under ``"auto"``, keep the conversion only if the whole copy is faster than ``model``.

    Returns:
        :class:`SparseInference`: the converted copy and one :class:`LayerChoice` per candidate layer.

    Raises:
        ValueError: An argument is out of range; a ``layers`` pattern matches no module, or names a layer that
            has no sparse kernel (a 3x3 convolution, say: the message says why) or that the forward never calls.
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: The converted copy computes something else than ``model`` on ``example_inputs``.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        >>> with torch.no_grad():
        ...     net[0].weight[torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.98] = 0
        >>> from lightning_prune.deploy.sparse_layers import KERNELS
        >>> result = sparse_inference(net, torch.randn(2, 64), batch_sizes=(1, 8), repeats=5)
        >>> [(c.name, c.kernel in KERNELS) for c in result.layers]
        [('0', True), ('2', True)]
        >>> result.layers[1].reason
        'sparsity 0.00 < min_sparsity 0.5'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if kernel != "auto" and kernel not in SPARSE_KERNELS:
        raise ValueError(f"`kernel` must be 'auto' or one of {list(SPARSE_KERNELS)}, got {kernel!r}.")
    chosen_candidates = _check_kernels(candidates)
    sizes = check_batch_sizes(batch_sizes)
    check_int("repeats", repeats, 1)
    if threads is not None:
        check_int("threads", threads, 1)
    for name, value, low, high in (("min_sparsity", min_sparsity, 0.0, 1.0), ("rtol", rtol, 0.0, math.inf)):
        if not is_number(value) or not low <= value <= high:
            raise ValueError(f"`{name}` must be a number in [{low}, {high}], got {value!r}.")
    if not isinstance(check_speed, bool):
        raise TypeError(f"`check_speed` must be True or False, got {check_speed!r}.")
    if not is_number(min_speedup) or not min_speedup > 0:
        raise ValueError(f"`min_speedup` must be a number > 0 (e.g. 1.1: at least 10% faster), got {min_speedup!r}.")
    patterns = _check_patterns(layers)

    converted = copy.deepcopy(model).eval()
    modules = dict(converted.named_modules())
    named: list[tuple[str, nn.Module]] = [
        (n, m) for n, m in modules.items() if n and isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    if patterns is not None:
        named = _select(converted, named, patterns)
    seen = _record_inputs(converted, example_inputs, [n for n, _ in named])
    if patterns is not None:
        never = [n for n, _ in named if n not in seen]
        if never:
            raise ValueError(
                f"`layers` names {never[:5]}, which the forward on `example_inputs` never calls (a layer whose "
                "weights its parent reads directly, as nn.MultiheadAttention's out_proj): nothing to convert."
            )
    choices: list[LayerChoice] = []
    for name, module in named:
        reason = unsupported_reason(module)
        if reason or name not in seen:
            continue  # without a sparse kernel, or not called by the forward: not a candidate
        weight = cast(Tensor, module.weight).detach()
        matrix = (int(weight.shape[0]), int(weight.shape[1]))
        sparsity = 1.0 - int(torch.count_nonzero(weight)) / max(1, weight.numel())
        sample = tuple(seen[name].shape[1:]) if seen[name].dim() > 1 else tuple(seen[name].shape)
        label = "Linear" if isinstance(module, nn.Linear) else "Conv2d 1x1"
        choice = LayerChoice(name, label, matrix, sample, sparsity, "dense", "")
        if sparsity < min_sparsity:
            choice.reason = f"sparsity {sparsity:.2f} < min_sparsity {min_sparsity:g}"
        elif kernel != "auto":
            choice.kernel, choice.reason = kernel, "forced"
        else:
            channels_last = seen[name].dim() == 4 and seen[name].is_contiguous(memory_format=torch.channels_last)
            choice.times_ms = measure_kernels(
                module,
                sample if seen[name].dim() > 1 else sample[-1:],
                sizes,
                chosen_candidates,
                repeats=repeats,
                threads=threads,
                channels_last=channels_last,
                generator=torch.Generator().manual_seed(0),
                statistic="min",
            )
            scores = {k: _score(choice.times_ms, k) for k in chosen_candidates}
            best = min(scores, key=lambda k: scores[k])
            at = ", ".join(map(str, sizes))
            if 1.0 / scores[best] >= min_speedup:
                choice.kernel = best
                choice.reason = f"{1 / scores[best]:.2f}x faster than dense (batch {at})"
            else:
                choice.reason = f"dense is faster: best sparse kernel {best} at {1 / scores[best]:.2f}x (batch {at})"
        if choice.kernel != "dense":
            _set_module(converted, name, to_sparse_layer(module, choice.kernel))
        choices.append(choice)
    if any(c.kernel != "dense" for c in choices):
        _verify(converted, model, example_inputs, rtol, [c.name for c in choices if c.kernel != "dense"])
        if kernel == "auto" and check_speed:
            ratio = _end_to_end(converted, model, example_inputs, sizes, repeats, threads)
            if ratio < 1.0:
                converted = copy.deepcopy(model).eval()
                for c in choices:
                    if c.kernel != "dense":
                        c.reason = f"{c.kernel} chosen, but the converted model ran {ratio:.2f}x end to end: kept dense"
                        c.kernel = "dense"
    return SparseInference(converted, choices)


def _end_to_end(
    converted: nn.Module, model: nn.Module, inputs: Any, sizes: Sequence[int], repeats: int, threads: int | None
) -> float:
    """Geometric mean over batch sizes of ``model``'s time over ``converted``'s (above 1: converted is faster)."""
    logs = []
    with eval_mode(model), num_threads(threads), torch.inference_mode():
        for size in sizes:
            batch = batched(inputs, size)
            calls: dict[str, Callable[[], object]] = {
                "model": functools.partial(forward, model, batch),
                "converted": functools.partial(forward, converted, batch),
            }
            times = _timed_interleaved(calls, repeats, 2, "min")
            logs.append(math.log(times["model"] / times["converted"]))
    return math.exp(sum(logs) / len(logs))


def _check_patterns(layers: Sequence[str] | None) -> list[str] | None:
    if layers is None:
        return None
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"`layers` must be None or a non-empty list of module-name patterns, got {layers!r}.")
    return patterns


def _select(model: nn.Module, named: list[tuple[str, nn.Module]], patterns: list[str]) -> list[tuple[str, nn.Module]]:
    """The layers the patterns select; a pattern naming an unsupported layer, or none at all, is an error."""
    all_names = [n for n, _ in model.named_modules() if n]
    selected: dict[str, nn.Module] = {}
    for pattern in patterns:
        if not any(name_matches(n, pattern) for n in all_names):
            raise ValueError(
                f"`layers` pattern {pattern!r} matches no module of {type(model).__name__}; its Linear and Conv2d "
                f"layers are {[n for n, _ in named][:10]}."
            )
        for name, module in model.named_modules():
            if not name or not matches_own_name(name, pattern) or not hasattr(module, "weight"):
                continue
            reason = unsupported_reason(module)
            if reason:
                raise ValueError(
                    f"`layers` pattern {pattern!r} names {name!r}, which has no sparse kernel: {reason}. Sparse "
                    "inference supports nn.Linear and 1x1 nn.Conv2d (groups=1, zero padding) with float32 or "
                    "float64 weights."
                )
        hits = [(n, m) for n, m in named if name_matches(n, pattern) and not unsupported_reason(m)]
        if not hits:
            raise ValueError(
                f"`layers` pattern {pattern!r} selects no layer with a sparse kernel (nn.Linear or 1x1 nn.Conv2d)."
            )
        selected.update(hits)
    return [(n, m) for n, m in named if n in selected]


def _verify(converted: nn.Module, reference: nn.Module, inputs: Any, rtol: float, names: list[str]) -> None:
    with eval_mode(reference), torch.inference_mode():
        expected = forward(reference, inputs)
    try:
        with torch.inference_mode():
            got = forward(converted, inputs)
    except Exception as err:
        raise RuntimeError(
            f"The model no longer runs with sparse layers {names[:5]}: {type(err).__name__}: {err}. Some code "
            "reads these layers' weights directly; restrict `layers` to layers used only through their forward."
        ) from err
    error = relative_error(got, expected)
    if not error <= rtol:
        raise RuntimeError(
            f"The model with sparse layers {names[:5]} differs from the dense one by {error:.2e} relative (more "
            f"than rtol={rtol:g}) on `example_inputs`."
        )
