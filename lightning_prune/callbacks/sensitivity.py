"""``SensitivityCallback``: a sensitivity analysis when pruning starts, its allocation handed to the pruning
callback as per-layer targets.

Example:
    >>> from lightning_prune import PruningCallback
    >>> callbacks = [SensitivityCallback(max_drop=0.02), PruningCallback(sparsity=0.9, start_epoch=10)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_prune.callbacks._lookup import find_pruning_callback
from lightning_prune.callbacks.pruning import PruningCallback
from lightning_prune.sensitivity.allocation import allocate, check_constraints
from lightning_prune.sensitivity.analysis import DEFAULT_RATIOS, Evaluate, analyze, check_ratios
from lightning_prune.sensitivity.report import sensitivity_markdown, write_report
from lightning_prune.sensitivity.table import Prediction, SensitivityTable


class SensitivityCallback(Callback):
    """Analyse every layer's sensitivity when pruning starts and prune each layer to its allocated sparsity.

    At the start of the pruning callback's ``start_epoch``, on the model as dense training left it, the
    callback runs :func:`~lightning_prune.sensitivity.analyze` with the pruning callback's structure,
    importance and ``ignore``, on the validation data; computes :func:`~lightning_prune.sensitivity.allocate`;
    and hands the mapping to ``pruning.set_targets(mapping)`` (per-layer final targets that replace the
    scalar ``sparsity``) before the pruning callback's first pruning step.

    The analysis runs right before the pruning callback's pruning step at its ``start_epoch`` (the pruning callback
    calls it, so the order of ``Trainer(callbacks=[...])`` does not matter). The validation data is the datamodule's
    ``val_dataloader()`` (the whole split, also under DDP), else the Trainer's validation dataloader (the
    first, when there are several). Under DDP the analysis runs on rank 0 only and the table and mapping are
    broadcast, so every rank prunes alike. Cost: ``1 + layers x ratios`` evaluations, once.

    Args:
        target_sparsity: The global fraction of prunable units to prune; default: the pruning callback's final
            ``sparsity`` (unless ``macs_budget`` is given).
        macs_budget: Instead: the fraction of the dense MACs per sample to keep, in (0, 1].
        max_drop: The largest validation drop allowed for any layer (0.01 = one point of accuracy); None: none.
        ratios: The grid of ratios each layer is pruned to.
        evaluate: ``evaluate(pl_module) -> float`` (higher is better) instead of accuracy on the validation
            data; for a loss, return its negative.
        pruning: The ``PruningCallback`` to configure; default: the only one among the Trainer's callbacks. Either
            way it may come anywhere in ``Trainer(callbacks=[...])``.
        output_dir: If given, rank 0 writes ``sensitivity.csv``, ``sensitivity.md``, ``sensitivity.png`` and
            ``allocation.yaml`` there (:func:`~lightning_prune.sensitivity.write_report`).
        example_inputs: Inputs to count MACs (and trace channels) with; default: the pruning callback's
            ``example_inputs``, the LightningModule's ``example_input_array``, or two validation samples.
        metric: The metric's name in the table.

    Attributes:
        table: The :class:`~lightning_prune.sensitivity.SensitivityTable`, once computed.
        targets: The per-layer sparsities handed to the pruning callback, once computed.
        prediction: What they are predicted to give (:meth:`SensitivityTable.predict`).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_prune import PruningCallback
        >>> sensitivity = SensitivityCallback(target_sparsity=0.9, max_drop=0.02, output_dir="sensitivity")
        >>> pruning = PruningCallback(sparsity=0.9, schedule="cubic", start_epoch=10, end_epoch=20)
        >>> trainer = Trainer(max_epochs=30, callbacks=[sensitivity, pruning])  # doctest: +SKIP
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        macs_budget: float | None = None,
        max_drop: float | None = None,
        ratios: Sequence[float] = DEFAULT_RATIOS,
        *,
        evaluate: Evaluate | None = None,
        pruning: PruningCallback | None = None,
        output_dir: str | Path | None = None,
        example_inputs: Any = None,
        metric: str | None = None,
    ) -> None:
        super().__init__()
        try:
            check_constraints(target_sparsity, macs_budget, max_drop, required=False)
            self.ratios = check_ratios(ratios)
        except ValueError as err:
            raise MisconfigurationException(f"SensitivityCallback: {err}") from err
        if evaluate is not None and not callable(evaluate):
            raise MisconfigurationException(
                f"SensitivityCallback: `evaluate` must be a callable `evaluate(pl_module) -> float`, got {evaluate!r}."
            )
        if pruning is not None and not isinstance(pruning, PruningCallback):
            raise MisconfigurationException(
                f"SensitivityCallback: `pruning` must be a PruningCallback, got {type(pruning).__name__}."
            )
        self.target_sparsity = target_sparsity
        self.macs_budget = macs_budget
        self.max_drop = max_drop
        self.evaluate = evaluate
        self.pruning = pruning
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.example_inputs = example_inputs
        self.metric = metric
        self.table: SensitivityTable | None = None
        self.targets: dict[str, float] | None = None
        self.prediction: Prediction | None = None
        self._pruning: PruningCallback | None = None

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        pruning = cast(PruningCallback, find_pruning_callback(trainer, self.pruning, "SensitivityCallback"))
        start = pruning.start_epoch
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= start:
            rank_zero_warn(
                f"SensitivityCallback: pruning starts at epoch {start} but the Trainer stops after epoch "
                f"{trainer.max_epochs - 1}; no analysis will run."
            )
        self._pruning = pruning
        pruning.before_pruning(self._allocate)  # runs right before its pruning step, whatever the callbacks' order

    # ------------------------------------------------------------------ the analysis
    def _allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At the pruning callback's ``start_epoch``, before its pruning step: analyse, allocate, hand over."""
        pruning = self._pruning
        if pruning is None or self.targets is not None:
            return
        epoch, start = trainer.current_epoch, pruning.start_epoch
        if epoch < start:
            return
        if epoch > start:
            rank_zero_warn(
                f"SensitivityCallback: training resumed at epoch {epoch}, after pruning started (epoch {start}), "
                "without an analysis in the checkpoint; the pruning callback keeps its own targets."
            )
            self.targets = {}
            return
        outcome: tuple[str, Any] | None = None
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                outcome = ("ok", self._analyze(trainer, pl_module, pruning))
            except Exception as err:  # reported to every rank, so that none waits for the broadcast
                error = err
                user_error = isinstance(err, (ValueError, TypeError))
                outcome = ("error", str(err) if user_error else f"{type(err).__name__}: {err}")
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if outcome is None:
            raise RuntimeError("SensitivityCallback: rank 0 broadcast no analysis.")
        if outcome[0] == "error":
            message = f"SensitivityCallback at epoch {epoch}: {outcome[1]}"
            if isinstance(error, (ValueError, TypeError)) or error is None:
                raise MisconfigurationException(message) from error
            raise error
        table, targets = outcome[1]
        self.table, self.targets = table, dict(targets)
        self.prediction = table.predict(self.targets)
        pruning.set_targets(dict(self.targets))
        rank_zero_info(sensitivity_markdown(table, self.targets))
        # Every rank holds the same figures: syncing changes nothing and keeps Lightning quiet under DDP.
        sync = trainer.world_size > 1
        for key, value in (
            ("predicted_drop", self.prediction.drop),
            ("predicted_sparsity", self.prediction.sparsity),
            ("predicted_macs_fraction", self.prediction.macs_fraction),
        ):
            pl_module.log(f"sensitivity/{key}", value, on_step=False, on_epoch=True, sync_dist=sync)

    def _analyze(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, pruning: PruningCallback
    ) -> tuple[SensitivityTable, dict[str, float]]:
        example = self._example(pl_module, pruning)
        # Accuracy needs the validation data; a custom `evaluate` only needs inputs to count MACs with.
        data = _validation_data(trainer) if self.evaluate is None or example is None else None
        table = analyze(
            pl_module,
            data,
            evaluate=self.evaluate,
            ratios=self.ratios,
            structure=pruning.structure,
            importance=pruning.importance,
            ignore=pruning.ignore,
            example_inputs=example,
            metric=self.metric,
        )
        target = self.target_sparsity
        if target is None and self.macs_budget is None:
            target = pruning.sparsity
        targets = allocate(table, target_sparsity=target, macs_budget=self.macs_budget, max_drop=self.max_drop)
        if self.output_dir is not None:
            write_report(
                table,
                self.output_dir,
                targets,
                target_sparsity=target,
                macs_budget=self.macs_budget,
                max_drop=self.max_drop,
            )
        return table, targets

    def _example(self, pl_module: pl.LightningModule, pruning: PruningCallback) -> Any:
        for candidate in (self.example_inputs, pruning.example_inputs, pl_module.example_input_array):
            if candidate is not None:
                return candidate
        return None

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        targets = state_dict.get("targets")
        self.targets = None if targets is None else dict(targets)


def _validation_data(trainer: pl.Trainer) -> Any:
    """The datamodule's ``val_dataloader()``, else the Trainer's (first) validation dataloader."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        try:
            return datamodule.val_dataloader()
        except (NotImplementedError, MisconfigurationException):
            pass
    loaders = trainer.val_dataloaders
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    elif isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ValueError(
            "SensitivityCallback needs validation data: a datamodule with `val_dataloader`, `val_dataloaders` "
            "passed to `Trainer.fit`, or `evaluate=`."
        )
    return loaders
