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
  blends; the step itself stays as written (see :mod:`lightning_prune.training.loss`);
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

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune._helpers import is_number
from lightning_prune.training.loss import ForwardCapture, TrainingLossMixin


def check_temperature(temperature: object) -> float:
    """``temperature`` as a float, or a ``ValueError`` unless it is a number > 0."""
    if not is_number(temperature) or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}.")
    return float(temperature)


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float, or a ``ValueError`` unless it is a number in [0, 1]."""
    if not is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"`alpha` must be a number in [0, 1] (the weight of the distillation term; the task loss gets "
            f"1 - alpha), got {alpha!r}."
        )
    return float(alpha)


def check_logits(student: object, teacher: object) -> None:
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
    check_logits(student_logits, teacher_logits)
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
    untouched. Regularization penalties (:class:`~lightning_prune.training.regularization.L1RegularizationMixin`) are
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
