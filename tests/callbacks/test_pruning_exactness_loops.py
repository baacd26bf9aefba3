"""Pruned weights and their optimizer state stay exactly zero in training loops the other exactness tests do not
drive: Lightning's manual optimization with two optimizers over disjoint layers, an optimizer class of the user's own
(outside ``torch.optim``) that moves weights without gradients, and a plain loop that keeps its gradient tensors
(``zero_grad(set_to_none=False)``) across accumulated micro-batches with per-group hyperparameters."""

import lightning.pytorch as pl
import pytest
import torch
from _checks import ZeroChecker, images, tiny_trainer
from _optimizers import assert_pruned_entries_zero, mlp
from torch import nn

from lightning_prune import PruningCallback
from lightning_prune.criteria.magnitude import MagnitudeImportance
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.masks.params import prunable_parameters
from lightning_prune.structures.unstructured import Unstructured

pytestmark = pytest.mark.usefixtures("one_thread")


class DriftSGD(torch.optim.Optimizer):
    """SGD plus a constant drift of every weight and a running sum of the gradients in its state: an optimizer of the
    user's own that moves weights whose gradient is zero (as decoupled-decay-free "lookahead" or noise schemes do)."""

    def __init__(self, params, lr: float = 0.05, drift: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr, "drift": drift})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["grad_sum"] = torch.zeros_like(p)
                state["grad_sum"].add_(p.grad).add_(group["drift"])
                p.add_(p.grad, alpha=-group["lr"]).add_(group["drift"])
        return loss


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: Adam trains the first two layers, SGD with Nesterov momentum the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = mlp(seed=3)
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        first, last = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        first.zero_grad()
        last.zero_grad()
        self.manual_backward(loss)
        first.step()
        last.step()
        self.steps += 1

    def configure_optimizers(self):
        head = list(self.net[5].parameters())
        body = [p for p in self.net.parameters() if all(p is not q for q in head)]
        return (
            torch.optim.Adam(body, lr=0.01, weight_decay=1e-3),
            torch.optim.SGD(head, lr=0.05, momentum=0.9, nesterov=True),
        )


def test_manual_optimization_with_two_optimizers_keeps_pruned_entries_and_state_zero(tmp_path):
    model = TwoOptimizers()
    pruning = PruningCallback(sparsity=0.8, schedule="linear", start_epoch=0, end_epoch=2)
    checker = ZeroChecker(pruning)  # every optimizer's state, after every batch
    before = [p.detach().clone() for p in model.parameters()]
    tiny_trainer(tmp_path, [pruning, checker], max_epochs=4).fit(model, images(n=96, shape=(1, 4, 4)))
    assert checker.checked == 3 * 6  # every batch from the first pruning step (epoch 1's start), 6 batches an epoch
    assert pruning.achieved_sparsity == pytest.approx(0.8, abs=1e-3)
    # both optimizers' layers hold pruned entries, and their kept weights trained
    assert all(not bool(m.all()) for m in pruning.masks.masks), "a layer kept every weight"
    trained = [not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before)]
    assert all(trained)
    # Adam's moments exist for the body and Nesterov momentum for the head: both were checked
    first, last = model.optimizers(use_pl_optimizer=False)
    assert all("exp_avg" in first.state[p] for p in first.param_groups[0]["params"])
    assert all("momentum_buffer" in last.state[p] for p in last.param_groups[0]["params"])


def _train_with_drift(remask: str, steps: int = 6) -> tuple[MaskSet, torch.optim.Optimizer]:
    net = mlp(seed=5)
    opt = DriftSGD(net.parameters())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 1, 4, 4, generator=g), torch.randint(0, 4, (16,), generator=g)
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.6)
    masks.attach([opt], remask=remask)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return masks, opt


def test_an_optimizer_of_the_users_own_is_re_masked_after_every_step():
    masks, opt = _train_with_drift("auto")
    assert masks.remasks_every_step(opt)  # not a torch.optim class: the safety net is on by default
    assert_pruned_entries_zero(masks, opt, "after 6 steps of DriftSGD")
    assert masks.num_pruned() == round(0.6 * masks.numel())


def test_without_the_safety_net_the_users_optimizer_moves_pruned_weights():
    """The check above can fail: told that the optimizer only follows gradients, the drift reaches pruned entries."""
    masks, opt = _train_with_drift("pruning_steps")
    with pytest.raises(AssertionError, match="DriftSGD"):
        assert_pruned_entries_zero(masks, opt, "after 6 steps of DriftSGD")


@pytest.mark.parametrize("name", ["RMSprop", "NAdam", "Adagrad"])
def test_kept_gradient_tensors_and_parameter_groups(name):
    """``zero_grad(set_to_none=False)`` keeps each gradient tensor from step to step and the micro-batches add into
    it: the masked gradients of one step must not hold back pruned-entry gradients of the next, whatever the group's
    settings (one group decays its weights and maximizes, the other does neither)."""
    net = mlp(seed=7)
    first, rest = [net[1].weight], [net[3].weight, net[5].weight]
    cls = getattr(torch.optim, name)
    opt = cls([{"params": first, "weight_decay": 0.1, "maximize": True}, {"params": rest}], lr=0.01)
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    for x, y in data:  # dense steps first: state of every entry is non-zero
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.75, scope="layer")
    masks.attach([opt])
    kept = [p.grad for p in masks.params]
    before = [p.detach().clone() for p in masks.params]
    for step in range(8):
        for x, y in data:  # three accumulated micro-batches per step
            (nn.functional.cross_entropy(net(x), y) / len(data)).backward()
        opt.step()
        assert all(p.grad is k for p, k in zip(masks.params, kept)), "the gradient tensors were replaced"
        opt.zero_grad(set_to_none=False)
        assert_pruned_entries_zero(masks, opt, f"after step {step} of {name}")
    assert [m.sum().item() for m in masks.masks] == [round(0.25 * m.numel()) for m in masks.masks]
    assert all(not torch.equal(p[m], b[m]) for p, m, b in zip(masks.params, masks.masks, before))
