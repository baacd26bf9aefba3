"""Penalties against hand-computed values and gradients; the mixin's loss through real Trainer steps."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _checks import tiny_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import (
    BNSlimmingMixin,
    GroupLassoMixin,
    L1RegularizationMixin,
    bn_parameters,
    bn_slimming_penalty,
    group_lasso_penalty,
    l1_penalty,
    regularized_parameters,
)
from lightning_prune.models import MLP, ImageClassifier

LR = 0.1


# --------------------------------------------------------------------------------------------- pure penalties
def test_l1_penalty_value_and_gradient():
    a = torch.tensor([1.0, -2.0, 0.0], requires_grad=True)
    b = torch.tensor([[0.5, -0.25]], requires_grad=True)
    value = l1_penalty([a, b])
    assert value.item() == pytest.approx(1 + 2 + 0 + 0.5 + 0.25)
    value.backward()
    assert a.grad.tolist() == [1.0, -1.0, 0.0]  # sign(w); a weight at zero (pruned) gets no push
    assert b.grad.tolist() == [[1.0, -1.0]]


def test_group_lasso_penalty_value_and_gradient():
    # A conv weight of 3 output channels, each 2 entries: norms 5, 0 (a pruned channel) and 1.
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -1.0]]).reshape(3, 2, 1, 1).requires_grad_()
    v = torch.tensor([-2.0, 0.5], requires_grad=True)  # 1-D: one-entry channels, i.e. its L1 norm
    value = group_lasso_penalty([w, v])
    assert value.item() == pytest.approx(5 + 0 + 1 + 2 + 0.5)
    value.backward()
    expected = torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]]).reshape(3, 2, 1, 1)  # w_c / ||w_c||, 0 at 0
    assert torch.allclose(w.grad, expected)
    assert torch.isfinite(w.grad).all()
    assert v.grad.tolist() == [-1.0, 1.0]


def test_bn_slimming_penalty_is_l1_over_the_batchnorm_scales():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3, affine=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([-0.5, 2.0, 0.0]))
    params = bn_parameters(net)
    assert list(params) == ["1.weight"]  # no scale on the affine=False layer, no conv weight
    value = bn_slimming_penalty(params.values())
    assert value.item() == pytest.approx(2.5)
    value.backward()
    assert net[1].weight.grad.tolist() == [-1.0, 1.0, 0.0]
    assert net[0].weight.grad is None


def test_selection_per_kind_and_ignore():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    assert list(regularized_parameters(net, "l1")) == ["0.weight", "3.weight"]
    assert list(regularized_parameters(net, "group_lasso", ignore=["3"])) == ["0.weight"]
    assert list(regularized_parameters(net, "bn_slimming")) == ["1.weight"]
    with pytest.raises(ValueError, match="`ignore` pattern 'head' matches no module of Sequential"):
        regularized_parameters(net, "l1", ignore=["head"])
    with pytest.raises(ValueError, match="has no BatchNorm layer with a learnable scale"):
        bn_parameters(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"`kind` must be one of \['bn_slimming', 'group_lasso', 'l1'\], got 'l2'"):
        regularized_parameters(net, "l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="l1_penalty needs at least one tensor"):
        l1_penalty([])


# --------------------------------------------------------------------------------------------- the mixin
class Task(pl.LightningModule):
    """Conv-BN-Linear with plain SGD (no momentum, no decay): one step moves w by -LR * grad exactly."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(3 * 4 * 4, 3)
        self.val_losses: list[float] = []

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_losses.append(float(self.training_step(batch, batch_idx)))  # a common shortcut

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class L1Task(L1RegularizationMixin, Task):
    pass


class GroupLassoTask(GroupLassoMixin, Task):
    pass


class BNTask(BNSlimmingMixin, Task):
    pass


class DictTask(L1RegularizationMixin, Task):
    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx), "note": 1}  # nested: added once, outside


def data(n: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def fit(tmp_path: Path, module: pl.LightningModule, batch_size: int = 8, n: int = 8, **kwargs) -> pl.Trainer:
    trainer = tiny_trainer(tmp_path, kwargs.pop("callbacks", []), kwargs.pop("max_epochs", 1), **kwargs)
    trainer.fit(module, DataLoader(data(n), batch_size=batch_size), DataLoader(data(4, seed=1), batch_size=4))
    return trainer


PENALTY_FUNCTIONS = {"l1": l1_penalty, "group_lasso": group_lasso_penalty, "bn_slimming": bn_slimming_penalty}


def penalty_of(module: nn.Module, kind: str) -> torch.Tensor:
    """The penalty of ``kind`` over ``module``'s selection for it, computed with the pure functions."""
    return PENALTY_FUNCTIONS[kind](regularized_parameters(module, kind).values())  # type: ignore[arg-type]


def reference_step(kind: str, lam: float, groups: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """The weights after one SGD step on the mean over ``groups`` of each group's mean cross-entropy (micro-batches
    or DDP ranks; one group of all 8 samples by default) plus ``lam * penalty``, by hand."""
    net = Task()
    x, y = data().tensors
    groups = groups or [list(range(len(y)))]
    for group in groups:
        (F.cross_entropy(net(x[group]), y[group]) / len(groups)).backward()
    (lam * penalty_of(net, kind)).backward()
    return {k: (p - LR * p.grad if p.grad is not None else p).detach() for k, p in net.named_parameters()}


def assert_weights(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, param in module.named_parameters():
        assert torch.allclose(param.detach(), expected[name], atol=1e-6), name


@pytest.mark.parametrize(
    ("cls", "kind", "lam"),
    [(L1Task, "l1", 0.01), (GroupLassoTask, "group_lasso", 0.05), (BNTask, "bn_slimming", 0.2), (DictTask, "l1", 0.01)],
    ids=["l1", "group_lasso", "bn_slimming", "dict-output-nested-super"],
)
def test_one_trainer_step_follows_the_penalised_gradient(tmp_path, cls, kind, lam):
    module = cls(reg_lambda=lam)
    assert module.reg_kind == kind
    trainer = fit(tmp_path, module, max_steps=1, limit_val_batches=0)
    assert_weights(module, reference_step(kind, lam))
    # Logged: the term added to the loss, at the weights the step started from.
    logged = float(trainer.callback_metrics[f"reg/{kind}"])
    assert logged == pytest.approx(lam * penalty_of(Task(), kind).item(), rel=1e-5)


def test_the_penalty_is_added_once_through_nested_wrapped_steps(tmp_path):
    class Outer(L1Task):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1.0  # L1Task's step is wrapped too

    module = Outer(reg_lambda=0.01)
    fit(tmp_path, module, max_steps=1, limit_val_batches=0)
    assert_weights(module, reference_step("l1", 0.01))


def test_the_logged_value_is_the_epoch_mean_of_the_added_term(tmp_path):
    seen: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.regularization_penalty().item())  # the term this step adds

    module = GroupLassoTask(reg_lambda=0.5)
    trainer = fit(tmp_path, module, batch_size=4, n=12, limit_val_batches=0, callbacks=[Record()])
    assert len(seen) == 3 and seen[0] > seen[1] > seen[2]  # lambda 0.5 shrinks the rows step by step
    assert float(trainer.callback_metrics["reg/group_lasso"]) == pytest.approx(sum(seen) / 3, rel=1e-5)


def test_gradient_accumulation_adds_the_penalty_once_per_optimizer_step(tmp_path):
    module = L1Task(reg_lambda=0.01)
    fit(tmp_path, module, batch_size=4, accumulate_grad_batches=2, max_steps=1, limit_val_batches=0)
    # Each micro-batch's loss / 2, and lam * sign(w) once in total.
    assert_weights(module, reference_step("l1", 0.01, groups=[[0, 1, 2, 3], [4, 5, 6, 7]]))


def test_no_penalty_in_validation_or_outside_the_stop_epoch(tmp_path):
    module = L1Task(reg_lambda=10.0)  # huge: any leak into validation would show
    fit(tmp_path, module, max_epochs=1, limit_val_batches=1)
    net = Task()
    net.load_state_dict(module.state_dict())  # the weights validation saw, after the training step
    x, y = data(4, seed=1).tensors
    net.eval()
    with torch.no_grad():
        plain = F.cross_entropy(net(x), y).item()
    assert module.val_losses == [pytest.approx(plain, rel=1e-5)]

    stopped = L1Task(reg_lambda=0.01, reg_stop_epoch=0)
    trainer = fit(tmp_path, stopped, max_steps=1, limit_val_batches=0)
    assert "reg/l1" not in trainer.callback_metrics
    assert_weights(stopped, reference_step("l1", 0.0))


def test_warmup_and_stop_schedule_lambda_by_epoch(tmp_path):
    module = L1Task(reg_lambda=0.2, reg_warmup_epochs=2, reg_stop_epoch=3)
    assert [module.regularization_strength(e) for e in range(4)] == [0.0, 0.1, 0.2, 0.0]
    seen = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics.get("reg/l1", -1.0)))

    fit(tmp_path, module, max_epochs=4, limit_val_batches=0, callbacks=[Record()])
    assert seen[0] == -1.0 and seen[1] > 0 and seen[2] > seen[1]  # nothing in epoch 0; lambda doubles
    assert len(seen) == 4


def test_image_classifier_is_off_by_default_and_takes_the_arguments():
    module = ImageClassifier(MLP(hidden=(8,)))
    assert module.reg_lambda == 0.0 and module.regularization_strength() == 0.0
    regularised = ImageClassifier(MLP(hidden=(8,)), reg_kind="group_lasso", reg_lambda=1e-3, reg_ignore=["head"])
    assert list(regularised.regularized_parameters()) == ["model.features.1.weight"]
    assert regularised.hparams["reg_kind"] == "group_lasso" and regularised.hparams["reg_lambda"] == 1e-3
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    regularised.train()
    loss = regularised.training_step((x, y), 0)  # no Trainer: the module's train mode decides
    plain = F.cross_entropy(regularised(x), y)
    w = regularised.model.features[1].weight
    assert loss.item() == pytest.approx((plain + 1e-3 * w.norm(dim=1).sum()).item(), rel=1e-6)
    regularised.eval()
    assert regularised.training_step((x, y), 0).item() == pytest.approx(plain.item(), rel=1e-6)

    class Slimmed(BNSlimmingMixin, ImageClassifier):  # a sibling mixin sets the kind of a subclass
        pass

    assert Slimmed(MLP(hidden=(8,))).reg_kind == "bn_slimming"


def test_manual_optimisation_leaves_the_loss_alone():
    class Manual(L1Task):
        def __init__(self):
            super().__init__(reg_lambda=1.0)
            self.automatic_optimization = False

    module = Manual()
    x, y = data(4).tensors
    plain = F.cross_entropy(module(x), y)
    assert module.training_step((x, y), 0).item() == pytest.approx(plain.item())
    assert module.regularization_penalty().item() == pytest.approx(penalty_of(module, "l1").item())


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reg_lambda": -0.1}, ValueError, r"`reg_lambda` \(λ\) must be a number >= 0, got -0.1"),
        ({"reg_lambda": True}, ValueError, r"`reg_lambda` \(λ\) must be a number >= 0, got True"),
        ({"reg_kind": "l2"}, ValueError, r"`reg_kind` must be one of \['bn_slimming', 'group_lasso', 'l1'\]"),
        ({"reg_warmup_epochs": -1}, ValueError, r"`reg_warmup_epochs` must be an integer >= 0, got -1"),
        ({"reg_stop_epoch": 1.5}, ValueError, r"`reg_stop_epoch` must be an integer >= 0 or None, got 1.5"),
        ({"reg_ignore": [""]}, ValueError, r"`reg_ignore` must be a list of module-name patterns"),
        ({"reg_params": 3}, TypeError, r"`reg_params` must be a function of the module or None"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        L1Task(**kwargs)


def test_mixin_after_lightning_module_fails_at_class_creation():
    with pytest.raises(TypeError, match=r"L1RegularizationMixin must come before LightningModule in the bases of Late"):

        class Late(pl.LightningModule, L1RegularizationMixin):
            pass

    with pytest.raises(TypeError, match=r"GroupLassoMixin must come before LightningModule"):

        class LateSibling(Task, GroupLassoMixin):
            pass


def test_other_misuse_fails_clearly(tmp_path):
    with pytest.raises(TypeError, match=r"combines regularization mixins of different kinds \['bn_slimming', 'group"):

        class Both(GroupLassoMixin, BNSlimmingMixin, pl.LightningModule):
            pass

    class Plain(L1RegularizationMixin, nn.Module):
        pass

    with pytest.raises(TypeError, match="L1RegularizationMixin is for LightningModules"):
        Plain()
    with pytest.raises(ValueError, match="`ignore` pattern 'classifier' matches no module of L1Task"):
        fit(tmp_path, L1Task(reg_ignore=["classifier"], reg_warmup_epochs=3), max_steps=1)
    mlp = ImageClassifier(MLP(input_shape=(1, 4, 4), num_classes=3, hidden=(4,)), 3, reg_kind="bn_slimming")
    mlp.reg_lambda = 1e-3
    with pytest.raises(ValueError, match="ImageClassifier has no BatchNorm layer with a learnable scale"):
        fit(tmp_path, mlp, max_steps=1)


class DDPTask(L1Task):
    def train_dataloader(self):
        # Rank r trains on samples r, r + 2, ...: built here, in each process, once the process group exists.
        sampler = torch.utils.data.DistributedSampler(data(), shuffle=False)
        return DataLoader(data(), batch_size=4, sampler=sampler)


@pytest.mark.slow
def test_ddp_gives_the_single_process_update(tmp_path):
    module = DDPTask(reg_lambda=0.01)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    # DDP averages the two ranks' gradients, the penalty's (the same on both) included: lambda * sign(w) once.
    assert_weights(module, reference_step("l1", 0.01, groups=[[0, 2, 4, 6], [1, 3, 5, 7]]))
