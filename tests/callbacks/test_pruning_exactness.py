"""With a real ``Trainer``: pruned weights and their optimizer state stay exactly zero after every optimizer step for
every optimizer of ``torch.optim``, under gradient accumulation, ``bf16-mixed`` precision and gradient clipping; the
gradients are masked once per step, before clipping; frozen layers are pruned or left dense by choice."""

import lightning.pytorch as pl
import pytest
import torch
from _checks import images, tiny_trainer
from _optimizers import assert_pruned_entries_zero, build_optimizer, mlp, optimizer_names
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_prune import PruningCallback

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(pl.LightningModule):
    def __init__(self, optimizer: str = "SGD", frozen: bool = False) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.net = mlp()
        if frozen:
            self.net[1].weight.requires_grad_(False)  # e.g. a pretrained first layer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return build_optimizer(self.optimizer_name, [p for p in self.parameters() if p.requires_grad])


class StepChecker(pl.Callback):
    """After every optimizer step, pruned entries and their state are zero; before gradient clipping (in the
    LightningModule's ``on_before_optimizer_step``, which runs after every callback's) the gradients of pruned entries
    are already zero."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.steps = 0
        self.masked_before_clipping = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        masks = self.pruning.masks
        if masks is not None and masks.attached:
            for name, p, m in zip(masks.names, masks.params, masks.masks):
                if p.grad is not None:
                    assert bool((p.grad[~m] == 0).all()), f"the gradient of a pruned entry of {name} reached clipping"
            self.masked_before_clipping += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.pruning.masks
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if masks is None or masks.num_pruned() == 0 or not stepped:
            return
        assert_pruned_entries_zero(masks, trainer.optimizers[0], f"step {trainer.global_step}")
        self.steps += 1


def fit(tmp_path, optimizer: str, frozen: bool = False, epochs: int = 3, **kwargs):
    pruning = PruningCallback(sparsity=0.7, schedule="linear", start_epoch=0, end_epoch=1, **kwargs)
    checker = StepChecker(pruning)
    extra = {"accumulate_grad_batches": 2, "precision": "bf16-mixed"}
    if optimizer != "LBFGS":  # Lightning refuses to accumulate gradients for LBFGS, whose closure runs many times
        extra["gradient_clip_val"] = 0.5
    else:
        extra = {"precision": "bf16-mixed", "gradient_clip_val": 0.5}
    model = Net(optimizer, frozen)
    tiny_trainer(tmp_path, [pruning, checker], max_epochs=epochs, **extra).fit(
        model, images(n=128, shape=(1, 4, 4), batch_size=16)
    )
    return pruning, checker, model


@pytest.mark.parametrize("optimizer", optimizer_names())
def test_every_optimizer_keeps_pruned_entries_and_state_exactly_zero(tmp_path, optimizer):
    pruning, checker, _ = fit(tmp_path, optimizer)
    assert checker.steps >= 8
    assert checker.masked_before_clipping >= checker.steps
    assert pruning.achieved_sparsity == pytest.approx(0.7, abs=1e-3)


def test_frozen_layers_are_pruned_by_default(tmp_path):
    pruning, checker, model = fit(tmp_path, "AdamW", frozen=True)
    assert checker.steps >= 8
    frozen = pruning.layer_sparsity()["net.1.weight"]
    assert frozen > 0.3, "the frozen layer is pruned with the others"
    assert model.net[1].weight.grad is None
    assert pruning.achieved_sparsity == pytest.approx(0.7, abs=1e-3)


def test_frozen_layers_stay_dense_when_ignored(tmp_path):
    pruning, _, model = fit(tmp_path, "SGD", frozen=True, ignore=["net.1"])
    assert "net.1.weight" not in pruning.layer_sparsity()
    assert bool((model.net[1].weight != 0).all())
    assert pruning.achieved_sparsity == pytest.approx(0.7, abs=1e-3)


def test_bad_remask_is_refused():
    with pytest.raises(
        MisconfigurationException,
        match=r"^PruningCallback: `remask` must be one of \['auto', 'always', 'pruning_steps'\], got 'sometimes': "
        r"'auto' re-masks after every step only for optimizers that can move a weight without a gradient, "
        r"'always' after every step\.$",
    ):
        PruningCallback(remask="sometimes")


@pytest.mark.parametrize(("remask", "optimizer", "every_step"), [("always", "SGD", True), ("auto", "Muon", True)])
def test_remask_reaches_the_masks(tmp_path, remask, optimizer, every_step):
    pruning, checker, _ = fit(tmp_path, optimizer, epochs=2, remask=remask)
    assert checker.steps >= 4
    masks = pruning.masks
    assert masks.remask == remask
    assert masks.remasks_every_step(build_optimizer(optimizer, [torch.zeros(2, 2)])) is every_step
