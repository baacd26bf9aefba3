"""A pruning run under Lightning's ``strategy="ddp"`` on the CPU, which tests start in a subprocess.

``python tests/_ddp_job.py OUT.json [--devices 2] [--batch-size 16] [--structure unstructured|channel|block|N:M]
[--importance magnitude|rank|apoz] [--epochs 4] [--samples 128] [--optimizer sgd|adamw] [--accumulate 1]``

``strategy="ddp"`` re-runs this command line for every other rank, as it does for a user's script. After every
optimizer step and every pruning step, each rank's masks and weights are hashed and the hashes gathered; rank 0
writes them with the final sparsity and accuracy to ``OUT.json``, and whether every rank's pruned weights and their
optimizer state were exactly zero, and its final masks to ``OUT.masks.pt`` (by parameter name). ``--importance
rank`` scores differently on every rank (magnitude plus rank-seeded noise), so that ranks which computed their masks
separately would differ. ``--importance apoz`` also hashes the channel scores each rank pruned with at every pruning
step: every rank counts zeros on its own batches, so the scores agree only when the counts were summed over the
ranks. Channel pruning prunes half the channels, N:M its pattern's share, the others 80% of the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import MagnitudeImportance, PruningCallback
from lightning_prune.criteria.activation import APoZImportance


class Net(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.optimizer_name = optimizer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten())
            self.body = nn.Sequential(nn.Linear(6 * 8 * 8, 32), nn.ReLU())
            self.head = nn.Linear(32, 4)
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.features(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def pruned_entries_zero(masks, optimizer: torch.optim.Optimizer) -> bool:
    """Pruned weights and every optimizer state entry shaped like its parameter are exactly zero."""
    for p, m in zip(masks.params, masks.masks):
        if not bool((p[~m] == 0).all()):
            return False
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.shape == p.shape and not bool((value[~m] == 0).all()):
                return False
    return True


class RankDependentImportance(MagnitudeImportance):
    """Magnitude plus noise that differs per rank: computed separately, every rank would prune other weights."""

    pointwise = False

    def __call__(self, name: str, param: Tensor) -> Tensor:
        rank = dist.get_rank() if dist.is_initialized() else 0
        g = torch.Generator().manual_seed(1000 + rank)
        return param.detach().abs() + torch.rand(param.shape, generator=g)


class ScoreRecordingAPoZ(APoZImportance):
    """APoZ that keeps the channel scores it gives, in order, until the recorder takes them."""

    def __init__(self, batches: int) -> None:
        super().__init__(batches)
        self.given: list[Tensor] = []

    def channel_scores(self, masks, group):
        scores = super().channel_scores(masks, group)
        self.given.append(scores.clone())
        return scores


def digest(tensors: list[Tensor]) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes, written here rather than taken from the library: a test of
    the library's rank agreement must not trust the library's own digest."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RankRecorder(pl.Callback):
    """Gathers every rank's digest of masks and weights after each optimizer step and each pruning step."""

    def __init__(self, pruning: PruningCallback, out: Path, samples: int) -> None:
        self.pruning = pruning
        self.out = out
        self.samples = samples
        self.records: list[dict] = []

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        masks = self.pruning.masks
        if masks is None:
            return
        digests = {
            "masks": digest(list(masks.masks)),
            "weights": digest(list(pl_module.parameters())),
            "zeros": pruned_entries_zero(masks, trainer.optimizers[0]),
        }
        importance = self.pruning.importance
        if isinstance(importance, ScoreRecordingAPoZ) and when == "pruning step":
            digests["scores"] = digest(importance.given) if importance.given else None
            importance.given = []
        gathered: list = [digests] * trainer.world_size
        if trainer.world_size > 1:
            dist.all_gather_object(gathered, digests)
        self.records.append(
            {
                "when": when,
                "epoch": trainer.current_epoch,
                "pruned": masks.num_pruned(),
                "masks_agree": len({g["masks"] for g in gathered}) == 1,
                "weights_agree": len({g["weights"] for g in gathered}) == 1,
                "pruned_zero": all(g["zeros"] for g in gathered),
                "scores": [g.get("scores") for g in gathered],
            }
        )

    def on_train_epoch_start(self, trainer, pl_module):  # after the PruningCallback: callbacks run in list order
        self._record(trainer, pl_module, "pruning step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(trainer, pl_module, "optimizer step")

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        x, y = dataset(self.samples)[:]
        pl_module.eval()
        with torch.no_grad():
            accuracy = float((pl_module(x).argmax(1) == y).float().mean())
        masks = self.pruning.masks
        result = {
            "records": self.records,
            "world_size": trainer.world_size,
            "sparsity": self.pruning.achieved_sparsity,
            "pruned": masks.num_pruned() if masks is not None else 0,
            "numel": masks.numel() if masks is not None else 0,
            "accuracy": accuracy,
        }
        self.out.write_text(json.dumps(result))
        if masks is not None:
            torch.save(dict(zip(masks.names, masks.masks)), self.out.with_suffix(".masks.pt"))


def dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--structure", default="unstructured")
    parser.add_argument("--importance", default="rank")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    nm = ":" in args.structure
    importance = {"rank": RankDependentImportance(), "apoz": ScoreRecordingAPoZ(batches=2)}.get(
        args.importance, args.importance
    )
    pruning = PruningCallback(
        sparsity=0.8 if args.structure == "unstructured" else 0.5,
        schedule="linear",
        start_epoch=0,
        end_epoch=args.epochs - 2,
        importance=importance,
        structure=args.structure,
        ignore=["features.0"] if nm else (),  # one input channel: no group of M along it
        compact=False,
    )
    trainer = pl.Trainer(
        default_root_dir=args.out.parent,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        callbacks=[pruning, RankRecorder(pruning, args.out, args.samples)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accumulate_grad_batches=args.accumulate,
    )
    trainer.fit(Net(args.optimizer), DataLoader(dataset(args.samples), batch_size=args.batch_size))


if __name__ == "__main__":
    main()
