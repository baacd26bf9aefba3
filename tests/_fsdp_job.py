"""A pruning run under Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) on the CPU, which tests start in
a subprocess.

``python tests/_fsdp_job.py OUT.pt [--devices 2] [--epochs 4] [--scope global|layer] [--ckpt-dir DIR]
[--resume CKPT] [--consolidated] [--optimizer sgd|adamw] [--clip VALUE] [--structure S] [--importance I]
[--sparsity S] [--start-epoch E] [--hidden A,B] [--invariants]``

The strategy re-runs this command line for every other rank. Before and after each pruning step every rank gathers
the whole weights and masks (``DTensor.full_tensor``); rank 0 writes them, the pruning targets, the final weights and
masks, the per-rank mask shapes and dtypes and whether pruned weights and their optimizer state are zero on every
rank to ``OUT.pt``; with a gradient criterion, each step also records the whole statistics it pruned with. The
weights are ties-rich: values on a grid of 1/64, so the threshold cuts through ties.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import MaskInvariantChecker, PruningCallback


class Net(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", hidden: tuple[int, int] = (5, 7)) -> None:
        super().__init__()
        self.optimizer = optimizer
        a, b = hidden
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # By default 5, 7 and 3 rows: shards of unequal size, and an empty one with 3 processes or more.
            self.body = nn.Sequential(nn.Linear(16, a), nn.ReLU(), nn.Linear(a, b), nn.ReLU())
            self.head = nn.Linear(b, 3)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_((p * 64).round() / 64)  # a coarse grid: many equal magnitudes

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.body[0], self.body[2], self.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.02, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def whole(t: Tensor) -> Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


class Recorder(pl.Callback):
    """Gathers the whole weights and masks around every pruning step, and checks zeros after every step."""

    def __init__(self, pruning: PruningCallback, out: Path) -> None:
        self.pruning = pruning
        self.out = out
        self.steps: list[dict] = []
        self.zero_after_steps = True
        self.masked_before_clipping = True
        pruning.before_pruning(self.before)
        pruning.after_pruning(self.after)

    def _masks(self) -> dict[str, Tensor]:
        masks = self.pruning.masks
        assert masks is not None
        out = {}
        for p, name, m in zip(masks.params, masks.names, masks.masks):
            local = m.to(torch.uint8)
            full = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            out[name] = full.full_tensor().bool()
        return out

    def before(self, trainer, pl_module):
        masks = self.pruning.masks
        self._pending = {
            "weights": {n: whole(p) for n, p in zip(masks.names, masks.params)},
            "masks_before": self._masks(),
            "target_before": self.pruning.pruner.target,
        }
        stats = self.pruning.importance.state_dict().get("stats")
        if stats:  # a gradient criterion's statistics of the local shards, gathered whole
            self._pending["importance_state"] = {
                **self.pruning.importance.state_dict(),
                "stats": {
                    n: DTensor.from_local(stats[n], p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                    .full_tensor()
                    .clone()
                    for n, p in zip(masks.names, masks.params)
                },
            }

    def after(self, trainer, pl_module):
        if self.pruning.pruner.target > self._pending["target_before"]:
            self.steps.append({**self._pending, "masks_after": self._masks(), "target": self.pruning.pruner.target})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # After the PruningCallback's hook and before Lightning clips: the gradient shards are masked already.
        masks = self.pruning.masks
        for p, m in zip(masks.params, masks.masks):
            if self.pruning.pruner.target > 0 and p.grad is not None and bool(p.grad.to_local()[~m].any()):
                self.masked_before_clipping = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.pruning.masks
        opt = trainer.optimizers[0]
        for p, m in zip(masks.params, masks.masks):
            local = p.to_local()
            if bool(local[~m].any()):
                self.zero_after_steps = False
            for value in opt.state.get(p, {}).values():
                if isinstance(value, DTensor) and bool(value.to_local()[~m].any()):
                    self.zero_after_steps = False

    def on_train_end(self, trainer, pl_module):
        masks = self.pruning.masks
        flags = torch.tensor([0 if self.zero_after_steps else 1, 0 if self.masked_before_clipping else 1])
        dist.all_reduce(flags)
        shapes = [None] * trainer.world_size
        dist.all_gather_object(
            shapes,
            [(tuple(m.shape), str(m.dtype), tuple(p.to_local().shape)) for p, m in zip(masks.params, masks.masks)],
        )
        result = {
            "world_size": trainer.world_size,
            "steps": self.steps,
            "final_weights": {n: whole(p) for n, p in pl_module.named_parameters()},
            "final_masks": self._masks(),
            "sparsity": self.pruning.achieved_sparsity,
            "layer_sparsity": self.pruning.layer_sparsity(),
            "summary": self.pruning.pruner.summary(),
            "zero_after_steps": int(flags[0]) == 0,
            "masked_before_clipping": int(flags[1]) == 0,
            "shapes": shapes,
        }
        if trainer.is_global_zero:
            torch.save(result, self.out)


def loader(samples: int, batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 16, generator=g), torch.randint(0, 3, (samples,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--scope", default="global")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--ckpt-dir", type=Path, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--consolidated", action="store_true")
    parser.add_argument("--clip", type=float, default=None, help="gradient_clip_val")
    parser.add_argument("--structure", default="unstructured")
    parser.add_argument("--importance", default="magnitude")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--start-epoch", type=int, default=0)
    parser.add_argument("--hidden", default="5,7", help="the widths of the two hidden layers")
    parser.add_argument("--invariants", action="store_true", help="add a MaskInvariantChecker")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pruning = PruningCallback(
        sparsity=args.sparsity,
        schedule="iterative",
        start_epoch=args.start_epoch,
        end_epoch=args.epochs - 2,
        scope=args.scope,
        structure=args.structure,
        importance=args.importance,
    )
    callbacks: list = [pruning, Recorder(pruning, args.out)]
    if args.invariants:
        callbacks.append(MaskInvariantChecker())
    if args.ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, save_top_k=-1, every_n_epochs=1, save_last=False))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=ModelParallelStrategy(
            data_parallel_size=args.devices, tensor_parallel_size=1, save_distributed_checkpoint=not args.consolidated
        ),
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=args.ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        gradient_clip_val=args.clip,
    )
    hidden = tuple(int(w) for w in args.hidden.split(","))
    trainer.fit(Net(args.optimizer, hidden), loader(64, 8), ckpt_path=args.resume)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
