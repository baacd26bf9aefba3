"""Helpers shared by the tests: the repository's paths, a Trainer for tiny runs, tiny data, optimizers, seeded
weights, the zero checker and the DDP job. Fixtures are in ``conftest.py``."""

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import PruningCallback
from lightning_prune.data import EpochShuffleSampler

#: The repository's root (``tests/`` holds one folder per subpackage, so no test finds it relative to itself).
ROOT = Path(__file__).resolve().parents[1]
#: The Hydra configs.
CONF = ROOT / "conf"
#: A pruning run under ``strategy="ddp"`` that tests start in a subprocess (its docstring lists the options).
DDP_JOB = ROOT / "tests" / "_ddp_job.py"
#: The number of processes the DDP job starts unless ``--devices`` says otherwise.
DDP_WORLD = 2


def tiny_trainer(root: Path | None, callbacks: Sequence[Callback], max_epochs: int, **kwargs: Any) -> pl.Trainer:
    """A ``Trainer`` for tiny, reproducible runs on one CPU: deterministic, quiet, no sanity validation; without a
    logger or checkpoints unless ``kwargs`` ask for them (any other ``Trainer`` argument goes through too)."""
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("deterministic", True)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return pl.Trainer(
        default_root_dir=root,
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def images(
    n: int = 96,
    shape: tuple[int, ...] = (1, 8, 8),
    classes: int = 4,
    batch_size: int = 16,
    sampler: Literal["epoch", "global"] | None = None,
    sampler_seed: int = 3,
) -> DataLoader:
    """``n`` random images and labels, the same on every call (seed 0), in order, reshuffled each epoch by an
    :class:`~lightning_prune.data.EpochShuffleSampler` (``"epoch"``) or shuffled by the global random state
    (``"global"``)."""
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))
    if sampler == "epoch":
        return DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffleSampler(dataset, seed=sampler_seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler == "global")


def make_optimizer(name: str, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizers the exactness tests train with: SGD with momentum and weight decay, Adam, AdamW with strong
    decoupled weight decay."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    if name == "adam":
        return torch.optim.Adam(params, lr=3e-3, weight_decay=1e-4)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)
    raise ValueError(name)


@torch.no_grad()
def seeded(net: nn.Module, seed: int = 0) -> nn.Module:
    """Fixed weights from an explicit generator (the global random state is left alone)."""
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(0.6 * torch.randn(p.shape, generator=g))
    return net


class ZeroChecker(Callback):
    """After every batch (so after every optimizer step) masked entries and the state of every optimizer must be
    exactly zero; subclasses add checks in :meth:`check`."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.pruning.masks
        if masks is None or masks.num_pruned() == 0:
            return
        for name, p, m in zip(masks.names, masks.params, masks.masks):
            assert bool((p[~m] == 0).all()), f"a pruned entry of {name} moved"
            for opt in trainer.optimizers:
                for value in opt.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        assert bool((value[~m] == 0).all()), f"optimizer state of a pruned entry of {name} is not zero"
        self.check(pl_module, masks)
        self.checked += 1

    def check(self, pl_module, masks) -> None:
        """Further checks after every batch (none here)."""


def run_ddp_job(out: Path, *args: str) -> dict:
    """Run :data:`DDP_JOB` with ``args`` (one thread per process) and return what rank 0 wrote to ``out``; its final
    masks are in ``out.with_suffix(".masks.pt")``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(DDP_JOB), str(out), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def check_ranks_agree(result: dict, epochs: int = 4, steps_per_epoch: int = 128 // (16 * DDP_WORLD)) -> list[dict]:
    """Assert that a two-process DDP job pruned once per epoch, stepped as often as its data says, and that after
    every step all ranks held the same masks and weights with pruned entries (and their optimizer state) at zero;
    return the records of the pruning steps."""
    records = result["records"]
    assert result["world_size"] == DDP_WORLD
    steps = [r for r in records if r["when"] == "pruning step"]
    assert [r["epoch"] for r in steps] == list(range(epochs))
    assert sum(r["when"] == "optimizer step" for r in records) == epochs * steps_per_epoch
    assert all(r["masks_agree"] for r in records), [r for r in records if not r["masks_agree"]]
    assert all(r["weights_agree"] for r in records), [r for r in records if not r["weights_agree"]]
    assert all(r["pruned_zero"] for r in records), [r for r in records if not r["pruned_zero"]]
    return steps


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's ``init_method``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def value_error_message(fn: Callable[[], Any]) -> str:
    """The message of the ``ValueError`` that ``fn()`` raises, or ``"no error"`` (for ranks that report back)."""
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def fork_ranks(worker: Callable[[int, int, str], None], world: int, out: Path) -> list[Any]:
    """Run ``worker(rank, port, out)`` in ``world`` forked processes that form a gloo group on a free port, and
    load what each rank saved as ``out / f"rank{rank}.pt"``."""
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=world, start_method="fork", join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
