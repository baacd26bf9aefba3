"""Distillation: the loss against hand-computed values, the teacher kept out of the student, the dense snapshot
taken when pruning starts, resumed from checkpoints, and every bad input."""

import copy
import math
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

from lightning_prune import DistillationCallback, DistillationMixin, PruningCallback, distillation_loss, kd_loss


# --------------------------------------------------------------------------------------------- pure losses
def test_kd_loss_value_and_gradient_by_hand():
    s = torch.tensor([[0.0, 0.0], [1.0, -1.0]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0], [0.0, 0.0]], requires_grad=True)
    temperature = 2.0

    def softmax(row):
        e = [math.exp(v / temperature) for v in row]
        return [v / sum(e) for v in e]

    kls, grads = [], []
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(srow), softmax(trow)
        kls.append(sum(b * math.log(b / a) for a, b in zip(ps, pt)))
        grads.append([temperature * (a - b) / 2 for a, b in zip(ps, pt)])  # T^2 * (p_s - p_t) / T, mean of 2 rows
    value = kd_loss(s, t, temperature)
    assert value.item() == pytest.approx(temperature**2 * sum(kls) / 2, rel=1e-6)
    value.backward()
    assert s.grad.tolist() == [pytest.approx(row, rel=1e-5) for row in grads]
    assert t.grad is None  # the teacher's logits are a target, never trained
    assert kd_loss(t, t.detach(), 3.0).item() == pytest.approx(0.0, abs=1e-7)
    blended = distillation_loss(s, t, torch.tensor(2.0), alpha=0.25, temperature=temperature)
    assert blended.item() == pytest.approx(0.25 * value.item() + 0.75 * 2.0, rel=1e-6)


# --------------------------------------------------------------------------------------------- the mixin
class Student(DistillationMixin, pl.LightningModule):
    def __init__(self, seed: int = 0, out: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, out)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_mixin_blends_the_loss_and_keeps_the_teacher_out_of_the_student():
    student, teacher = Student(), Student(seed=1)
    keys, n_params = list(student.state_dict()), len(list(student.parameters()))
    teacher.train()
    stats = teacher.body[1].running_mean.clone()
    student.set_teacher(teacher, alpha=0.3, temperature=2.0)
    assert student.teacher is teacher and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert list(student.state_dict()) == keys and len(list(student.parameters())) == n_params
    assert teacher not in list(student.modules())
    assert copy.deepcopy(student).teacher is None  # copies (e.g. for compaction) leave the teacher behind

    x, y = batch()
    student.train()
    loss = student.training_step((x, y), 0)
    logits = student(x)
    with torch.no_grad():
        target = teacher.eval()(x)
    expected = 0.3 * kd_loss(logits, target, 2.0) + 0.7 * F.cross_entropy(logits, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert torch.equal(teacher.body[1].running_mean, stats)  # ran in eval mode
    student.eval()  # validation: the plain task loss
    assert student.training_step((x, y), 0).item() == pytest.approx(F.cross_entropy(student(x), y).item())
    student.set_teacher(None)
    student.train()
    assert student.training_step((x, y), 0).item() == pytest.approx(F.cross_entropy(student(x), y).item())


# --------------------------------------------------------------------------------------------- the callback
def loader() -> DataLoader:
    return DataLoader(TensorDataset(*batch(16)), batch_size=8)


def fit(tmp_path: Path, module, callbacks, max_epochs: int, ckpt_path=None, **kwargs) -> pl.Trainer:
    trainer = tiny_trainer(tmp_path, callbacks, max_epochs, **kwargs)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


class Record(Callback):
    """The weights at the end of every epoch, and whether ``distill/kd`` was logged in it."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.distilled: dict[int, bool] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.distilled[trainer.current_epoch] = "distill/kd" in trainer.callback_metrics


def pruning() -> PruningCallback:
    return PruningCallback(sparsity=0.8, schedule="one_shot", start_epoch=2)


def test_the_teacher_is_the_dense_model_when_pruning_starts_and_stays_out_of_checkpoints(tmp_path):
    student, record = Student(), Record()
    distillation = DistillationCallback(alpha=0.5, temperature=4.0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, student, [pruning(), distillation, record, ckpt], 4, enable_checkpointing=True)

    dense = record.weights[1]  # the end of epoch 1: nothing changes the weights before pruning at epoch 2
    teacher = distillation.teacher
    assert teacher is not None and not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, dense[key]), key
    assert int((teacher.body[0].weight == 0).sum()) == 0 < int((student.body[0].weight == 0).sum())
    assert record.distilled == {0: False, 1: False, 2: True, 3: True}
    assert student.teacher is None  # released after fitting

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == set(Student().state_dict())  # no teacher.* entries
    Student().load_state_dict(saved["state_dict"], strict=True)
    assert set(Student.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", strict=True).state_dict()) == set(
        saved["state_dict"]
    )
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("DistillationCallback"))
    assert set(state["teacher"]) == set(saved["state_dict"])  # the snapshot, for resuming


def test_pruning_at_epoch_zero_distils_from_the_model_it_starts_with(tmp_path):
    student = Student()
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    distillation = DistillationCallback()
    fit(tmp_path, student, [PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=0), distillation], 1)
    for key, value in distillation.teacher.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_resumed_run_distils_from_the_same_teacher_as_an_uninterrupted_one(tmp_path):
    full, full_kd = Student(), DistillationCallback()
    fit(tmp_path / "a", full, [pruning(), full_kd], 5)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "b", Student(), [pruning(), DistillationCallback(), ckpt], 3, enable_checkpointing=True)
    resumed, resumed_kd = Student(seed=5), DistillationCallback()  # other initial weights: all come from the ckpt
    fit(tmp_path / "c", resumed, [pruning(), resumed_kd], 5, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for key, value in full_kd.teacher.state_dict().items():
        assert torch.equal(value, resumed_kd.teacher.state_dict()[key]), key
    for key, value in full.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key


def test_a_teacher_from_a_checkpoint_or_a_module(tmp_path):
    dense = Student(seed=3)
    torch.save(dense.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": dense.state_dict(), "epoch": 7}, tmp_path / "lightning.ckpt")
    for name in ("plain.pt", "lightning.ckpt"):
        distillation = DistillationCallback(teacher=str(tmp_path / name))  # no pruning: from epoch 0
        record = Record()
        fit(tmp_path, Student(), [distillation, record], 1)
        assert record.distilled == {0: True}
        for key, value in distillation.teacher.state_dict().items():
            assert torch.equal(value, dense.state_dict()[key]), key

    other = Student(seed=4)
    distillation = DistillationCallback(teacher=other, alpha=1.0)
    fit(tmp_path, Student(), [pruning(), distillation], 3)
    assert distillation.teacher is other and not other.training
    assert not any(p.requires_grad for p in other.parameters())


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, r"`alpha` must be a number in \[0, 1\] .*got -0.1"),
        ({"alpha": 1.5}, r"`alpha` must be a number in \[0, 1\] .*got 1.5"),
        ({"alpha": True}, r"`alpha` must be a number in \[0, 1\] .*got True"),
        ({"temperature": 0}, r"`temperature` must be a number > 0, got 0"),
        ({"temperature": -2.0}, r"`temperature` must be a number > 0, got -2.0"),
        ({"start_epoch": -1}, r"`start_epoch` must be an integer >= 0 or None .*got -1"),
        ({"teacher": 3}, r"`teacher` must be None .*, a checkpoint path or an nn.Module, got int"),
    ],
)
def test_bad_callback_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        DistillationCallback(**kwargs)


def test_bad_teacher_arguments_of_the_mixin_and_the_losses():
    student = Student()
    with pytest.raises(ValueError, match=r"`alpha` must be a number in \[0, 1\]"):
        student.set_teacher(Student(seed=1), alpha=2.0)
    with pytest.raises(ValueError, match=r"`temperature` must be a number > 0, got 0\.0"):
        student.set_teacher(Student(seed=1), temperature=0.0)
    with pytest.raises(ValueError, match="The teacher must be another module than the student"):
        student.set_teacher(student)
    with pytest.raises(TypeError, match=r"`teacher` must be a torch\.nn\.Module, got str"):
        student.set_teacher("teacher.ckpt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`temperature` must be a number > 0, got -1"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=-1)
    with pytest.raises(ValueError, match=r"The teacher's outputs \(1, 3\) do not match the student's \(1, 2\)"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 3))


def test_teachers_whose_outputs_do_not_match_fail_clearly(tmp_path):
    wrong = Student(out=5)
    with pytest.raises(ValueError, match=r"The teacher's outputs \(8, 5\) do not match the student's \(8, 3\)"):
        fit(tmp_path, Student(), [DistillationCallback(teacher=wrong, start_epoch=0)], 1)

    with_example = Student()
    with_example.example_input_array = torch.zeros(2, 16)  # checked before the first step
    with pytest.raises(MisconfigurationException, match=r"outputs \(2, 5\) do not match the student's \(2, 3\)"):
        fit(tmp_path, with_example, [DistillationCallback(teacher=wrong, start_epoch=0)], 1)

    torch.save(Student(out=5).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(MisconfigurationException, match=r"the teacher checkpoint .*wide.pt' does not fit Student"):
        fit(tmp_path, Student(), [DistillationCallback(teacher=tmp_path / "wide.pt")], 1)
    with pytest.raises(MisconfigurationException, match=r"no teacher checkpoint at .*missing.pt'"):
        fit(tmp_path, Student(), [DistillationCallback(teacher=tmp_path / "missing.pt")], 1)


def test_misuse_fails_clearly(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(16, 3)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(MisconfigurationException, match="needs the LightningModule to include DistillationMixin"):
        fit(tmp_path, Plain(), [pruning(), DistillationCallback()], 1)
    with pytest.raises(MisconfigurationException, match="the Trainer has no PruningCallback: set `start_epoch`"):
        fit(tmp_path, Student(), [DistillationCallback()], 1)

    class Twice(Student):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y) + F.cross_entropy(self(x + 1), y)

    with pytest.raises(RuntimeError, match="called Twice's forward 2 times; distillation needs exactly one"):
        fit(tmp_path, Twice(), [DistillationCallback(start_epoch=0)], 1)

    with pytest.raises(TypeError, match="DistillationMixin must come before LightningModule in the bases of Late"):

        class Late(pl.LightningModule, DistillationMixin):
            pass
