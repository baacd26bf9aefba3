"""The Lightning side of distillation: a callback that gives the LightningModule its teacher."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune._helpers import eval_mode, is_int
from lightning_prune.callbacks._lookup import find_pruning_callback
from lightning_prune.callbacks.pruning import PruningCallback
from lightning_prune.training.distillation import DistillationMixin, check_alpha, check_logits, check_temperature


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
        pruning: the :class:`~lightning_prune.callbacks.PruningCallback` whose ``start_epoch`` distillation starts
            at; default: the only one among the Trainer's callbacks.

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
        *,
        pruning: PruningCallback | None = None,
    ) -> None:
        super().__init__()
        try:
            self.alpha = check_alpha(alpha)
            self.temperature = check_temperature(temperature)
        except ValueError as err:
            raise MisconfigurationException(f"DistillationCallback: {err}") from err
        if start_epoch is not None and (not is_int(start_epoch) or start_epoch < 0):
            raise MisconfigurationException(
                f"DistillationCallback: `start_epoch` must be an integer >= 0 or None (when pruning starts), "
                f"got {start_epoch!r}."
            )
        if teacher is not None and not isinstance(teacher, (nn.Module, str, Path)):
            raise MisconfigurationException(
                "DistillationCallback: `teacher` must be None (a snapshot of the dense model), a checkpoint path "
                f"or an nn.Module, got {type(teacher).__name__}."
            )
        if pruning is not None and not isinstance(pruning, PruningCallback):
            raise MisconfigurationException(
                f"DistillationCallback: `pruning` must be a PruningCallback, got {type(pruning).__name__}."
            )
        self._teacher_spec = teacher
        self.start_epoch = start_epoch
        self.pruning = pruning
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
        pruning = find_pruning_callback(trainer, self.pruning, "DistillationCallback", required=False)
        if pruning is not None:
            self._start = pruning.start_epoch
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
        teacher.eval().to(pl_module.device)
        try:
            with eval_mode(pl_module), torch.no_grad():
                args = example if isinstance(example, tuple) else (example,)
                check_logits(pl_module(*args), teacher(*args))
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"DistillationCallback: {err}") from err
