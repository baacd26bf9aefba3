"""Soak run: the main job under DDP, killed three times at random points and resumed, against an uninterrupted run.

    .venv/bin/python benchmarks/soak.py [--epochs 30] [--kills 3] [--devices 2] [--seed 0] [--quick]

Both runs are ``scripts/train.py trainer=ddp_cpu callbacks=invariants`` (the default experiment: the digits CNN,
cubic magnitude pruning to 90% over epochs 10-20, fine-tuning to the last epoch; two processes over gloo, each with
``data.batch_size`` 64; ``<run dir>/checkpoints/last.ckpt`` written atomically at every epoch's end). The
interrupted run is started with ``ckpt_path=last``; at a random moment of each attempt (uniform over what is left of
the run, from a seeded generator) its whole process group (launcher and both ranks) gets SIGKILL, and the same
command is started again, which resumes from the newest checkpoint. The checker of ``callbacks=invariants`` verifies
after every batch, on every rank, that pruned entries and their optimizer state are exactly zero, that masks only
grow, that exactly the scheduled number of weights is pruned, and that the ranks hold bit-identical masks and
weights; each attempt logs its own count as ``invariants/checks`` at every epoch's end, and the table sums them.

The table compares the two runs' final sparsity, dense and pruned test accuracy, and whether their final
checkpoints hold bit-identical weights and masks. Wall times are context only (the machine is shared).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def command(run_dir: Path, args: argparse.Namespace, resume: bool) -> list[str]:
    overrides = [
        "trainer=ddp_cpu",
        f"trainer.devices={args.devices}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
        "callbacks=invariants",
        "logger.flush_logs_every_n_steps=1",  # a killed attempt keeps what it logged
        f"seed={args.seed}",
        f"output_dir={run_dir}",
        f"hydra.run.dir={run_dir}/hydra",
    ]
    if args.quick:
        overrides += ["pruning.start_epoch=2", "pruning.end_epoch=4"]
    if resume:
        overrides.append("ckpt_path=last")
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides]


def start(run_dir: Path, args: argparse.Namespace, resume: bool, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            command(run_dir, args, resume), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


class CheckpointWatch:
    """Counts the rewrites of a run's ``checkpoints/last.ckpt`` (one per finished epoch) and when they happened."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "checkpoints" / "last.ckpt"
        self.seen: int | None = None
        self.times: list[float] = []

    def refresh(self) -> bool:
        mtime = self.path.stat().st_mtime_ns if self.path.exists() else None
        if mtime == self.seen:
            return False
        self.seen = mtime
        self.times.append(time.perf_counter())
        return True

    def follow(self, proc: subprocess.Popen, until: int | None = None) -> None:
        """Poll while ``proc`` runs; return early, ``proc`` still running, once ``until`` rewrites were counted."""
        while proc.poll() is None and (until is None or len(self.times) < until):
            time.sleep(0.05)
            self.refresh()
        self.refresh()


def checks_logged(run_dir: Path) -> list[int]:
    """``invariants/checks`` at the last logged epoch of each attempt (one CSV version per start), on rank 0: the
    checks of each process up to its last epoch end (those of a killed attempt's unfinished epoch are not counted)."""
    counts = []
    for metrics in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(metrics) as f:
            values = [float(r["invariants/checks"]) for r in csv.DictReader(f) if r.get("invariants/checks")]
        counts.append(int(values[-1]) if values else 0)
    return counts


def final_state(run_dir: Path) -> tuple[dict, dict]:
    import torch

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (pruning_key,) = [k for k in state["callbacks"] if k.startswith("PruningCallback")]
    return state["state_dict"], state["callbacks"][pruning_key]["masks"]


def identical(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed and the kill times' generator's")
    parser.add_argument("--quick", action="store_true", help="6 epochs, pruning over epochs 2-4, one kill")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.kills = 6, 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(environment({"benchmark": f"soak: {args.epochs} epochs, DDP x{args.devices} (gloo), {args.kills} kills"}))
    rng = random.Random(args.seed)

    uninterrupted = workdir / "uninterrupted"
    shutil.rmtree(uninterrupted, ignore_errors=True)
    began = time.perf_counter()
    proc = start(uninterrupted, args, resume=False, log=workdir / "uninterrupted.log")
    watch = CheckpointWatch(uninterrupted)
    watch.follow(proc)
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed; see {workdir / 'uninterrupted.log'}")
    full_time = time.perf_counter() - began
    epoch_time = (watch.times[-1] - watch.times[0]) / max(1, len(watch.times) - 1)
    print(f"uninterrupted run: {full_time:.1f} s, {epoch_time:.2f} s per epoch")

    # Kill points: distinct random epochs, each at a random fraction of the epoch.
    epochs = sorted(rng.sample(range(1, args.epochs), k=min(args.kills, args.epochs - 1)))
    points = [(epoch, rng.random()) for epoch in epochs]
    interrupted = workdir / "interrupted"
    shutil.rmtree(interrupted, ignore_errors=True)
    kills: list[str] = []
    watch = CheckpointWatch(interrupted)
    began = time.perf_counter()
    while True:
        proc = start(interrupted, args, resume=True, log=workdir / "interrupted.log")
        if points:
            epoch, fraction = points.pop(0)
            # Wait until epoch `epoch` starts (the checkpoint of the epoch before it is written), then part of it.
            watch.follow(proc, until=epoch)
            if proc.poll() is None:
                time.sleep(fraction * epoch_time)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                watch.refresh()
                kills.append(
                    f"attempt {len(kills) + 1}: in epoch {epoch}, about {fraction:.0%} through it "
                    f"({len(watch.times)} epochs checkpointed)"
                )
                print(f"killed: {kills[-1]}")
                continue
        if proc.wait() != 0:
            raise SystemExit(f"the interrupted run failed; see {workdir / 'interrupted.log'}")
        break
    interrupted_time = time.perf_counter() - began

    metrics = {
        name: json.loads((workdir / name / "metrics.json").read_text()) for name in ("uninterrupted", "interrupted")
    }
    weights_a, masks_a = final_state(uninterrupted)
    weights_b, masks_b = final_state(interrupted)
    checks = {name: checks_logged(workdir / name) for name in ("uninterrupted", "interrupted")}
    print("\nkills:\n  " + "\n  ".join(kills or ["none"]))
    print(f"invariant checks logged per segment (rank 0): {checks}")
    same = {"weights": identical(weights_a, weights_b), "masks": identical(masks_a, masks_b)}
    rows = []
    for name, wall in (("uninterrupted", full_time), ("interrupted", interrupted_time)):
        m = metrics[name]
        reference = name == "uninterrupted"
        rows.append(
            [
                name,
                len(checks[name]),
                f"{m['sparsity']:.4f}",
                f"{m['dense_test_acc']:.4f}",
                f"{m['pruned_test_acc']:.4f}",
                "(reference)" if reference else ("yes" if same["weights"] else "NO"),
                "(reference)" if reference else ("yes" if same["masks"] else "NO"),
                sum(checks[name]),
                f"{wall:.0f}",
            ]
        )
    print()
    header = [
        "run",
        "starts",
        "sparsity",
        "dense test acc",
        "pruned test acc",
        "final weights bit-identical",
        "masks bit-identical",
        "invariant checks (rank 0)",
        "wall s",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
