"""The plots of a sweep's summary (:func:`lightning_prune.app.sweep.summarize_sweep`): test accuracy against
sparsity with the baseline it is compared with, or, for language-model runs, validation perplexity against sparsity.

Both return a matplotlib ``Figure`` built without pyplot (no global backend or figure registry is touched), so a
caller can inspect or save it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_prune.app.baselines import is_dense_run

if TYPE_CHECKING:
    from lightning_prune.app.sweep import RunResult


def _figure() -> tuple[Any, Any]:
    """A new ``Figure`` of the summary's size and its one ``Axes``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is in the `sweep` extra
        raise ImportError("The sweep plot needs matplotlib: `pip install 'lightning-prune[sweep]'`.") from e
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    return fig, fig.subplots()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def accuracy_figure(runs: Sequence[RunResult], max_drop: float | None = None) -> Any:
    """The accuracy-against-sparsity plot as a matplotlib ``Figure`` (what ``accuracy_vs_sparsity.png`` shows).

    The pruned runs' test accuracies against their achieved sparsities, and the baseline as a horizontal line
    that its legend entry and the title name: the dense runs of the same schedule, dashed (their range shaded
    when they differ), or, for runs without one in the sweep, the dense snapshot at the start of pruning,
    dotted. With ``max_drop``, the accuracy bound below the baseline in red.

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> from lightning_prune.app.sweep import RunResult
        >>> runs = [RunResult("0", [], "completed", {"target_sparsity": 0.9, "sparsity": 0.9,
        ...                   "pruned_test_acc": 0.9, "dense_test_acc": 0.95, "dense_epoch": 10})]
        >>> [t.get_text() for t in accuracy_figure(runs).axes[0].get_legend().get_texts()]
        ['pruned', 'dense snapshot at the start of pruning (epoch 10)']
    """
    completed = [r for r in runs if r.status == "completed"]
    pruned = [r for r in completed if not is_dense_run(r)]
    points = sorted(
        (float(r.metrics["sparsity"]), float(r.metrics["pruned_test_acc"]))
        for r in pruned
        if r.metrics.get("sparsity") is not None and r.metrics.get("pruned_test_acc") is not None
    )
    baselines = [b for b in (r.dense_baseline for r in pruned or completed) if b is not None]
    # The dense runs' own accuracies (each once), and the snapshots of the runs that found no dense run.
    jobs = sorted({job for b in baselines if b.kind == "dense_runs" for job in b.jobs})
    dense = [float(r.metrics["pruned_test_acc"]) for r in completed if r.job in jobs]
    snapshots = [b for b in baselines if b.kind == "snapshot"]
    fig, ax = _figure()
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, [100 * y for y in ys], marker="o", label="pruned")
    lines: list[tuple[float, str]] = []  # (accuracy, name) of each baseline drawn, the main one first
    if dense:
        name = "dense, same schedule" + (f" (mean of {len(dense)} runs)" if len(dense) > 1 else " (1 run)")
        ax.axhline(100 * _mean(dense), color="black", linestyle="--", linewidth=1, label=name)
        if len(set(dense)) > 1:
            ax.axhspan(100 * min(dense), 100 * max(dense), color="black", alpha=0.08, linewidth=0)
        lines.append((_mean(dense), "dense runs of the same schedule"))
    if snapshots:
        epochs = sorted({b.epoch for b in snapshots if b.epoch is not None})
        if not epochs:
            when = "epoch not recorded"
        else:
            when = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"
        accuracies = [b.accuracy for b in snapshots]
        mean = f", mean of {len(accuracies)} runs" if len(set(accuracies)) > 1 else ""
        name = f"dense snapshot at the start of pruning ({when}{mean})"
        ax.axhline(100 * _mean(accuracies), color="dimgray", linestyle=":", linewidth=1.2, label=name)
        if len(set(accuracies)) > 1 and not dense:
            ax.axhspan(100 * min(accuracies), 100 * max(accuracies), color="black", alpha=0.08, linewidth=0)
        lines.append((_mean(accuracies), f"dense snapshot at the start of pruning ({when}), not the same schedule"))
    if lines and max_drop is not None:
        ax.axhline(
            100 * (lines[0][0] - max_drop), color="tab:red", linestyle=":", label=f"baseline - {100 * max_drop:.2f} pp"
        )
    not_shown = len(runs) - len(points) - len([r for r in completed if is_dense_run(r)])
    title = "Test accuracy against sparsity" + (f" ({not_shown} runs not shown)" if not_shown else "")
    if lines:
        title += "\nbaseline: " + lines[0][1] + (" (some runs: " + lines[1][1] + ")" if len(lines) > 1 else "")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("sparsity (fraction of zero weights)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    if points or lines:
        ax.legend(loc="lower left", fontsize="small")
    return fig


def perplexity_figure(runs: Sequence[RunResult]) -> Any:
    """The language-model runs' validation perplexity against their achieved sparsity as a matplotlib ``Figure``,
    with the dense perplexity (each run's snapshot at the start of pruning; their mean) as a dashed line.

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> from lightning_prune.app.sweep import RunResult
        >>> runs = [RunResult("0", [], "completed", {"sparsity": 0.26, "pruned_val_ppl": 4.3, "dense_val_ppl": 4.0})]
        >>> [t.get_text() for t in perplexity_figure(runs).axes[0].get_legend().get_texts()]
        ['pruned', 'dense, at the start of pruning']
    """
    completed = [r for r in runs if r.status == "completed"]
    points = sorted(
        (float(r.metrics["sparsity"]), float(r.metrics["pruned_val_ppl"]))
        for r in completed
        if r.metrics.get("sparsity") is not None and r.metrics.get("pruned_val_ppl") is not None
    )
    dense = [float(r.metrics["dense_val_ppl"]) for r in completed if r.metrics.get("dense_val_ppl") is not None]
    fig, ax = _figure()
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label="pruned")
    if dense:
        name = "dense, at the start of pruning" + (f" (mean of {len(dense)} runs)" if len(set(dense)) > 1 else "")
        ax.axhline(_mean(dense), color="black", linestyle="--", linewidth=1, label=name)
        if len(set(dense)) > 1:
            ax.axhspan(min(dense), max(dense), color="black", alpha=0.08, linewidth=0)
    not_shown = len(runs) - len(points)
    ax.set_title("Validation perplexity against sparsity" + (f" ({not_shown} runs not shown)" if not_shown else ""))
    ax.set_xlabel("sparsity (fraction of the prunable weights)")
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.grid(True, alpha=0.3)
    if points or dense:
        ax.legend(loc="upper left", fontsize="small")
    return fig
