"""The tables of a sweep's summary (:func:`lightning_prune.app.sweep.summarize_sweep`): the runs as a markdown
table (:func:`results_table`), the sentence naming their baseline (:func:`baseline_text`) and ``results.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_prune._files import atomic_write_text, write_sidecar
from lightning_prune._helpers import markdown_table

if TYPE_CHECKING:
    from lightning_prune.app.sweep import RunResult

__all__ = ["baseline_text", "common_overrides", "is_language_sweep", "results_table"]


def _format(value: Any, key: str) -> str:
    if value is None:
        return ""
    if key in ("nonzero_params", "total_params", "compact_params"):
        return str(int(value))
    if key in ("macs", "dense_macs"):
        return f"{value / 1e6:.3f}M"
    if key == "wall_time_s":
        return f"{value:.1f}"
    if key == "accuracy_drop":
        return f"{value * 100:+.2f} pp"
    if key == "ppl_increase":
        return f"{value * 100:+.1f}%"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


_MD_COLUMNS = (
    ("job", "job"),
    ("overrides", "overrides"),
    ("status", "status"),
    ("baseline_test_acc", "baseline acc"),
    ("pruned_test_acc", "pruned acc"),
    ("accuracy_drop", "drop"),
    ("sparsity", "sparsity"),
    ("nonzero_params", "nonzero params"),
    ("macs", "MACs"),
    ("wall_time_s", "wall time (s)"),
)
_MD_LANGUAGE_COLUMNS = (
    ("job", "job"),
    ("overrides", "overrides"),
    ("status", "status"),
    ("dense_val_ppl", "dense ppl"),
    ("pruned_val_ppl", "pruned ppl"),
    ("compact_val_ppl", "compact ppl"),
    ("ppl_increase", "ppl change"),
    ("sparsity", "sparsity"),
    ("total_params", "params"),
    ("compact_params", "compact params"),
    ("macs", "MACs"),
    ("wall_time_s", "wall time (s)"),
)


def is_language_sweep(runs: Sequence[RunResult]) -> bool:
    """Whether the runs report perplexity (``module=language``) rather than accuracy: the table and plot show it.

    Example:
        >>> from lightning_prune.app.sweep import RunResult
        >>> is_language_sweep([RunResult("0", [], "completed", {"pruned_val_ppl": 4.1})])
        True
    """
    return any(r.metrics.get("pruned_val_ppl") is not None for r in runs)


def common_overrides(runs: Sequence[RunResult]) -> list[str]:
    """The overrides every run shares, in the first run's order.

    Example:
        >>> from lightning_prune.app.sweep import RunResult
        >>> runs = [RunResult(str(i), [f"pruning.sparsity={s}", "seed=0"], "failed") for i, s in enumerate((0.5, 0.9))]
        >>> common_overrides(runs)
        ['seed=0']
    """
    if not runs:
        return []
    shared = set(runs[0].overrides).intersection(*(r.overrides for r in runs[1:]))
    return [o for o in runs[0].overrides if o in shared]


def results_table(runs: Sequence[RunResult]) -> str:
    """The runs as a markdown table (the one in ``results.md``); overrides all runs share are left out."""
    common = set(common_overrides(runs)) if len(runs) > 1 else set()
    columns = _MD_LANGUAGE_COLUMNS if is_language_sweep(runs) else _MD_COLUMNS
    rows = []
    for run in runs:
        row = run.row()
        row["overrides"] = " ".join(o for o in run.overrides if o not in common)
        rows.append([_format(row[key], key) for key, _ in columns])
    return markdown_table([title for _, title in columns], rows)


def baseline_text(runs: Sequence[RunResult]) -> str:
    """One sentence naming the baseline of the completed runs (grouped by baseline when they differ).

    Example:
        >>> from lightning_prune.app.sweep import RunResult
        >>> run = RunResult("1", [], "completed", {"dense_test_acc": 0.9, "dense_epoch": 10, "pruned_test_acc": 0.8})
        >>> print(baseline_text([run]))  # doctest: +ELLIPSIS
        Baseline: dense snapshot at the start of pruning (epoch 10), not a dense model trained for the same ...
    """
    groups: dict[str, list[str]] = {}
    kinds = set()
    for run in runs:
        baseline = run.dense_baseline if run.status == "completed" else None
        if baseline is not None:
            groups.setdefault(baseline.describe(), []).append(run.job)
            kinds.add(baseline.kind)
    if not groups:
        return "Baseline: none (no completed run recorded a dense accuracy)."
    if len(groups) == 1:
        text = f"Baseline: {next(iter(groups))}"
    else:
        text = "Baselines: " + "; ".join(
            f"{what} for job{'s' if len(jobs) > 1 else ''} {', '.join(jobs)}" for what, jobs in groups.items()
        )
    if "snapshot" in kinds:
        text += (
            ", not a dense model trained for the same schedule; add dense runs to the sweep "
            "(`-m pruning.sparsity=0,...`) to compare with one"
        )
    return text + "."


def _write_markdown(
    runs: Sequence[RunResult], path: Path, sweep_dir: Path, plot_path: Path | None, max_drop: float | None
) -> None:
    counts = {s: sum(r.status == s for r in runs) for s in ("completed", "failed", "incomplete")}
    lines = [
        f"# Sweep results: `{sweep_dir}`",
        "",
        f"{len(runs)} runs: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n) + ".",
        *(
            [
                "Perplexities are on the validation split (dense: before pruning; compact: with the pruned heads",
                "and neurons removed); `ppl change` is pruned over dense perplexity; `sparsity` is the achieved",
                "fraction of the prunable weights.",
            ]
            if is_language_sweep(runs)
            else [
                "Accuracies are top-1 on the test split; `drop` is baseline minus pruned accuracy in percentage "
                "points;",
                "`sparsity` is the achieved fraction of zeros among the prunable weights.",
                baseline_text(runs),
            ]
        ),
    ]
    common = common_overrides(runs)
    if common and len(runs) > 1:
        lines.append(f"Overrides of every run (left out of the table): `{' '.join(common)}`.")
    if max_drop is not None:
        within = [r for r in runs if r.accuracy_drop is not None and r.accuracy_drop <= max_drop + 1e-12]
        best = max(within, key=lambda r: float(r.metrics.get("sparsity", 0.0)), default=None)
        lines.append(
            f"Highest sparsity within a drop of {max_drop * 100:.2f} pp: "
            + (f"{best.metrics['sparsity']:.4f} (job {best.job})." if best else "none.")
        )
    lines += ["", results_table(runs)]
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- job {r.job} (`{' '.join(r.overrides)}`): {r.error}" for r in failed]
    if plot_path is not None:
        lines += ["", f"![accuracy against sparsity]({plot_path.name})"]
    atomic_write_text(path, "\n".join(lines) + "\n")
    write_sidecar(path)
