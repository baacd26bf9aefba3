"""``finetune_lr_scale``: the learning rates drop once when pruning is done, with and without a scheduler,
and never twice across a resume."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _checks import tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import PruningCallback

LR = 0.1


class Net(pl.LightningModule):
    def __init__(self, scheduler: str = "none") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.scheduler = scheduler
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)).relu())

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(
            [{"params": self.body.parameters()}, {"params": self.head.parameters(), "lr": LR / 2}],
            lr=LR,
            momentum=0.9,
        )
        if self.scheduler == "none":
            return optimizer
        if self.scheduler == "multistep":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1, 4], gamma=0.5)
        elif self.scheduler == "cosine":  # recursive form, but back from zero after T_max it reads base_lrs
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)
        elif self.scheduler == "lambda":  # closed form: base_lr * 0.8 ** epoch
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.8**epoch)
        elif self.scheduler == "onecycle":  # stepped every batch, closed form from its max_lr
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[LR, LR / 2], total_steps=12)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        else:
            raise ValueError(self.scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class RecordLR(Callback):
    """The learning rate of each group at the first batch of every epoch (after the epoch-start hooks)."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.lrs[trainer.current_epoch] = [float(g["lr"]) for g in trainer.optimizers[0].param_groups]


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 16, generator=g), torch.randint(0, 3, (8,), generator=g)), 4)


def fit(tmp_path: Path, module, callbacks, max_epochs: int, ckpt_path=None, **kwargs) -> pl.Trainer:
    trainer = tiny_trainer(tmp_path, callbacks, max_epochs, **kwargs)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def run(tmp_path: Path, scheduler: str, scale: float, max_epochs: int = 6, **schedule) -> dict[int, list[float]]:
    schedule = schedule or {"schedule": "one_shot", "start_epoch": 2}
    record = RecordLR()
    pruning = PruningCallback(sparsity=0.5, finetune_lr_scale=scale, **schedule)
    fit(tmp_path, Net(scheduler), [pruning, record], max_epochs)
    return record.lrs


def test_without_a_scheduler_the_rates_drop_once_right_after_the_last_pruning_step(tmp_path):
    lrs = run(tmp_path, "none", 0.1)
    assert lrs == {e: [LR, LR / 2] if e < 2 else [pytest.approx(LR / 10), pytest.approx(LR / 20)] for e in range(6)}
    gradual = run(tmp_path, "none", 0.1, schedule="linear", start_epoch=1, end_epoch=3)
    assert [g[0] for g in gradual.values()] == pytest.approx([LR, LR, LR, LR / 10, LR / 10, LR / 10])


def test_the_default_leaves_the_rates_alone(tmp_path):
    assert run(tmp_path, "none", 1.0) == {e: [LR, LR / 2] for e in range(6)}


@pytest.mark.parametrize("scheduler", ["multistep", "cosine", "lambda"])
def test_with_a_scheduler_the_drop_scales_its_whole_trajectory(tmp_path, scheduler):
    plain = run(tmp_path / "plain", scheduler, 1.0)
    dropped = run(tmp_path / "dropped", scheduler, 0.1)
    assert plain[0] == [LR, LR / 2]
    for epoch in range(6):
        factor = 0.1 if epoch >= 2 else 1.0  # the scheduler keeps the scale instead of undoing it
        assert dropped[epoch] == [pytest.approx(v * factor, rel=1e-6) for v in plain[epoch]], epoch
    if scheduler == "multistep":  # 0.1, 0.05 from epoch 1, 0.025 from epoch 4; scaled from epoch 2
        assert [g[0] for g in dropped.values()] == pytest.approx([0.1, 0.05, 0.005, 0.005, 0.0025, 0.0025])


def test_a_closed_form_scheduler_keeps_the_scale_too(tmp_path):
    plain = run(tmp_path / "plain", "onecycle", 1.0, max_epochs=5)
    dropped = run(tmp_path / "dropped", "onecycle", 0.1, max_epochs=5)
    for epoch in range(5):
        factor = 0.1 if epoch >= 2 else 1.0
        assert dropped[epoch] == [pytest.approx(v * factor, rel=1e-6) for v in plain[epoch]], epoch


def test_the_drop_equals_a_milestone_at_the_end_epoch(tmp_path):
    """``finetune_lr_scale=0.1`` reproduces the Hydra configs' MultiStepLR(milestones=[end_epoch], gamma=0.1)."""

    class Milestone(Net):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2], gamma=0.1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    record = RecordLR()
    fit(tmp_path, Milestone(), [PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=2), record], 6)
    expected = run(tmp_path, "none", 0.1)
    assert sorted(record.lrs) == sorted(expected)
    for epoch, rates in record.lrs.items():
        assert rates == pytest.approx(expected[epoch]), epoch


@pytest.mark.parametrize("scheduler", ["none", "multistep"])
@pytest.mark.parametrize("stop_after", [1, 4], ids=["resume-before-the-drop", "resume-after-the-drop"])
def test_resume_applies_the_drop_exactly_once(tmp_path, scheduler, stop_after):
    expected = run(tmp_path / "full", scheduler, 0.1)

    def callbacks():
        return [PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=2, finetune_lr_scale=0.1), RecordLR()]

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = callbacks()
    fit(tmp_path / "a", Net(scheduler), [*first, ckpt], stop_after + 1, enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("PruningCallback"))
    assert state["lr_scaled"] is (stop_after >= 2)

    resumed = callbacks()
    fit(tmp_path / "b", Net(scheduler), resumed, 6, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    lrs = resumed[1].lrs
    assert sorted(lrs) == list(range(stop_after + 1, 6))
    for epoch, rates in lrs.items():
        assert rates == [pytest.approx(v, rel=1e-6) for v in expected[epoch]], epoch


@pytest.mark.parametrize("scale", [0, -0.1, True, "0.1", float("nan"), float("inf")])
def test_bad_scale_fails_at_construction(scale):
    with pytest.raises(MisconfigurationException, match=r"`finetune_lr_scale` must be a finite number > 0 .* got "):
        PruningCallback(sparsity=0.5, finetune_lr_scale=scale)
