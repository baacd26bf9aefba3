"""Model statistics: multiply-accumulates (MACs), parameters and latency of one forward pass.

A pruned weight that is exactly zero costs nothing on hardware or kernels that skip zeros; :func:`count_macs`
counts what such a kernel would do. Only Linear and Conv layers are counted (biases, norms, activations and
pooling are left out, as in most MAC counts). :func:`count_flop_macs` counts what dense kernels do, with
PyTorch's own FLOP counter, which also covers matrix products outside modules. :func:`profile_model`
gathers parameters, MACs and latency, and :func:`compare_profiles` lays two profiles side by side, e.g.
before and after channel pruning and compaction.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(4, 3)
    >>> with torch.no_grad():
    ...     net.weight[0] = 0.0
    >>> count_macs(net, torch.zeros(1, 4))
    MacCount(macs=8, dense_macs=12)
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune._helpers import check_int, eval_mode, is_int, num_threads, text_table, time_call
from lightning_prune.deploy.timing import TimingVerdict, judge_timing, time_side_by_side, warn_if_slower

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MacCount(NamedTuple):
    """MACs of one forward pass, per sample."""

    macs: int
    """Counting only nonzero weights."""
    dense_macs: int
    """Counting every weight."""


def count_macs(model: nn.Module, example: torch.Tensor) -> MacCount:
    """Multiply-accumulates of ``model(example)`` per sample, with forward hooks on Linear and Conv layers.

    A convolution's weight is applied once per output position, so it costs (nonzero) weights x output spatial
    size (e.g. ``H_out * W_out``); grouped and depthwise convolutions are covered since each weight sees
    one input channel. A linear layer costs its (nonzero) weights once per input row: once for ``(batch,
    features)`` inputs, once per token for ``(batch, tokens, features)``. The model runs in eval mode under
    ``torch.no_grad()``; its training mode is restored afterwards.

    Args:
        model: The network.
        example: One input batch; the counts are divided by its first dimension (the batch size).

    Returns:
        ``MacCount(macs, dense_macs)``.

    Example:
        >>> conv = nn.Conv2d(1, 2, kernel_size=3, padding=1)  # 18 weights, 8x8 output positions
        >>> count_macs(conv, torch.zeros(2, 1, 8, 8)).dense_macs
        1152
    """
    if example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(f"`example` must be a batch with at least one sample, got shape {tuple(example.shape)}.")
    batch = example.shape[0]
    totals = [0, 0]

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        weight = cast(torch.Tensor, module.weight)
        nonzero, dense = int(torch.count_nonzero(weight)), weight.numel()
        # Conv: once per output position of (batch, channels, *spatial); Linear: once per row of the leading dims.
        uses = math.prod(output.shape[2:]) if isinstance(module, _CONVS) else math.prod(output.shape[:-1]) // batch
        totals[0] += nonzero * uses
        totals[1] += dense * uses

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, *_CONVS))]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return MacCount(macs=totals[0], dense_macs=totals[1])


def _check_batch(example: object) -> torch.Tensor:
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"`example` must be a tensor (one input batch), got {type(example).__name__}.")
    if example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(f"`example` must be a batch with at least one sample, got shape {tuple(example.shape)}.")
    return example


def count_flop_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates per sample of one eval forward of ``model(example)``, every weight counted.

    Counted with PyTorch's ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per
    multiply-accumulate of matrix products and convolutions (``mm``, ``addmm``, ``bmm``, convolution,
    attention; not norms, activations or pooling); this returns its total divided by 2, that is MACs, and by
    the batch size. Zero weights count like any other (see :func:`count_macs` for a zero-skipping count).
    The model runs in eval mode under ``torch.no_grad()``; each module's training mode is restored.

    Args:
        model: The network.
        example: One input batch; the count is divided by its first dimension.

    Returns:
        MACs per sample.

    Example:
        >>> count_flop_macs(nn.Conv2d(1, 2, kernel_size=3, padding=1), torch.zeros(2, 1, 8, 8))  # 18 x 8 x 8
        1152
    """
    example = _check_batch(example)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(example)
    return counter.get_total_flops() // (2 * example.shape[0])


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries of ``model`` (shared parameters once; buffers not included).

    Example:
        >>> count_parameters(nn.Linear(4, 3))  # 12 weights + 3 biases
        15
    """
    return sum(p.numel() for p in model.parameters())


def measure_latency(
    model: nn.Module,
    example: torch.Tensor,
    *,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> float:
    """Median wall time in seconds of ``model(example)`` in eval mode under ``torch.inference_mode()``.

    ``warmup`` untimed forwards come first (first calls allocate and pick kernels), then ``repeats`` timed
    ones. Each module's training mode and torch's intra-op thread count are restored afterwards. The median
    resists the stalls a shared machine causes; to compare two models, alternate their measurements (see
    ``benchmarks/compaction.py``) rather than trusting one pair of absolute times.

    Args:
        model: The network.
        example: The input batch.
        repeats: Timed forwards, at least 1.
        warmup: Untimed forwards before them, at least 0.
        threads: ``torch.set_num_threads`` during the measurement; ``None`` keeps the current setting.

    Returns:
        Median seconds per forward.

    Example:
        >>> seconds = measure_latency(nn.Linear(8, 8), torch.zeros(4, 8), repeats=5, warmup=1, threads=1)
        >>> 0.0 < seconds < 1.0
        True
    """
    example = _check_batch(example)
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ValueError(f"`threads` must be None (keep torch's setting) or an integer >= 1, got {threads!r}.")
    run = functools.partial(model, example)
    with num_threads(threads), eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            run()
        times = [time_call(run) for _ in range(repeats)]
    return statistics.median(times)


class ModelProfile(NamedTuple):
    """Size and speed of a network, as :func:`profile_model` measures them."""

    params: int
    """Parameter entries (:func:`count_parameters`)."""
    macs: int
    """Multiply-accumulates per sample (:func:`count_flop_macs`)."""
    latency_ms: Mapping[int, float]
    """Median milliseconds per forward, by batch size."""

    def as_dict(self) -> dict[str, float]:
        """Flat figures for a logger: ``params``, ``macs`` and ``latency_b<batch>_ms`` per batch size.

        Example:
            >>> ModelProfile(params=10, macs=40, latency_ms={1: 0.5}).as_dict()
            {'params': 10, 'macs': 40, 'latency_b1_ms': 0.5}
        """
        figures: dict[str, float] = {"params": self.params, "macs": self.macs}
        figures.update({f"latency_b{size}_ms": ms for size, ms in self.latency_ms.items()})
        return figures


def profile_model(
    model: nn.Module,
    example: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64),
    *,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> ModelProfile:
    """Parameters, MACs per sample and latency at each batch size of ``model``.

    The batches repeat the first sample of ``example`` (so one sample is enough). Latency is
    :func:`measure_latency`'s median in milliseconds.

    Args:
        model: The network.
        example: A batch whose first sample is the input to measure with.
        batch_sizes: Batch sizes to time, each at least 1; empty to skip timing.
        repeats: Timed forwards per batch size.
        warmup: Untimed forwards before them.
        threads: ``torch.set_num_threads`` while timing; ``None`` keeps the current setting.

    Returns:
        A :class:`ModelProfile`.

    Example:
        >>> profile = profile_model(nn.Linear(8, 4), torch.zeros(1, 8), batch_sizes=(1, 16), repeats=3)
        >>> profile.params, profile.macs, sorted(profile.latency_ms)
        (36, 32, [1, 16])
    """
    sample = _check_batch(example)[:1]
    sizes = tuple(batch_sizes)
    if not all(is_int(b) and b >= 1 for b in sizes):
        raise ValueError(f"`batch_sizes` must be integers >= 1, e.g. (1, 64), got {batch_sizes!r}.")
    latency = {}
    for size in sizes:
        batch = sample.expand(size, *sample.shape[1:]).contiguous()
        latency[size] = 1e3 * measure_latency(model, batch, repeats=repeats, warmup=warmup, threads=threads)
    return ModelProfile(params=count_parameters(model), macs=count_flop_macs(model, sample), latency_ms=latency)


def compare_profiles(
    before: ModelProfile,
    after: ModelProfile,
    *,
    labels: tuple[str, str] = ("before", "after"),
    title: str | None = None,
    verdicts: Mapping[int, TimingVerdict] | None = None,
) -> str:
    """A plain-text table of two profiles with the ratio ``before / after`` of each figure.

    Rows: parameters, MACs per sample, and latency at each batch size both profiles measured. A ratio above 1
    means ``after`` is smaller or faster.

    Args:
        before: The reference, e.g. the dense model.
        after: The model compared with it, e.g. the pruned and compacted one.
        labels: Column titles for the two.
        title: A line to put above the table.
        verdicts: For each batch size timed side by side, :func:`~lightning_prune.deploy.timing.judge_timing`'s
            verdict: its median per-block ratio is printed, or "unstable (machine busy)" instead of any ratio.

    Returns:
        The table (after ``title``, if any), lines joined with newlines, without a trailing newline.

    Example:
        >>> dense = ModelProfile(params=272_474, macs=40_813_184, latency_ms={1: 2.9, 64: 40.7})
        >>> small = ModelProfile(params=68_000, macs=10_300_000, latency_ms={1: 1.4, 64: 12.5})
        >>> print(compare_profiles(dense, small, labels=("dense", "pruned")))
                          dense      pruned  dense/pruned
        params          272,474      68,000         4.01x
        MACs         40,813,184  10,300,000         3.96x
        latency b1      2.90 ms     1.40 ms         2.07x
        latency b64    40.70 ms    12.50 ms         3.26x
    """
    for name, profile in (("before", before), ("after", after)):
        if not isinstance(profile, ModelProfile):
            raise TypeError(f"`{name}` must be a ModelProfile (from profile_model), got {type(profile).__name__}.")
    if len(labels) != 2 or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"`labels` must be two strings, e.g. ('dense', 'pruned'), got {labels!r}.")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"`title` must be a string or None, got {type(title).__name__}.")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "-"

    rows = [
        ("params", f"{before.params:,}", f"{after.params:,}", ratio(before.params, after.params)),
        ("MACs", f"{before.macs:,}", f"{after.macs:,}", ratio(before.macs, after.macs)),
    ]
    for size in (b for b in before.latency_ms if b in after.latency_ms):
        a, b = before.latency_ms[size], after.latency_ms[size]
        verdict = (verdicts or {}).get(size)
        rows.append((f"latency b{size}", f"{a:.2f} ms", f"{b:.2f} ms", verdict.text() if verdict else ratio(a, b)))
    header = ("", labels[0], labels[1], f"{labels[0]}/{labels[1]}")
    return text_table([header, *rows], title, rule=False, strip=True)


def compaction_report(
    masked: nn.Module,
    small: nn.Module,
    example: Any,
    *,
    latency: bool = True,
    blocks: int = 5,
    repeats: int = 10,
) -> tuple[dict[str, float], str]:
    """Parameters, MACs and CPU latency of a masked model and its compact copy, as figures and as a table.

    Both are timed on the CPU (a copy of ``masked`` when it lives on an accelerator), side by side in ``blocks``
    alternating blocks: batch 1 on one thread (where a busy machine does least harm) and batch 64 on torch's
    current threads. The ratio is the median of the per-block ratios; when other processes kept the cores busy or
    the blocks disagree (:func:`~lightning_prune.deploy.timing.judge_timing`), the table prints
    "unstable (machine busy)" instead, and a stable slow-down of the compact copy is warned about. MACs and
    latency need a single input tensor to repeat; for other inputs only the parameters are counted.

    Args:
        masked: the model as training left it (pruned channels masked, full width).
        small: its compact copy (:func:`lightning_prune.deploy.compact`).
        example: inputs of ``masked``; a tensor's first sample is repeated to batches of 1 and 64.
        latency: time both at batch 1 and 64.
        blocks: timed blocks per batch size, at least 1.
        repeats: forwards of each model per block, at least 1.

    Returns:
        ``{"compact/<figure>_before": value, "compact/<figure>_after": value}`` for each figure of
        :meth:`ModelProfile.as_dict` (latencies are the medians over the blocks), plus
        ``compact/latency_b<batch>_stable`` (1.0 or 0.0), and :func:`compare_profiles`'s table.

    Example:
        >>> figures, text = compaction_report(nn.Linear(8, 4), nn.Linear(8, 2), torch.zeros(1, 8), latency=False)
        >>> figures["compact/params_before"], figures["compact/params_after"]
        (36, 18)
    """
    check_int("blocks", blocks, 1)
    check_int("repeats", repeats, 1)
    small = small.cpu()
    verdicts: dict[int, TimingVerdict] = {}
    if isinstance(example, torch.Tensor):
        on_cpu = all(p.device.type == "cpu" for p in masked.parameters())
        masked = masked if on_cpu else copy.deepcopy(masked).cpu()
        sample = example[:1].cpu()
        before = profile_model(masked, sample, batch_sizes=())
        after = profile_model(small, sample, batch_sizes=())
        times: tuple[dict[int, float], dict[int, float]] = ({}, {})
        if latency:
            for size, threads in ((1, 1), (64, None)):
                batch = sample.expand(size, *sample.shape[1:]).contiguous()
                calls = [functools.partial(masked, batch), functools.partial(small, batch)]
                with num_threads(threads), eval_mode(masked), eval_mode(small), torch.inference_mode():
                    medians, per_block, load = time_side_by_side(calls, blocks=blocks, repeats=repeats)
                times[0][size], times[1][size] = 1e3 * medians[0], 1e3 * medians[1]
                verdicts[size] = judge_timing([a / b for a, b in per_block], load)
                warn_if_slower(verdicts[size], f"The compact model at batch {size}")
        before, after = before._replace(latency_ms=times[0]), after._replace(latency_ms=times[1])
    else:
        before = ModelProfile(count_parameters(masked), 0, {})
        after = ModelProfile(count_parameters(small), 0, {})
    text = compare_profiles(
        before, after, labels=("masked", "compact"), title="Compaction (MACs = FLOPs / 2)", verdicts=verdicts
    )
    if verdicts:
        text += (
            f"\n(latency: median of {blocks} blocks alternating, {repeats} calls each; b1 on 1 thread, b64 on "
            f"{torch.get_num_threads()}; ratio: median of per-block ratios)"
        )
        text += "".join(f"\nb{b} unstable: {v.reason}" for b, v in verdicts.items() if not v.stable)
    figures = {f"compact/{key}_before": value for key, value in before.as_dict().items()}
    figures.update({f"compact/{key}_after": value for key, value in after.as_dict().items()})
    figures.update({f"compact/latency_b{b}_stable": float(v.stable) for b, v in verdicts.items()})
    return figures, text
