"""The pruning callback: a thin adapter that maps ``Trainer`` hooks to a :class:`~lightning_prune.pruner.Pruner`.

The callback owns what depends on the Trainer: the schedule's epochs, when statistics are collected, the fine-tuning
learning rate, logging, checkpoints and compaction at the end of fitting. Everything about masks is the pruner's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_prune._files import prepare_folder
from lightning_prune._helpers import is_number
from lightning_prune.callbacks._arguments import (
    _check_rewind_epoch,
    _check_schedule_fits,
    _misconfig,
    _non_finite,
    _resolve_importance,
    _schedule_args,
)
from lightning_prune.callbacks._fit_end import compact_after_fit, compact_target, trace_inputs
from lightning_prune.callbacks._resume import callback_state, check_checkpoint_holds, restore
from lightning_prune.callbacks.sharding import add_mask_shards, add_statistics_shards, check_strategy, saves_sharded
from lightning_prune.criteria.base import Importance
from lightning_prune.masks.distributed import world_size
from lightning_prune.masks.maskset import MaskSet, RemaskPolicy
from lightning_prune.masks.params import Prunable, prunable_parameters
from lightning_prune.masks.sharded import ShardedMaskSet
from lightning_prune.pruner import NonFiniteWeightsError, Pruner
from lightning_prune.schedules import SparsitySchedule, build_schedule
from lightning_prune.structures import build_structure
from lightning_prune.structures.base import Structure
from lightning_prune.structures.channel import ChannelStructure
from lightning_prune.training.finetune import scale_learning_rates

#: ``fn(trainer, pl_module)``, run by the callback around its pruning step (see :meth:`PruningCallback.before_pruning`).
EpochHook = Callable[[pl.Trainer, pl.LightningModule], None]


class PruningCallback(Callback):
    """Gradual pruning at epoch boundaries with exact, checkpoint-safe masks.

    A thin adapter: at the start of every training epoch the callback asks its schedule for the target sparsity
    and hands it to its :class:`~lightning_prune.pruner.Pruner` (:attr:`pruner`), which does the pruning. When the
    target has grown, the pruner scores the prunable weights, grows the masks to exactly that fraction of zeros and
    zeroes the pruned weights and their optimizer state. From the first pruning on, the gradients are masked in
    place once per optimizer step (in ``on_before_optimizer_step``: after accumulation, AMP unscaling and the DDP
    all-reduce, before gradient clipping), and weights and optimizer state are re-masked after the steps that need
    it (``remask``), so pruned weights and their optimizer state stay exactly zero under every optimizer of
    ``torch.optim``, gradient accumulation, mixed precision, clipping and DDP. Masks cost one byte per weight.
    Masks and the schedule position are saved in the checkpoint (``state_dict``), so a run resumed
    with ``ckpt_path`` continues with exactly the same masks; the model itself is never reparametrised, and its
    ``state_dict()`` loads with ``strict=True`` into a fresh, never-pruned model.

    Args:
        sparsity: final fraction of zeros among the prunable weights, in [0, 1). Always absolute, never
            relative to what is left. Defaults to 0.9 when ``schedule`` is a name (``n / m`` for an N:M
            structure); taken from the schedule when it is a :class:`~lightning_prune.schedules.SparsitySchedule`
            object. A mapping ``{layer pattern: sparsity}`` gives per-layer targets instead (e.g. an allocation
            from :func:`lightning_prune.sensitivity.allocate`): patterns match layer or parameter names as
            ``ignore`` does (channel group names for channels), the most specific pattern wins, layers no
            pattern matches stay dense, and each layer follows the schedule's shape to its own target.
        schedule: ``"one_shot"``, ``"linear"``, ``"cubic"`` (Zhu & Gupta, 2017), ``"exponential"``,
            ``"iterative"`` or a schedule object.
        start_epoch: first pruning epoch (default 0). With a schedule object, leave it at its default (or
            ``None``): the schedule's own is used.
        end_epoch: epoch at which ``sparsity`` is reached; ``None`` means the last training epoch
            (``max_epochs - 1``). Leave epochs after it for fine-tuning.
        every_n_epochs: prune every n epochs between ``start_epoch`` and ``end_epoch`` (default 1). With a
            schedule object, leave it at its default (or ``None``): the schedule's own is used.
        importance: ``"magnitude"``, ``"l1"``, ``"l2"``, ``"taylor"`` (Molchanov et al., 2019), ``"fisher"``
            (LeCun et al., 1990), ``"apoz"`` (Hu et al., 2016) and ``"activation"`` (channels only), or an
            :class:`~lightning_prune.criteria.base.Importance` object. For channels, ``"magnitude"`` is ``"l1"``: the
            L1 norm over every entry a channel owns. The criteria that need statistics collect them during the
            last ``importance_batches`` optimizer steps of the epoch before each pruning epoch, from the
            gradients and activations training computes anyway (summed over DDP ranks), so the first pruning
            epoch must be 1 or later.
        structure: ``"unstructured"`` (single weights), ``"channel"`` (whole coupled channels, see
            :class:`~lightning_prune.structures.channel.ChannelStructure`), ``"block"`` (whole ``block_shape`` tiles,
            :class:`~lightning_prune.structures.block.BlockStructure`), an ``"N:M"`` pattern such as ``"2:4"`` (``n`` of
            every ``m`` consecutive input weights zero, :class:`~lightning_prune.structures.nm.NMStructure`),
            ``"heads"`` (attention heads and MLP neurons, :class:`~lightning_prune.structures.heads.HeadStructure`),
            ``"experts"`` (whole experts of mixture-of-experts blocks,
            :class:`~lightning_prune.structures.experts.ExpertStructure`) or a
            :class:`~lightning_prune.structures.base.Structure` object. With channels (blocks, experts), ``sparsity``
            is the fraction of channels (blocks, experts) pruned.
        scope: ``"global"`` (the default: one threshold across all prunable layers) or ``"layer"`` (each layer
            reaches ``sparsity`` on its own). Per-layer targets (``sparsity`` a mapping) always prune each layer
            to its own target: the default then reads ``"layer"``. ``None`` means the default.
        ignore: module-name patterns (``fnmatch`` syntax, matching a name or a dotted suffix of it) whose
            weights stay dense, e.g. ``["head"]`` for the classifier. With channels: layers whose output
            channels stay whole (groups that reach the model's output are always kept).
        log_per_layer: also log ``prune/sparsity/<parameter>`` (``<layer>`` for channels) for every layer.
        round_to: channels only: keep a multiple of this many channels per pruned layer (e.g. 8).
        max_layer_sparsity: channels only: the largest fraction of one layer's channels that may go
            (default 0.9); at least one channel always stays.
        example_inputs: channels only: inputs to trace the model with. Defaults to the LightningModule's
            ``example_input_array``, else two samples of the first training batch.
        compact: at the end of fitting, build the physically smaller model
            (:func:`~lightning_prune.deploy.compact.compact`), print and log its parameters, MACs and CPU
            latency against the masked model, and save it to ``compact_path``. Defaults to True for
            channel pruning. The LightningModule itself keeps its shapes, so checkpoints still load.
        compact_path: where to save the compact model (:func:`~lightning_prune.deploy.compact.save_compact`);
            defaults to ``compact.pt`` in the Trainer's log directory. Reload it with
            :func:`~lightning_prune.deploy.compact.load_compact` into a fresh LightningModule.
        report_latency: time the masked and compact models on the CPU at batch 1 and 64 for the report.
        importance_batches: how many optimizer steps the statistics of ``"taylor"``, ``"fisher"``, ``"apoz"`` and
            ``"activation"`` are collected over before each pruning step (default 16); set it on the object when
            passing an :class:`~lightning_prune.criteria.base.Importance`.
        block_shape: ``structure="block"`` only: the ``(rows, columns)`` of a block of each weight's 2-D view
            (default ``(4, 4)``).
        rewind_epoch: after every pruning step, rewind the surviving weights (every parameter and buffer) to
            their values at the start of this epoch and clear the optimizer state, as in lottery-ticket pruning
            with rewinding (Frankle et al., 2020); with the ``"iterative"`` schedule this is iterative magnitude
            pruning with rewinding. At most the first pruning epoch (``0``: the initial weights). The weights are
            stored at that epoch and kept in the checkpoint.
        prunable: what is prunable, when not the default weight matrices (Linear, convolution, Hugging Face
            ``Conv1D`` and ``nn.MultiheadAttention``'s projections): a
            :class:`~lightning_prune.masks.params.Prunable` selecting by module type, parameter-name pattern or
            predicate, and opting embeddings in (unstructured, block and N:M structures).
        finetune_lr_scale: multiply every optimizer group's learning rate by this factor once, right after the
            schedule's last pruning step (at the start of its ``end_epoch``), to fine-tune the pruned network at a
            lower rate; Han et al. (2015) retrained at a tenth of the original rate: ``0.1``. The default 1.0
            leaves the rates alone. A learning-rate scheduler's base rates (``base_lrs``, ``initial_lr``, and
            ``max_lr``/``min_lr`` of one-cycle schedules) are scaled with them, so the scheduler continues from the
            lower rate instead of undoing it. Applied once per run: the checkpoint records it, and a resumed run
            does not apply it again.
        remask: when the weights and the optimizer state of pruned entries are re-masked besides pruning steps and
            resuming: ``"auto"`` (default) after every step only of optimizers that can move a weight without its
            gradient (any optimizer outside
            :data:`~lightning_prune.masks.maskset.GRADIENT_ONLY_OPTIMIZERS`, e.g. LBFGS, Adafactor, Muon or a
            custom class), ``"always"`` after every step (the safety net, for an optimizer you are unsure of),
            ``"pruning_steps"`` never.

    Frozen layers (``requires_grad=False``, e.g. a fine-tuned model's backbone) are pruned like the others (their
    weights are masked; they have no gradient to mask); to keep them dense, name them in ``ignore``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> pruning = PruningCallback(sparsity=0.8, schedule="cubic", start_epoch=1, end_epoch=5, ignore=["head"])
        >>> trainer = Trainer(max_epochs=8, callbacks=[pruning], logger=False)  # doctest: +SKIP
        >>> channels = PruningCallback(sparsity=0.5, structure="channel", importance="l1", round_to=8)
        >>> channels.structure
        ChannelStructure(round_to=8, max_layer_sparsity=0.9)
        >>> finetune = PruningCallback(sparsity=0.9, schedule="one_shot", start_epoch=5, finetune_lr_scale=0.1)
        >>> PruningCallback(structure="2:4", start_epoch=1, end_epoch=3).sparsity
        0.5
        >>> PruningCallback(sparsity=0.9, importance="taylor", start_epoch=2).importance
        TaylorImportance(batches=16)
        >>> lottery = PruningCallback(sparsity=0.9, schedule="iterative", start_epoch=2, end_epoch=8, every_n_epochs=2,
        ...                           rewind_epoch=1)
        >>> per_layer = PruningCallback(sparsity={"features.*": 0.5, "head": 0.2}, start_epoch=1, end_epoch=4)
        >>> per_layer.scope
        'layer'
        >>> per_layer.pruner.layer_targets
        {'features.*': 0.5, 'head': 0.2}
    """

    def __init__(
        self,
        sparsity: float | Mapping[str, float] | None = None,
        schedule: str | SparsitySchedule = "cubic",
        start_epoch: int | None = 0,
        end_epoch: int | None = None,
        every_n_epochs: int | None = 1,
        importance: str | Importance = "magnitude",
        structure: str | Structure = "unstructured",
        scope: Literal["global", "layer"] | None = "global",
        ignore: Sequence[str] = (),
        *,
        log_per_layer: bool = True,
        round_to: int | None = None,
        max_layer_sparsity: float | None = None,
        example_inputs: Any = None,
        compact: bool | None = None,
        compact_path: str | Path | None = None,
        report_latency: bool = True,
        finetune_lr_scale: float = 1.0,
        importance_batches: int | None = None,
        block_shape: int | Sequence[int] | None = None,
        rewind_epoch: int | None = None,
        remask: RemaskPolicy = "auto",
        prunable: Prunable | None = None,
    ) -> None:
        super().__init__()
        # Structure and criterion options are pass-throughs to the objects they configure.
        built = _misconfig(
            build_structure,
            structure,
            round_to=round_to,
            max_layer_sparsity=max_layer_sparsity,
            block_shape=block_shape,
        )
        if sparsity is None and isinstance(schedule, SparsitySchedule):
            sparsity = schedule.final_sparsity
        if isinstance(sparsity, Mapping) and scope == "global":
            scope = None  # per-layer targets: each layer to its own, the only scope they have
        #: The engine: masks, structure, importance, targets, rewinding.
        self.pruner: Pruner = _misconfig(
            Pruner,
            sparsity,
            built,
            _resolve_importance(importance, importance_batches),
            scope,
            ignore,
            remask,
            prunable,
        )
        #: The schedule: the target at each epoch (an open ``end_epoch`` is the Trainer's last epoch, set in ``setup``).
        self.schedule: SparsitySchedule | None = None
        self._schedule_spec = schedule
        self._schedule_args = _schedule_args(schedule, self.pruner.sparsity, start_epoch, end_epoch, every_n_epochs)
        if not (schedule == "iterative" and self._schedule_args["end_epoch"] is None):
            self.schedule = self._build_schedule()
        start = self._schedule_args["start_epoch"]
        self.rewind_epoch = _check_rewind_epoch(rewind_epoch, start)
        self._key_scope = self.pruner.scope  # the scope of the configuration: `set_targets` changes the pruner's
        self.log_per_layer = log_per_layer
        is_channel = isinstance(self.structure, ChannelStructure)
        if compact and not is_channel:
            raise MisconfigurationException(
                f"`compact=True` removes pruned channels and needs structure='channel', got {self.structure!r}."
            )
        if example_inputs is not None and not self.structure.needs_example_inputs:
            rank_zero_warn(f"PruningCallback: `example_inputs` is unused by {self.structure!r}.")
        self.example_inputs = example_inputs
        self.compact = is_channel if compact is None else bool(compact)
        self.compact_path = None if compact_path is None else Path(compact_path)
        self.report_latency = report_latency
        if not is_number(finetune_lr_scale) or not 0 < finetune_lr_scale < math.inf:
            raise MisconfigurationException(
                f"`finetune_lr_scale` must be a finite number > 0 (e.g. 0.1 to fine-tune at a tenth of the learning "
                f"rate, 1.0 for no change), got {finetune_lr_scale!r}."
            )
        self.finetune_lr_scale = float(finetune_lr_scale)
        self._lr_scaled = False  # whether finetune_lr_scale has been applied in this run (checkpointed)
        #: The compact model (on the CPU) and its report, set at the end of fitting when ``compact`` is on
        #: (on rank zero).
        self.compact_model: torch.nn.Module | None = None
        self.compaction_report: dict[str, float] = {}
        #: Why the compact model could not be saved (it is still in :attr:`compact_model`), or None.
        self.compact_save_error: str | None = None
        self._example: Any = None
        self._pending_state: dict[str, Any] | None = None
        self._window_from: int | None = None  # the batch of this epoch from which statistics are collected
        self._before: list[EpochHook] = []
        self._after: list[EpochHook] = []
        self._sharded_checkpoints = False  # whether the strategy writes sharded (DCP) checkpoints

    # ------------------------------------------------------------------ what the pruner owns, read through
    @property
    def structure(self) -> Structure:
        return self.pruner.structure

    @property
    def importance(self) -> Importance:
        return self.pruner.importance

    @property
    def scope(self) -> str:
        return self.pruner.scope

    @property
    def ignore(self) -> tuple[str, ...]:
        return self.pruner.ignore

    @property
    def layer_targets(self) -> dict[str, float] | None:
        """Per-layer final targets (``{pattern: sparsity}``), or None for one ``sparsity`` for all layers."""
        return self.pruner.layer_targets

    @property
    def masks(self) -> MaskSet | None:
        """The pruner's masks, once training started."""
        return self.pruner.masks

    @property
    def start_epoch(self) -> int:
        """The schedule's first pruning epoch."""
        return int(self._schedule_args["start_epoch"])

    @property
    def sparsity(self) -> float:
        """The final sparsity (with per-layer targets given as a mapping, the largest of them)."""
        return self.pruner.sparsity

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of pruned entries among the prunable weights, of channels for channel pruning (0.0
        before any pruning). After resuming a run whose training had already ended, the checkpoint's figure."""
        if self.masks is None:
            return float((self._pending_state or {}).get("achieved_sparsity", 0.0))
        return self.pruner.achieved_sparsity

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries per prunable parameter (of channels per layer, for channels)."""
        if self.masks is None:
            return dict((self._pending_state or {}).get("layer_sparsity", {}))
        return self.pruner.layer_sparsity()

    def set_targets(self, targets: Mapping[str, float]) -> None:
        """Replace the final sparsity with per-layer final targets ``{layer pattern: sparsity}`` (see ``sparsity``).

        Call it before the first pruning step, e.g. from
        :class:`~lightning_prune.callbacks.SensitivityCallback`, which analyses the dense model at ``start_epoch``
        and hands over its allocation. The schedule keeps its shape: each layer reaches its own target at
        ``end_epoch``. The targets are saved in the checkpoint.

        Raises:
            MisconfigurationException: the targets are malformed, or the masks have already been grown.
        """
        _misconfig(self.pruner.set_targets, targets)

    def targets_at(self, epoch: int) -> float | list[float]:
        """The target in force during ``epoch``: the schedule's, or, with per-layer targets, each layer's target
        scaled by the schedule's progress towards its final sparsity, in the order of the structure's layers
        (what the pruner grows the masks to).

        Example:
            >>> pruning = PruningCallback(sparsity={"head": 0.8, "body": 0.4}, schedule="linear", end_epoch=2)
            >>> pruning.targets_at(1)
            0.4
        """
        return self.pruner.targets_for(self._schedule().sparsity_at(epoch))

    def before_pruning(self, hook: EpochHook) -> None:
        """Run ``hook(trainer, pl_module)`` at the start of every training epoch, right before this callback's
        pruning step, whatever the order of the Trainer's callbacks (e.g. an allocation that sets per-layer targets,
        a teacher snapshot). Registering a hook twice runs it once."""
        if hook not in self._before:
            self._before.append(hook)

    def after_pruning(self, hook: EpochHook) -> None:
        """Run ``hook(trainer, pl_module)`` at the start of every training epoch, right after this callback's
        pruning step (e.g. a check of the new masks). Registering a hook twice runs it once."""
        if hook not in self._after:
            self._after.append(hook)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(structure=type(self.structure).__name__, scope=self._key_scope)

    # ------------------------------------------------------------------ set-up
    def _build_schedule(self, end_epoch: int | None = None) -> SparsitySchedule:
        spec = self._schedule_spec
        if isinstance(spec, SparsitySchedule):
            return spec
        args = dict(self._schedule_args)
        if args["end_epoch"] is None and end_epoch is not None:
            args["end_epoch"] = end_epoch
        return _misconfig(lambda: build_schedule(spec, **args))

    def _schedule(self) -> SparsitySchedule:
        if self.schedule is None:
            raise MisconfigurationException(
                "PruningCallback: the 'iterative' schedule with an open `end_epoch` is built when fitting starts, from "
                "the Trainer's `max_epochs`; set `end_epoch` to use it before."
            )
        return self.schedule

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, self.structure, self.importance, self.rewind_epoch)
        self._sharded_checkpoints = saves_sharded(trainer.strategy)
        prunable = self.pruner.prunable
        _misconfig(prunable_parameters, pl_module, self.ignore, select=prunable)  # fail early on bad patterns
        if self.compact and trainer.is_global_zero:  # a path that cannot hold the file fails now, not after the fit
            try:
                prepare_folder(self._compact_target(trainer))
            except OSError as err:
                raise MisconfigurationException(f"PruningCallback: `compact_path` cannot be written: {err}") from err
        schedule = self.schedule
        if schedule is None or schedule.end_epoch is None:
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs < 1:
                raise MisconfigurationException(
                    "PruningCallback: `end_epoch=None` means the last epoch, but the Trainer's `max_epochs` is "
                    f"{max_epochs!r}. Set `end_epoch` or `max_epochs`."
                )
            last = max(max_epochs - 1, self._schedule_args["start_epoch"])
            self.schedule = schedule.with_end_epoch(last) if schedule is not None else self._build_schedule(last)
        schedule = self._schedule()
        rank_zero_info(f"PruningCallback: {schedule.describe()}.")
        _check_schedule_fits(schedule, self.start_epoch, self.sparsity, self.importance, trainer.max_epochs)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruner = self.pruner
        if not pruner.is_bound_to(pl_module):
            if self.structure.needs_example_inputs:
                self._example = trace_inputs(self.example_inputs, trainer, pl_module)
            _misconfig(pruner.bind, pl_module, self._example)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            restore(pruner, state, self._schedule(), trainer)
        pruner.attach(trainer.optimizers, step_hook=False)  # gradients are masked in on_before_optimizer_step

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None:  # set in on_train_start
            return
        for hook in self._before:
            hook(trainer, pl_module)
        epoch = trainer.current_epoch
        if epoch == self.rewind_epoch and self.pruner.rewind_point is None:
            self.pruner.remember()  # before this epoch's pruning step, if any
        target = self._schedule().sparsity_at(epoch)
        if target > self.pruner.target:
            self._prune(epoch, target)
        for hook in self._after:
            hook(trainer, pl_module)
        self._plan_statistics(trainer, target)
        self._start_finetuning(trainer)

    def _prune(self, epoch: int, target: float) -> None:
        if self.rewind_epoch is not None and self.pruner.rewind_point is None:
            raise MisconfigurationException(
                f"PruningCallback at epoch {epoch}: cannot rewind to epoch {self.rewind_epoch}, whose weights were "
                "not stored: the run was resumed from a checkpoint written without `rewind_epoch`. Resume with "
                "the configuration it was written with, or start a new run."
            )
        try:
            self.pruner.prune(target)
        except NonFiniteWeightsError as err:
            raise _non_finite(epoch, "before pruning", err.names) from err
        except ValueError as err:
            raise MisconfigurationException(f"PruningCallback at epoch {epoch}: {err}") from err

    # ------------------------------------------------------------------ statistics of the data-driven criteria
    def _plan_statistics(self, trainer: pl.Trainer, target: float) -> None:
        """Collect statistics in the last ``batches`` steps of this epoch when the next epoch prunes further."""
        self._window_from = None
        importance = self.importance
        if importance.collects == "nothing" or self._schedule().sparsity_at(trainer.current_epoch + 1) <= target:
            return
        batches = trainer.num_training_batches
        steps = importance.batches * trainer.accumulate_grad_batches
        self._window_from = max(0, int(batches) - steps) if batches != float("inf") else 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_from is not None and batch_idx >= self._window_from and self.masks is not None:
            self._window_from = None
            self.pruner.start_collecting()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients are final here: accumulated, unscaled, all-reduced; gradient clipping comes next.
        self.pruner.mask_gradients()
        if self.pruner.collecting:
            self.pruner.observe()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Close the window once it is full, before validation and the end-of-epoch checkpoint: the checkpoint then
        # holds statistics already summed over the ranks.
        if self.pruner.collecting and (self.importance.ready or batch_idx + 1 >= trainer.num_training_batches):
            self.pruner.stop_collecting()

    def _start_finetuning(self, trainer: pl.Trainer) -> None:
        """Scale the learning rates by ``finetune_lr_scale`` once the schedule's last pruning step is done."""
        end = self._schedule().end_epoch
        if self.finetune_lr_scale == 1.0 or self._lr_scaled or end is None or trainer.current_epoch < end:
            return
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        scale_learning_rates(trainer.optimizers, schedulers, self.finetune_lr_scale)
        self._lr_scaled = True
        rank_zero_info(
            f"PruningCallback: pruning is done; fine-tuning from epoch {trainer.current_epoch} with every learning "
            f"rate scaled by {self.finetune_lr_scale:g}."
        )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pruner.stop_collecting()  # an epoch shorter than `num_training_batches` said (iterable datasets)
        if self.masks is None:
            return
        if self.masks.num_pruned() > 0:
            bad = self.pruner.non_finite()
            if bad:
                raise _non_finite(trainer.current_epoch, "at the end of the epoch", bad)
        # Every rank holds the same masks, so averaging over ranks changes nothing; it keeps Lightning quiet.
        sync = world_size() > 1
        pl_module.log(
            "prune/sparsity", self.achieved_sparsity, prog_bar=True, on_step=False, on_epoch=True, sync_dist=sync
        )
        pl_module.log("prune/target", self.pruner.target, on_step=False, on_epoch=True, sync_dist=sync)
        if self.log_per_layer:
            for name, value in self.layer_sparsity().items():
                pl_module.log(f"prune/sparsity/{name}", value, on_step=False, on_epoch=True, sync_dist=sync)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None:
            return
        self._warn_if_stopped_early(trainer)
        rank_zero_info(self.pruner.summary())
        if self.compact and trainer.is_global_zero:
            self._compact(trainer, pl_module)

    def _warn_if_stopped_early(self, trainer: pl.Trainer) -> None:
        """Training that stopped before the schedule's last pruning step (``max_steps``, early stopping, ...)."""
        end = self._schedule().end_epoch
        if self.pruner.target >= self.sparsity - 1e-12 or end is None:
            return
        if trainer.max_epochs is not None and end >= trainer.max_epochs >= 1:
            return  # said in `setup`
        limited = trainer.max_steps not in (None, -1)
        why = f"`max_steps`={trainer.max_steps}" if limited else "a stop before `max_epochs`"
        rank_zero_warn(
            f"PruningCallback: training stopped after {trainer.global_step} steps ({why}), before the schedule's last "
            f"pruning step at epoch {end}: the sparsity reached is {self.achieved_sparsity:.4f}, not the target "
            f"{self.sparsity:g}. Raise the training length or end the schedule earlier (`end_epoch`)."
        )

    def _compact_target(self, trainer: pl.Trainer) -> Path:
        return compact_target(self.compact_path, trainer)

    def _compact(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.compaction_report, self.compact_model, self.compact_save_error = compact_after_fit(
            trainer, pl_module, self._example, self.ignore, self._compact_target(trainer), self.report_latency
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.pruner.detach()

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._pending_state is not None:  # restored but not yet applied: keep it as it was
            return {**self._pending_state, "lr_scaled": self._lr_scaled}
        return {
            **callback_state(self.pruner, self._sharded_checkpoints),
            "schedule": repr(self.schedule),
            "lr_scaled": self._lr_scaled,
            # Read-outs for a run resumed after its training ended, when no masks are bound again.
            "achieved_sparsity": self.achieved_sparsity,
            "layer_sparsity": self.layer_sparsity(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The optimizer and scheduler states in the same checkpoint hold the scaled rates: never scale twice.
        self._lr_scaled = bool(state_dict.get("lr_scaled", False))
        if state_dict.get("layer_targets") is not None:  # e.g. handed over by a SensitivityCallback
            _misconfig(self.pruner.set_targets, dict(state_dict["layer_targets"]))
        if state_dict.get("rewind") is not None:
            self.pruner.rewind_point = dict(state_dict["rewind"])
        if state_dict.get("masks") or state_dict.get("sharded_masks"):
            self._pending_state = state_dict

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if isinstance(self.masks, ShardedMaskSet) and self._sharded_checkpoints:
            add_mask_shards(self.masks, checkpoint)  # each rank's shards, saved with the model's by DCP
            add_statistics_shards(self.masks, self.importance.state_dict(), checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        check_checkpoint_holds(checkpoint.get("callbacks") or {}, self.state_key, type(self).__qualname__)
