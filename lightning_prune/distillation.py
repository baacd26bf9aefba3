"""Knowledge distillation from the dense model while pruning and fine-tuning.

At high sparsity, the pruned network recovers more of its accuracy when it also matches the softened outputs
of the dense one (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network"): the student's loss
becomes ``alpha · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 - alpha) · task loss``, with ``s`` and ``t`` the
student's and the teacher's logits and ``T`` the temperature (``T²`` keeps the term's gradients on the scale of
the task loss's).

Three pieces:

* :func:`kd_loss` and :func:`distillation_loss`, pure functions of logits, for any PyTorch loop;
* :class:`DistillationMixin`, placed before ``LightningModule`` in the bases, forms that loss inside the
  module. A Lightning callback cannot change the loss a ``training_step`` returns, so the module has to: the
  mixin records the inputs and output of the step's ``self(...)`` call, runs the teacher on the same inputs and
  blends; the step itself stays as written (see :mod:`lightning_prune.training_loss`);
* :class:`DistillationCallback` decides when and from what: it snapshots the dense model when pruning starts
  (or loads a teacher checkpoint, or takes a module) and hands it to the mixin for the pruning and fine-tuning
  epochs.

The teacher is never a submodule of the student: the callback owns it and the mixin keeps it in a plain
attribute that ``nn.Module`` does not register, so it is in neither ``parameters()`` (no optimizer sees it)
nor ``state_dict()`` (checkpoints of the model load strictly into a plain student), and is not copied with the
student (``copy.deepcopy``, pickling). It runs in eval mode, with ``requires_grad`` off and under
``torch.no_grad()``, on the student's device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune.training_loss import ForwardCapture, TrainingLossMixin

__all__ = [
    "DistillationCallback",
    "DistillationMixin",
    "KnowledgeDistillation",
    "check_alpha",
    "check_temperature",
    "distillation_loss",
    "kd_loss",
]


def check_temperature(temperature: object) -> float:
    """``temperature`` as a float, or a ``ValueError`` unless it is a number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}.")
    return float(temperature)


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float, or a ``ValueError`` unless it is a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"`alpha` must be a number in [0, 1] (the weight of the distillation term; the task loss gets "
            f"1 - alpha), got {alpha!r}."
        )
    return float(alpha)


def _check_logits(student: object, teacher: object) -> None:
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise TypeError(
            f"distillation compares logits tensors, got {type(student).__name__} from the student and "
            f"{type(teacher).__name__} from the teacher."
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"The teacher's outputs {tuple(teacher.shape)} do not match the student's {tuple(student.shape)}: "
            "distillation needs logits over the same classes for the same inputs."
        )


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T² · KL(softmax(t / T) ‖ softmax(s / T))`` over the last (class) dimension, averaged over the rest.

    Computed in float32 whatever the logits' dtype; the gradient flows to ``student_logits`` only.

    Example:
        >>> s = torch.tensor([[2.0, 0.0]])
        >>> float(kd_loss(s, s))
        0.0
        >>> round(float(kd_loss(torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), temperature=2.0)), 4)
        0.4438
    """
    temperature = check_temperature(temperature)
    _check_logits(student_logits, teacher_logits)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return kl.mean() * temperature**2


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, task_loss: Tensor, alpha: float = 0.5, temperature: float = 4.0
) -> Tensor:
    """``alpha · kd_loss(s, t, T) + (1 - alpha) · task_loss`` (Hinton et al., 2015).

    Example:
        >>> s, t = torch.zeros(1, 2), torch.tensor([[2.0, 0.0]])
        >>> round(float(distillation_loss(s, t, torch.tensor(1.0), alpha=0.25, temperature=2.0)), 4)
        0.8609
    """
    alpha = check_alpha(alpha)
    return alpha * kd_loss(student_logits, teacher_logits, temperature) + (1.0 - alpha) * task_loss


@dataclass(frozen=True)
class KnowledgeDistillation:
    """A teacher and how much it counts: what :meth:`DistillationMixin.set_teacher` stores.

    Not an ``nn.Module``, so a module holding it does not register the teacher as a submodule.

    Args:
        teacher: maps the student's inputs to logits shaped like the student's.
        alpha: weight of the distillation term, in [0, 1]; the task loss gets ``1 - alpha``.
        temperature: softens both distributions, > 0.
    """

    teacher: nn.Module
    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, nn.Module):
            raise TypeError(f"`teacher` must be a torch.nn.Module, got {type(self.teacher).__name__}.")
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "temperature", check_temperature(self.temperature))

    def teacher_outputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The teacher's outputs for the student's forward arguments: eval mode, no autograd."""
        if self.teacher.training:
            self.teacher.eval()
        with torch.no_grad():
            return self.teacher(*args, **kwargs)


class DistillationMixin(TrainingLossMixin):
    """Blends a teacher's distillation term into the loss a LightningModule's ``training_step`` returns.

    With a teacher set (:meth:`set_teacher`, usually by :class:`DistillationCallback`), every training step's
    loss becomes ``alpha · kd_loss(student, teacher, T) + (1 - alpha) · loss``, where ``student`` is the output
    of the step's single ``self(...)`` call and ``teacher`` the teacher's output for the same arguments; the
    term's epoch mean is logged as ``distill/kd``. Validation, testing and steps without a teacher are
    untouched. Regularization penalties (:class:`~lightning_prune.regularization.L1RegularizationMixin`) are
    added after the blend, at their full weight.

    The step must compute its logits with one call of ``self(...)`` (the module's ``forward``); a step that calls
    it several times or never fails with a ``RuntimeError`` naming the count.

    Example:
        >>> import torch.nn.functional as F
        >>> class Net(DistillationMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(4, 3)
        ...
        ...     def forward(self, x):
        ...         return self.net(x)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return F.cross_entropy(self(x), y)
        >>> student, batch = Net(), (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> student.set_teacher(nn.Linear(4, 3), alpha=0.5, temperature=2.0)
        >>> "teacher" in str(list(student.state_dict()))
        False
        >>> loss = student.training_step(batch, 0)  # 0.5 * kd + 0.5 * cross-entropy
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self, pl.LightningModule):
            raise TypeError(
                f"{type(self).__name__}: DistillationMixin is for LightningModules "
                "(`class Net(DistillationMixin, LightningModule)`); in a plain loop use `distillation_loss(...)`."
            )
        self._distillation: KnowledgeDistillation | None = None

    @property
    def distillation(self) -> KnowledgeDistillation | None:
        """The teacher in use with its weight and temperature, or ``None``."""
        return self.__dict__.get("_distillation")

    @property
    def teacher(self) -> nn.Module | None:
        """The teacher in use, or ``None``."""
        kd = self.distillation
        return None if kd is None else kd.teacher

    def set_teacher(self, teacher: nn.Module | None, alpha: float = 0.5, temperature: float = 4.0) -> None:
        """Distil from ``teacher`` from the next training step on (``None`` stops distilling).

        The teacher is put in eval mode with ``requires_grad`` off and moved to this module's device; it is
        kept outside the module tree (not a submodule, not in ``state_dict()``).

        Raises:
            ValueError: ``alpha`` outside [0, 1], ``temperature`` <= 0, or the teacher is this module.
            TypeError: ``teacher`` is not an ``nn.Module``.
        """
        if teacher is None:
            self._distillation = None
            return
        if teacher is self:
            raise ValueError("The teacher must be another module than the student (e.g. a copy of it).")
        kd = KnowledgeDistillation(teacher, alpha, temperature)
        module: Any = self
        teacher.eval().requires_grad_(False).to(module.device)
        self._distillation = kd

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[misc]
        state["_distillation"] = None  # copies and pickles of the student do not drag the teacher along
        return state

    def _captures_forward(self) -> bool:
        return super()._captures_forward() or self.distillation is not None

    def _blend_task_loss(self, loss: Tensor, forward: ForwardCapture | None) -> Tensor:
        loss = super()._blend_task_loss(loss, forward)
        kd = self.distillation
        if kd is None or forward is None:
            return loss
        if len(forward.calls) != 1:
            raise RuntimeError(
                f"DistillationMixin: the training step called {type(self).__name__}'s forward "
                f"{len(forward.calls)} times; distillation needs exactly one `self(inputs)` call that returns the "
                "logits to compare with the teacher's."
            )
        args, kwargs, student = forward.calls[0]
        teacher = kd.teacher_outputs(args, kwargs)
        term = kd_loss(student, teacher, kd.temperature)
        self._log_epoch_mean("distill/kd", term)
        return kd.alpha * term + (1.0 - kd.alpha) * loss


def _copy_module(module: pl.LightningModule) -> nn.Module:
    """A detached copy of ``module`` (no trainer, no teacher, no gradients) to serve as a teacher."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.grad = None
    return teacher.eval().requires_grad_(False)


class DistillationCallback(Callback):
    """Distil from the dense model during pruning and fine-tuning: the teacher's side of :class:`DistillationMixin`.

    By default the teacher is a snapshot of the model as it is when pruning starts: the end of the epoch before
    the first pruning epoch (the first epoch of every :class:`~lightning_prune.PruningCallback` in the Trainer),
    or the start of training when pruning starts at epoch 0. From that epoch on, the LightningModule (which must
    include :class:`DistillationMixin`) trains on ``alpha · T² · KL + (1 - alpha) · task loss``. The snapshot is kept in
    this callback's checkpoint state, so a resumed run distils from the same teacher; the model's own
    ``state_dict`` never holds it.

    Args:
        alpha: weight of the distillation term, in [0, 1] (the task loss gets ``1 - alpha``).
        temperature: softmax temperature ``T`` > 0 (Hinton et al. used 1-20; 4 is common for small networks).
        teacher: ``None`` for the snapshot of the dense model; a path to a checkpoint of the same architecture
            (a Lightning checkpoint or a plain state dict), loaded into a copy of the student; or any
            ``nn.Module`` that maps the student's inputs to logits of the same shape.
        start_epoch: the first epoch with distillation; ``None`` means when pruning starts (0 with a given
            teacher and no pruning callback).

    Raises:
        MisconfigurationException: ``alpha`` outside [0, 1], ``temperature`` <= 0, a module without
            :class:`DistillationMixin`, no epoch to start at, a checkpoint that does not fit the student, or a
            teacher whose outputs do not match the student's on its ``example_input_array``.

    Example:
        >>> from lightning_prune import PruningCallback
        >>> pruning = PruningCallback(sparsity=0.95, schedule="one_shot", start_epoch=10, finetune_lr_scale=0.1)
        >>> callbacks = [pruning, DistillationCallback(alpha=0.5, temperature=4.0)]
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 4.0,
        teacher: nn.Module | str | Path | None = None,
        start_epoch: int | None = None,
    ) -> None:
        super().__init__()
        try:
            self.alpha = check_alpha(alpha)
            self.temperature = check_temperature(temperature)
        except ValueError as err:
            raise MisconfigurationException(f"DistillationCallback: {err}") from err
        bad_start = isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0
        if start_epoch is not None and bad_start:
            raise MisconfigurationException(
                f"DistillationCallback: `start_epoch` must be an integer >= 0 or None (when pruning starts), "
                f"got {start_epoch!r}."
            )
        if teacher is not None and not isinstance(teacher, (nn.Module, str, Path)):
            raise MisconfigurationException(
                "DistillationCallback: `teacher` must be None (a snapshot of the dense model), a checkpoint path "
                f"or an nn.Module, got {type(teacher).__name__}."
            )
        self._teacher_spec = teacher
        self.start_epoch = start_epoch
        #: The teacher once it exists (snapshot, loaded checkpoint or the given module).
        self.teacher: nn.Module | None = teacher if isinstance(teacher, nn.Module) else None
        self._start: int | None = start_epoch
        self._pending: dict[str, Tensor] | None = None

    @property
    def _snapshots(self) -> bool:
        return self._teacher_spec is None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, DistillationMixin):
            raise MisconfigurationException(
                f"DistillationCallback needs the LightningModule to include DistillationMixin, which forms the loss: "
                f"`class {type(pl_module).__name__}(DistillationMixin, LightningModule)`."
            )
        if self.start_epoch is not None:
            self._start = self.start_epoch
            return
        from lightning_prune.callbacks import PruningCallback

        starts = [cb.schedule.start_epoch for cb in trainer.callbacks if isinstance(cb, PruningCallback)]  # type: ignore[attr-defined]
        if starts:
            self._start = min(starts)
        elif not self._snapshots:
            self._start = 0
        else:
            raise MisconfigurationException(
                "DistillationCallback snapshots the dense model when pruning starts, but the Trainer has no "
                "PruningCallback: set `start_epoch`, or pass a `teacher`."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None:  # set in setup
            return
        epoch = trainer.current_epoch
        if self._pending is not None:
            self.teacher = _copy_module(pl_module)
            self.teacher.load_state_dict(self._pending)
            self._pending = None
        elif isinstance(self._teacher_spec, (str, Path)) and self.teacher is None:
            self.teacher = self._load_checkpoint(pl_module, Path(self._teacher_spec))
        elif self._teacher_spec is None and self.teacher is None and epoch >= self._start:
            if epoch > self._start:
                rank_zero_warn(
                    f"DistillationCallback: resumed at epoch {epoch}, after pruning started (epoch {self._start}), "
                    "from a checkpoint without the teacher; the teacher is the current, pruned model."
                )
            self._snapshot(pl_module, epoch)
        if isinstance(self._teacher_spec, nn.Module):
            self._check_outputs(pl_module, self._teacher_spec)
        if epoch >= self._start:
            self._activate(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None and trainer.current_epoch >= self._start:
            if self.teacher is None:
                self._snapshot(pl_module, trainer.current_epoch)
            self._activate(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Nothing changes the weights between this and the next epoch's start, when pruning begins: snapshotting
        # here does not depend on the order of the callbacks.
        before_start = self._start is not None and trainer.current_epoch == self._start - 1
        if self._snapshots and self.teacher is None and before_start:
            self._snapshot(pl_module, trainer.current_epoch + 1)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(pl_module, DistillationMixin):
            pl_module.set_teacher(None)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return {"teacher": self._pending}
        if self._snapshots and self.teacher is not None:
            return {"teacher": self.teacher.state_dict()}
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        teacher = state_dict.get("teacher")
        if teacher is not None and self._snapshots:
            self._pending = teacher

    # ------------------------------------------------------------------ helpers
    def _snapshot(self, pl_module: pl.LightningModule, epoch: int) -> None:
        self.teacher = _copy_module(pl_module)
        rank_zero_info(f"DistillationCallback: the teacher is a snapshot of the model at the start of epoch {epoch}.")

    def _activate(self, pl_module: pl.LightningModule) -> None:
        mixin: Any = pl_module
        if self.teacher is not None and mixin.teacher is not self.teacher:
            mixin.set_teacher(self.teacher, self.alpha, self.temperature)

    def _load_checkpoint(self, pl_module: pl.LightningModule, path: Path) -> nn.Module:
        if not path.is_file():
            raise MisconfigurationException(f"DistillationCallback: no teacher checkpoint at {str(path)!r}.")
        try:
            checkpoint = torch.load(path, map_location=pl_module.device, weights_only=True)
        except Exception as err:
            raise MisconfigurationException(
                f"DistillationCallback could not read the teacher checkpoint {str(path)!r} ({err}). Pass the teacher "
                "as a module instead, e.g. `teacher=MyModule.load_from_checkpoint(path)`."
            ) from err
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise MisconfigurationException(
                f"DistillationCallback: {str(path)!r} holds no state dict (a Lightning checkpoint or a state_dict)."
            )
        teacher = _copy_module(pl_module)
        try:
            teacher.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise MisconfigurationException(
                f"DistillationCallback: the teacher checkpoint {str(path)!r} does not fit {type(pl_module).__name__}: "
                f"{err}. For another architecture, pass the teacher module itself."
            ) from err
        return teacher

    def _check_outputs(self, pl_module: pl.LightningModule, teacher: nn.Module) -> None:
        """Compare the teacher's and the student's outputs on the module's ``example_input_array``, if any."""
        example = pl_module.example_input_array
        if example is None:
            return  # checked on the first distilled step instead
        from lightning.pytorch.utilities import move_data_to_device

        example = move_data_to_device(example, pl_module.device)
        was_training = pl_module.training
        teacher.eval().to(pl_module.device)
        pl_module.eval()
        try:
            with torch.no_grad():
                args = example if isinstance(example, tuple) else (example,)
                _check_logits(pl_module(*args), teacher(*args))
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"DistillationCallback: {err}") from err
        finally:
            pl_module.train(was_training)
