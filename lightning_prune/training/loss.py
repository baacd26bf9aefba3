"""The base of the mixins that change the loss a LightningModule's ``training_step`` returns.

A Lightning callback cannot change that loss (``on_before_backward`` sees it, read-only, after the step), so
penalties (:mod:`lightning_prune.training.regularization`) and distillation
(:mod:`lightning_prune.training.distillation`) reach it from inside the module, as mixins placed before
``LightningModule`` in the bases::

    class Net(L1RegularizationMixin, LightningModule): ...

At class creation, :class:`TrainingLossMixin` wraps the ``training_step`` of every subclass (its own, or the one
it inherits from a base that is not such a mixin), so the user's ``training_step`` stays as written. The
wrapper changes the loss only

* on the outermost call: a ``super().training_step(...)`` inside a subclass's step is left alone, so nothing
  is added twice;
* while the Trainer trains (``trainer.training``; without a Trainer, while the module is in train mode): a
  ``validation_step`` that calls ``self.training_step`` gets the plain task loss;
* under automatic optimisation (with ``automatic_optimization = False`` the mixins' terms are available as
  methods, e.g. ``regularization_penalty()``, to add before ``manual_backward``).

The loss is the step's tensor or the ``"loss"`` entry of its dict (a new dict is returned; ``None``, a skipped
batch, stays ``None``). Two phases, in this order, whatever the order of the mixins in the bases: first
:meth:`TrainingLossMixin._blend_task_loss` (distillation replaces the task loss by its blend with the teacher
term), then :meth:`TrainingLossMixin._add_loss_terms` (regularization adds its penalty, unscaled by the
blend). Because the terms are part of the loss the step returns, Lightning's division by
``accumulate_grad_batches`` and DDP's gradient averaging treat them exactly as the task loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

_WRAPPED = "__lightning_prune_training_loss__"


class ForwardCapture:
    """Records the inputs and output of every call of ``module``'s own forward while it is open.

    Calls of submodules are not recorded, only those of ``module`` itself (``self(x)`` in a training step).

    Example:
        >>> net = nn.Linear(2, 3)
        >>> with ForwardCapture(net) as capture:
        ...     _ = net(torch.zeros(4, 2))
        >>> len(capture.calls), tuple(capture.calls[0][2].shape)
        (1, (4, 3))
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []
        self._handle: Any = None

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self.calls.append((args, kwargs, output))

    def __enter__(self) -> ForwardCapture:
        self._handle = self.module.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class TrainingLossMixin:
    """Wraps every ``training_step`` of a subclass so that mixins can change the loss it returns.

    Subclasses override :meth:`_blend_task_loss` and/or :meth:`_add_loss_terms` (calling ``super()``), and
    :meth:`_captures_forward` when they need the student's forward inputs and output. A subclass that puts
    ``LightningModule`` before such a mixin in its bases fails at class creation with a ``TypeError``:
    ``LightningModule`` would shadow the mixin's ``__init__`` and hooks.

    Example:
        >>> class Plus1(TrainingLossMixin):
        ...     def _add_loss_terms(self, loss):
        ...         return super()._add_loss_terms(loss) + 1
        >>> class Net(Plus1, pl.LightningModule):
        ...     def training_step(self, batch, batch_idx):
        ...         return batch.sum()
        >>> float(Net().training_step(torch.ones(3), 0))
        4.0
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_bases(cls)
        # The step the class will run, its own or inherited (`class Net(L1RegularizationMixin, MyModule)` inherits
        # MyModule's): wrap it unless that is done already or it is LightningModule's placeholder.
        step = getattr(cls, "training_step", None)
        if callable(step) and not getattr(step, _WRAPPED, False) and step is not pl.LightningModule.training_step:
            cls.training_step = _wrap_training_step(step)  # type: ignore[attr-defined]

    def _changes_training_loss(self) -> bool:
        """True while the loss of this step should get the mixins' terms (see the module docstring)."""
        module: Any = self
        if not getattr(module, "automatic_optimization", True):
            return False
        trainer = getattr(module, "_trainer", None)
        if trainer is not None:
            return bool(trainer.training)
        return bool(module.training)

    def _captures_forward(self) -> bool:
        """Whether this step's calls of ``self(...)`` must be recorded for :meth:`_blend_task_loss`."""
        return False

    def _blend_task_loss(self, loss: torch.Tensor, forward: ForwardCapture | None) -> torch.Tensor:
        """Phase 1: replace the task loss (e.g. by a blend with a distillation term)."""
        return loss

    def _add_loss_terms(self, loss: torch.Tensor) -> torch.Tensor:
        """Phase 2: add terms that do not depend on the batch (e.g. a weight penalty)."""
        return loss

    def _log_epoch_mean(self, name: str, value: torch.Tensor) -> None:
        """Log ``name`` as the mean of ``value`` over the epoch's training steps, once, on its last batch.

        ``self.log`` on every step costs about 0.3 ms on a 2-core CPU, as much as the penalty itself; summing a
        detached scalar costs microseconds. An epoch cut short (``max_steps``, ``max_time``) logs nothing.
        """
        module: Any = self
        trainer = module._trainer
        if trainer is None:
            return
        sums: dict[str, list[Any]] = self.__dict__.setdefault("_lp_epoch_sums", {})
        entry = sums.get(name)
        if entry is None or entry[0] != trainer.current_epoch:
            entry = sums[name] = [trainer.current_epoch, value.detach(), 1]
        else:
            entry[1] = entry[1] + value.detach()
            entry[2] += 1
        if trainer.is_last_batch:
            # Once per epoch, so averaging over DDP ranks costs nothing worth counting (the distillation term
            # differs between ranks; a penalty does not).
            module.log(name, entry[1] / entry[2], on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
            del sums[name]


def _check_bases(cls: type) -> None:
    mro = cls.__mro__
    if pl.LightningModule not in mro:
        return
    late = [c for c in mro[mro.index(pl.LightningModule) + 1 :] if issubclass(c, TrainingLossMixin)]
    if late:
        name = late[0].__name__
        raise TypeError(
            f"{name} must come before LightningModule in the bases of {cls.__name__}, e.g. "
            f"`class {cls.__name__}({name}, LightningModule)`: placed after it, LightningModule's own __init__ "
            f"and hooks shadow the mixin's and it cannot take effect."
        )


def _wrap_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_lp_in_training_step", False) or not self._changes_training_loss():
            return step(self, *args, **kwargs)
        capture = ForwardCapture(self) if self._captures_forward() else None
        self.__dict__["_lp_in_training_step"] = True
        try:
            if capture is None:
                out = step(self, *args, **kwargs)
            else:
                with capture:
                    out = step(self, *args, **kwargs)
        finally:
            self.__dict__["_lp_in_training_step"] = False

        def finish(loss: torch.Tensor) -> torch.Tensor:
            return self._add_loss_terms(self._blend_task_loss(loss, capture))

        if isinstance(out, torch.Tensor):
            return finish(out)
        if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
            return {**out, "loss": finish(out["loss"])}
        return out  # None (a skipped batch) or something Lightning will reject with its own message

    setattr(training_step, _WRAPPED, True)
    return training_step
