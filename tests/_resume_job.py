"""A small pruning run that tests start in a subprocess, kill with SIGKILL at a chosen point and resume.

``python tests/_resume_job.py RUN_DIR [--structure unstructured|channel] [--kill WHEN] [--resume]``

``WHEN`` is one of ``epoch_start:E`` (epoch E starts, before pruning), ``after_pruning:E`` (right after the pruning
step of epoch E), ``batch:E:B`` (after the optimizer step of batch B of epoch E) or ``saving:E`` (halfway through
writing the checkpoint at the end of epoch E). With ``--resume`` the run continues from ``RUN_DIR/last.ckpt``
(from scratch when there is none yet). At the end it writes ``RUN_DIR/final.pt``: the model's state dict, the
masks and the achieved sparsity.

The model has dropout and BatchNorm and trains with SGD (momentum, weight decay) and a MultiStepLR schedule, so
that exact resumption needs the optimizer, scheduler, random and pruning states alike.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune._files as files
from lightning_prune import PruningCallback
from lightning_prune.callbacks.checkpointing import AtomicCheckpointIO, RandomStateCheckpoint
from lightning_prune.data import EpochShuffleSampler

MAX_EPOCHS = 7


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten()
        )
        self.body = nn.Sequential(nn.Linear(8 * 16, 32), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(32, 4)
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x):
        return self.head(self.body(self.features(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        return [optimizer], [torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 5], gamma=0.5)]


class Killer(pl.Callback):
    """SIGKILLs this process at the chosen point (no clean-up, no atexit: as an out-of-memory kill or a pre-emption)."""

    def __init__(self, when: str) -> None:
        kind, *numbers = when.split(":")
        self.kind = kind
        self.numbers = [int(n) for n in numbers]

    def _die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def on_train_epoch_start(self, trainer, pl_module):
        if self.kind in ("epoch_start", "after_pruning") and trainer.current_epoch == self.numbers[0]:
            self._die()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.kind == "batch" and [trainer.current_epoch, batch_idx] == self.numbers:
            self._die()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.kind == "saving" and trainer.current_epoch == self.numbers[0]:
            write = files._os_write

            def half_write(fd, data):  # writes half of the checkpoint to disk, then the process dies
                write(fd, bytes(data[: len(data) // 2]))
                os.fsync(fd)
                self._die()

            files._os_write = half_write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--structure", default="unstructured")
    parser.add_argument("--kill", default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True, verbose=False)

    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 4, (96,), generator=g))
    data = DataLoader(dataset, batch_size=16, sampler=EpochShuffleSampler(dataset, seed=1))
    channel = args.structure == "channel"
    pruning = PruningCallback(
        sparsity=0.5 if channel else 0.8,
        schedule="cubic",
        start_epoch=1,
        end_epoch=4,
        structure=args.structure,
        finetune_lr_scale=0.5,
        compact=False,
    )
    killer = [Killer(args.kill)] if args.kill else []
    before, after = (killer, []) if args.kill and args.kill.startswith("epoch_start") else ([], killer)
    trainer = pl.Trainer(
        default_root_dir=args.run_dir,
        max_epochs=MAX_EPOCHS,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            *before,
            pruning,
            *after,
            RandomStateCheckpoint(),
            ModelCheckpoint(dirpath=args.run_dir, save_last=True),
        ],
    )
    model = Net()
    # "last": the newest checkpoint of the ModelCheckpoint callback, or a fresh start when there is none yet.
    trainer.fit(model, data, ckpt_path="last" if args.resume else None)
    masks = pruning.masks.state_dict() if pruning.masks is not None else {}
    torch.save(
        {"model": model.state_dict(), "masks": masks, "sparsity": pruning.achieved_sparsity},
        args.run_dir / "final.pt",
    )


if __name__ == "__main__":
    main()
