"""A LightningModule that trains any ``nn.Module`` image classifier with cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_prune._helpers import check_int
from lightning_prune.models.optim import check_training_arguments
from lightning_prune.training.distillation import DistillationMixin
from lightning_prune.training.regularization import L1RegularizationMixin, RegularizationKind

__all__ = ["ImageClassifier"]

OptimizerName = Literal["sgd", "adam", "adamw"]


class ImageClassifier(L1RegularizationMixin, DistillationMixin, L.LightningModule):
    """Cross-entropy training of a plain ``nn.Module``, with accuracy for train, validation and test.

    The wrapped network is ``self.model`` and holds every parameter and buffer, so ``state_dict()`` is
    the network's own (keys prefixed with ``model.``) and pruning callbacks see only its layers. Logs
    ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc`` (epoch
    means; accuracy is the micro average, i.e. the fraction of correct predictions).

    ``lr_milestones`` multiplies the learning rate by ``lr_gamma`` at each listed epoch
    (``torch.optim.lr_scheduler.MultiStepLR``), e.g. to fine-tune at a lower rate once pruning ends.

    It includes :class:`~lightning_prune.training.regularization.L1RegularizationMixin` (off until
    ``reg_lambda`` > 0) and :class:`~lightning_prune.training.distillation.DistillationMixin` (active while a
    :class:`~lightning_prune.callbacks.distillation.DistillationCallback` has set a teacher). ``train/loss`` logs the
    cross-entropy alone; the training loss adds ``reg/<kind>`` and blends in ``distill/kd``.

    Args:
        model: The network; maps a batch of images to ``(batch, num_classes)`` logits.
        num_classes: Number of classes.
        lr: Initial learning rate.
        optimizer: ``"sgd"`` (with momentum), ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum; ignored by Adam and AdamW.
        weight_decay: Weight decay (L2 for SGD and Adam, decoupled for AdamW).
        lr_milestones: Epochs at which the learning rate is multiplied by ``lr_gamma``; empty for a
            constant rate.
        lr_gamma: Factor applied at each milestone.
        reg_kind: The penalty: ``"l1"``, ``"group_lasso"`` or ``"bn_slimming"`` (see
            :class:`~lightning_prune.training.regularization.L1RegularizationMixin`); ``None`` (the default) is
            ``"l1"``, or the kind of a sibling mixin a subclass adds (``class Net(GroupLassoMixin, ImageClassifier)``).
        reg_lambda: Its weight λ; 0 (the default) trains without a penalty.
        reg_ignore: Module-name patterns left unpenalised, e.g. ``["head"]``.
        reg_warmup_epochs: Ramp λ linearly over this many epochs.
        reg_stop_epoch: The first epoch without the penalty (``None``: to the end).

    Example:
        >>> from lightning_prune.models import MLP
        >>> module = ImageClassifier(MLP(hidden=(32,)), lr=0.1, lr_milestones=(20,))
        >>> module(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        lr: float = 0.05,
        optimizer: OptimizerName = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_milestones: Sequence[int] = (),
        lr_gamma: float = 0.1,
        reg_kind: RegularizationKind | None = None,
        reg_lambda: float = 0.0,
        reg_ignore: Sequence[str] = (),
        reg_warmup_epochs: int = 0,
        reg_stop_epoch: int | None = None,
    ) -> None:
        super().__init__(
            reg_kind=reg_kind,
            reg_lambda=reg_lambda,
            reg_ignore=reg_ignore,
            reg_warmup_epochs=reg_warmup_epochs,
            reg_stop_epoch=reg_stop_epoch,
        )
        milestones = check_training_arguments(model, lr, optimizer, momentum, weight_decay, lr_milestones, lr_gamma)
        check_int("num_classes", num_classes, 2)
        # Plain lists in the hyperparameters (not e.g. Hydra's ListConfig), so checkpoints load with weights_only=True.
        lr_milestones, reg_ignore = milestones, [str(p) for p in reg_ignore]
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.lr_milestones = sorted(milestones)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        accuracy(logits, y)
        prog_bar = stage == "val"
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=prog_bar)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=prog_bar)
        return loss

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.model.parameters()
        optimizer: torch.optim.Optimizer
        if hp["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        elif hp["optimizer"] == "adam":
            optimizer = torch.optim.Adam(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        else:
            optimizer = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        if not self.lr_milestones:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=self.lr_milestones, gamma=hp["lr_gamma"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
