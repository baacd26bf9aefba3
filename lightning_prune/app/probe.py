"""Measuring the model as it is just before pruning starts: the "dense" figures of a run's summary.

:class:`EpochStartProbe` holds the timing (the start of one training epoch, right before the pruning callback's step
there); :class:`~lightning_prune.app.train.AccuracyAtEpochStart` and
:class:`~lightning_prune.app.language.PerplexityAtEpochStart` say what they measure.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from typing_extensions import override

from lightning_prune._helpers import check_int
from lightning_prune.callbacks.pruning import PruningCallback


class EpochStartProbe(L.Callback):
    """Calls :meth:`measure` at the start of training epoch ``epoch``, e.g. just before pruning starts.

    With ``pruning``, the measurement runs right before that callback's pruning step (it asks the pruning callback to
    call it), so it sees the model as the previous epochs left it wherever it is in ``Trainer(callbacks=...)``.
    Nothing is measured without a datamodule attached to the trainer. Subclasses implement :meth:`measure` and keep
    what it found in their ``state_dict``, so that a run resumed after ``epoch`` still reports it.

    Args:
        epoch: The epoch at whose start the model is measured.
        pruning: The :class:`~lightning_prune.callbacks.PruningCallback` to measure before.

    Example:
        >>> class Count(EpochStartProbe):
        ...     calls = 0
        ...     def measure(self, pl_module, datamodule):
        ...         self.calls += 1
        >>> Count(epoch=3).epoch
        3
    """

    def __init__(self, epoch: int, pruning: PruningCallback | None = None) -> None:
        self.epoch = check_int("epoch", epoch, 0)
        self.pruning = pruning

    def measure(self, pl_module: L.LightningModule, datamodule: Any) -> None:
        """Measure ``pl_module`` with the data of ``datamodule``, keep the result and log it."""
        raise NotImplementedError

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.pruning is not None:
            self.pruning.before_pruning(self._measure)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pruning is None:
            self._measure(trainer, pl_module)

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.current_epoch == self.epoch and datamodule is not None:
            self.measure(pl_module, datamodule)
