"""One-shot pruning under Lightning's ``strategy="ddp"`` on the CPU, which a test starts in a subprocess.

``python tests/_oneshot_ddp_job.py OUT_DIR [--devices 2] [--method sparsegpt]``

``OneShotPruning`` prunes the tiny transformer at the start of fitting from 4 calibration batches, every rank taking
every other one; right after the pruning step each rank's masks and weights are hashed and the hashes gathered.
Rank 0 writes them, the masks and the pruned weights (before any training step) to ``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _oneshot_models import TinyTransformer
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import OneShotPruning, PruningCallback
from lightning_prune.masks.distributed import rank_digest


class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyTransformer(layers=2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids)

    def training_step(self, batch, batch_idx):
        ids, targets = batch
        return F.cross_entropy(self(ids).flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def tokens(n: int, seq: int = 12, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, seq + 1), generator=g)
    return TensorDataset(ids[:, :-1], ids[:, 1:])


def calibration() -> list[torch.Tensor]:
    """4 batches of 4 sequences: on 2 ranks, rank 0 takes batches 0 and 2, rank 1 batches 1 and 3."""
    return list(tokens(16, seed=1).tensors[0].split(4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--method", default="sparsegpt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pruning = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=0, ignore=["head"], log_per_layer=False)
    oneshot = OneShotPruning(pruning, method=args.method, calibration=calibration(), num_samples=None)
    records: dict = {}

    def record(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if records:
            return
        masks = pruning.masks
        digests = {"masks": rank_digest(masks.masks), "weights": rank_digest(list(pl_module.parameters()))}
        gathered: list = [digests] * trainer.world_size
        if trainer.world_size > 1:
            dist.all_gather_object(gathered, digests)
        records.update(
            digests=gathered,
            samples=oneshot.report.samples,
            masks={k: v.tolist() for k, v in masks.state_dict().items()},
            weights={k: v.tolist() for k, v in pl_module.state_dict().items()},
        )

    pruning.after_pruning(record)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=2,
        callbacks=[pruning, oneshot],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(TinyLM(), DataLoader(tokens(16), batch_size=4))
    if trainer.is_global_zero:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps({"world_size": trainer.world_size, **records}))


if __name__ == "__main__":
    main()
