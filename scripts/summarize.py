"""Rebuild a sweep's summary: ``python scripts/summarize.py <sweep_dir> [--max-accuracy-drop 0.01] [--no-plot]``.

Writes ``results.csv``, ``results.md`` and ``accuracy_vs_sparsity.png`` into the sweep directory from its runs'
``metrics.json`` and ``failure.json`` (see ``lightning_prune.app.sweep.summarize_sweep``) and prints the table.
Exits with status 2, naming the directory and what it should hold, when it holds no run results.
"""

import argparse
import sys
from pathlib import Path

from lightning_prune.app.sweep import SweepResultsError, results_table, summarize_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (hydra.sweep.dir), e.g. multirun/train/<date>")
    parser.add_argument(
        "--max-accuracy-drop", type=float, default=None, help="name the highest sparsity within this accuracy drop"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    args = parser.parse_args(argv)
    try:
        summary = summarize_sweep(args.sweep_dir, max_accuracy_drop=args.max_accuracy_drop, plot=not args.no_plot)
    except SweepResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(results_table(summary.runs))
    for run in summary.failed:
        print(f"job {run.job} failed: {run.error}")
    print(f"\n{len(summary.completed)}/{len(summary.runs)} runs completed")
    print(f"wrote {summary.csv_path} and {summary.markdown_path}")
    if summary.plot_path is not None:
        print(f"plot: {summary.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
