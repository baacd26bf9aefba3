"""DDP against one process with the same global batch: the main job's sparsity and accuracy, seed by seed.

    .venv/bin/python benchmarks/ddp.py [--seeds 0 1 2] [--devices 2] [--quick]

For each seed, ``scripts/train.py`` runs the main job (the digits CNN, cubic magnitude pruning to 90% over epochs
10-20, fine-tuning to epoch 29) twice: under ``trainer=ddp_cpu`` with ``--devices`` processes of
``data.batch_size=64`` each, and in one process with ``data.batch_size=64 * devices``, the same global batch and
learning rate. Both runs see the same data in the same epoch order (the distributed sampler splits each global
batch between the ranks), so they differ only in the order in which the gradients are summed and in the
BatchNorm statistics, which are per process under DDP on the CPU (PyTorch's SyncBatchNorm needs GPUs). The
table gives each pair and the mean and spread of the paired differences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, markdown_table, mean_std

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, seed: int, devices: int, batch_size: int, quick: bool) -> dict:
    """One run of the main job; its metrics.json plus its wall time."""
    overrides = [f"seed={seed}", f"output_dir={out}", f"hydra.run.dir={out}/hydra", "trainer.enable_progress_bar=false"]
    overrides.append(f"data.batch_size={batch_size}")
    if devices > 1:
        overrides += ["trainer=ddp_cpu", f"trainer.devices={devices}"]
    if quick:
        overrides += ["trainer.max_epochs=6", "pruning.start_epoch=2", "pruning.end_epoch=4"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(overrides)}):\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall"] = time.perf_counter() - began
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="6 epochs, pruning over epochs 2-4, seed 0 only")
    args = parser.parse_args()
    seeds = [0] if args.quick else args.seeds
    print(
        environment(
            {"benchmark": f"DDP x{args.devices} (gloo, batch 64 each) against 1 process (batch {64 * args.devices})"}
        )
    )
    work = Path(tempfile.mkdtemp(prefix="ddp-"))
    rows, diffs = [], {"sparsity": [], "dense": [], "pruned": []}
    for seed in seeds:
        ddp = run(work / f"ddp-{seed}", seed, args.devices, 64, args.quick)
        one = run(work / f"one-{seed}", seed, 1, 64 * args.devices, args.quick)
        for key, field in (("sparsity", "sparsity"), ("dense", "dense_test_acc"), ("pruned", "pruned_test_acc")):
            diffs[key].append(ddp[field] - one[field])
        rows.append(
            [
                seed,
                f"{ddp['sparsity']:.4f} / {one['sparsity']:.4f}",
                f"{ddp['dense_test_acc']:.4f} / {one['dense_test_acc']:.4f}",
                f"{ddp['pruned_test_acc']:.4f} / {one['pruned_test_acc']:.4f}",
                f"{100 * (ddp['pruned_test_acc'] - one['pruned_test_acc']):+.2f}",
                f"{ddp['wall']:.0f} / {one['wall']:.0f}",
            ]
        )
        print(f"seed {seed}: done")

    rows.append(
        [
            "DDP - one, mean ± std",
            mean_std(diffs["sparsity"], signed=True),
            f"{mean_std(diffs['dense'], 100, signed=True)} pp",
            f"{mean_std(diffs['pruned'], 100, signed=True)} pp",
            "",
            "",
        ]
    )
    print()
    header = [
        "seed",
        "sparsity DDP / one",
        "dense test acc DDP / one",
        "pruned test acc DDP / one",
        "pruned DDP - one (pp)",
        "wall s",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
