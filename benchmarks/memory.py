"""Extra peak memory of a fit with ``PruningCallback`` over the same fit without it, per weight.

    .venv/bin/python benchmarks/memory.py                      # about 40M and 200M weights
    .venv/bin/python benchmarks/memory.py --sizes 40M 200M 1B  # and 1B (needs about 10 GB free)

Each fit runs in a fresh subprocess (``ru_maxrss`` is a process's high-water mark): a stack of square bias-free
linear layers of the given total size, SGD without momentum (so that the dense fit itself holds only the weights and
their gradients), 2 epochs of 3 batches of 8 samples, fp32. With the callback, unstructured global magnitude pruning
grows the masks at the start of both epochs (0.45, then 0.9: ``schedule="linear", start_epoch=0, end_epoch=1``), so
the window holds two exact global thresholds and every training step with masks attached. The figure is the rise of
``ru_maxrss`` during ``trainer.fit`` (the model is built and everything imported before), with the callback minus
without it. Target: at most 1.1 bytes per weight plus 64 MB. Memory does not depend on the machine's load: these
figures are real on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from _common import environment, markdown_table

#: Layer width and count per size: about the named number of weights.
SIZES: dict[str, tuple[int, int]] = {"40M": (2048, 10), "200M": (4096, 12), "1B": (8192, 15)}
TARGET_BYTES_PER_WEIGHT = 1.1
TARGET_FIXED_MB = 64.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def child(size: str, variant: str) -> dict[str, float]:
    """One fit in this process; the rise of the peak resident size during ``fit``."""
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_prune import PruningCallback

    torch.set_num_threads(2)
    width, depth = SIZES[size]

    class Stack(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(depth)))
            with torch.no_grad():  # an explicit generator, small values: no temporaries beyond one layer
                g = torch.Generator().manual_seed(0)
                for layer in self.layers:
                    layer.weight.uniform_(-(width**-0.5), width**-0.5, generator=g)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.layers(x).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    model = Stack()
    weights = sum(p.numel() for p in model.parameters())
    data = DataLoader(TensorDataset(torch.randn(24, width, generator=torch.Generator().manual_seed(1))), batch_size=8)
    callbacks = []
    if variant == "PruningCallback":
        callbacks.append(PruningCallback(sparsity=0.9, schedule="linear", start_epoch=0, end_epoch=1))
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    before = _rss_mb()
    trainer.fit(model, data)
    after = _rss_mb()
    sparsity = callbacks[0].achieved_sparsity if callbacks else 0.0
    return {"weights": weights, "before_mb": before, "peak_mb": after, "rise_mb": after - before, "sparsity": sparsity}


def run_child(size: str, variant: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", size, variant],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{size} {variant}: the fit failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["40M", "200M"])
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    print("Extra peak memory of fitting with PruningCallback, over the same fit without it")
    print(
        environment(
            {
                "models": ", ".join(f"{s}: {d} x Linear({w}, {w}, bias=False)" for s, (w, d) in SIZES.items()),
                "fit": "fp32, SGD lr 1e-3 no momentum, 2 epochs x 3 batches of 8; pruning 0.45 then 0.9 (global "
                "magnitude) at the start of each epoch",
                "measure": "rise of ru_maxrss during trainer.fit, fresh subprocess per fit",
            }
        )
    )
    rows = []
    for size in args.sizes:
        none = run_child(size, "none")
        ours = run_child(size, "PruningCallback")
        weights = ours["weights"]
        extra_mb = ours["rise_mb"] - none["rise_mb"]
        per_weight = extra_mb * 2**20 / weights
        budget_mb = TARGET_BYTES_PER_WEIGHT * weights / 2**20 + TARGET_FIXED_MB
        print(f"{size}: none {none}; PruningCallback {ours}", flush=True)
        rows.append(
            [
                size,
                f"{weights / 1e6:.1f}M",
                f"{4 * weights / 2**20:.0f}",
                f"{none['rise_mb']:.0f}",
                f"{ours['rise_mb']:.0f}",
                f"{extra_mb:.0f}",
                f"{per_weight:.2f}",
                f"{budget_mb:.0f}",
                "yes" if extra_mb <= budget_mb else "NO",
                f"{ours['sparsity']:.4f}",
            ]
        )
    print()
    header = [
        "size",
        "weights",
        "model MB",
        "fit rise, none MB",
        "fit rise, PruningCallback MB",
        "extra MB",
        "extra bytes/weight",
        "budget MB (1.1 B/w + 64)",
        "within",
        "sparsity",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
