"""Wall time of a 5-point sparsity sweep of the main job plus its dense run, two runs at a time, and its results
table.

    .venv/bin/python benchmarks/sweep.py                       # sparsity 0 (the baseline), 0.5, 0.7, 0.8, 0.9, 0.95
    .venv/bin/python benchmarks/sweep.py --sparsities 0.5 0.9  # other points
    .venv/bin/python benchmarks/sweep.py model=mlp             # any extra Hydra overrides

Runs ``scripts/train.py -m pruning.sparsity=... hydra/launcher=parallel hydra/callbacks=summary`` once, as a
user would: the main job (conf/config.yaml: SmallCNN on the 8x8 digits, 30 epochs, cubic magnitude pruning in
epochs 10-20) at each sparsity, on the joblib launcher with 2 worker processes of one torch thread each. The
wall time is that of the whole command, Python start-up and the summary included. The sweep directory (a
temporary one unless ``--sweep-dir`` is given) keeps every run and the summary: results.csv, results.md and
accuracy_vs_sparsity.png, written by ``lightning_prune.app.sweep.SweepSummaryCallback``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import OtherLoad, environment

ROOT = Path(__file__).resolve().parents[1]
# 0: the dense run of the same schedule, the baseline the summary compares the others with.
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--n-jobs", type=int, default=2, help="parallel runs (joblib workers)")
    parser.add_argument("--sweep-dir", type=Path, default=None, help="keep the sweep here (default: temporary)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model=mlp")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        sweep_dir = (args.sweep_dir or Path(tmp) / "sweep").resolve()
        command = [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "-m",
            f"pruning.sparsity={','.join(str(s) for s in args.sparsities)}",
            "hydra/launcher=parallel",
            f"hydra.launcher.n_jobs={args.n_jobs}",
            "hydra/callbacks=summary",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep_dir}",
            *args.overrides,
        ]
        # joblib caps each worker's torch threads at cpu_count // n_jobs.
        threads = max(1, (os.cpu_count() or 1) // args.n_jobs)
        print(environment({"sweep": f"{len(args.sparsities)} runs, joblib launcher, n_jobs={args.n_jobs}"}, threads))
        print("command:  ", " ".join(command[1:]), flush=True)
        start = time.perf_counter()
        with OtherLoad() as load:
            result = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-5000:], sep="\n", file=sys.stderr)
        table = (sweep_dir / "results.md").read_text() if (sweep_dir / "results.md").is_file() else "(no summary)"
        print(
            f"\nwall time: {wall:.1f} s for {len(args.sparsities)} runs (exit status {result.returncode}); "
            f"other processes used {load.cores:.2f} cores on average meanwhile\n"
        )
        print(table)
        if args.sweep_dir is not None:
            print(f"plot: {sweep_dir / 'accuracy_vs_sparsity.png'}")
        else:
            print("(temporary sweep directory removed; pass --sweep-dir to keep the runs, CSV and plot)")
        if result.returncode != 0:
            sys.exit(result.returncode)


if __name__ == "__main__":
    main()
