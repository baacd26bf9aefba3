"""Lightning adapters: wire schedules, importance, structures and masks to ``Trainer`` hooks."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_prune.distributed import all_reduce_sum_, broadcast_masks_, world_size
from lightning_prune.importance import Importance, build_importance
from lightning_prune.masking import MaskSet, non_finite_parameters, prunable_parameters
from lightning_prune.rewinding import rewind_, snapshot
from lightning_prune.schedules import SCHEDULES, SparsitySchedule, build_schedule
from lightning_prune.stats import ModelProfile, compare_profiles, count_parameters, profile_model
from lightning_prune.structured import ChannelStructure, compact, save_compact
from lightning_prune.structures import SCOPES, Structure, build_structure

_DEFAULT_SPARSITY = 0.9
#: Strategies that shard parameters across processes (by class name): masks need whole parameters on every rank.
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")
#: The version of :meth:`PruningCallback.state_dict`'s layout (1: masks, target, schedule, lr_scaled).
_STATE_VERSION = 2


class PruningCallback(Callback):
    """Gradual pruning at epoch boundaries with exact, checkpoint-safe masks.

    At the start of every training epoch the callback asks its schedule for the target sparsity; when the
    target has grown, it scores the prunable weights, grows the masks to exactly that fraction of zeros and
    zeroes the pruned weights and their optimizer state. From the first pruning on, gradient hooks mask the
    gradients and a post-step hook on every optimizer re-masks weights and optimizer state, so pruned weights
    stay exactly zero under SGD with momentum, Adam(W) with weight decay, gradient accumulation and mixed
    precision. Masks and the schedule position are saved in the checkpoint (``state_dict``), so a run resumed
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
        start_epoch: first pruning epoch (default 0).
        end_epoch: epoch at which ``sparsity`` is reached; ``None`` means the last training epoch
            (``max_epochs - 1``). Leave epochs after it for fine-tuning.
        every_n_epochs: prune every n epochs between ``start_epoch`` and ``end_epoch`` (default 1).
        importance: ``"magnitude"``, ``"l1"``, ``"l2"``, ``"taylor"`` (Molchanov et al., 2019), ``"fisher"``
            (LeCun et al., 1990), ``"apoz"`` (Hu et al., 2016) and ``"activation"`` (channels only), or an
            :class:`~lightning_prune.importance.Importance` object. For channels, ``"magnitude"`` is ``"l1"``: the
            L1 norm over every entry a channel owns. The criteria that need statistics collect them during the
            last ``importance_batches`` optimizer steps of the epoch before each pruning epoch, from the
            gradients and activations training computes anyway (summed over DDP ranks), so the first pruning
            epoch must be 1 or later.
        structure: ``"unstructured"`` (single weights), ``"channel"`` (whole coupled channels, see
            :class:`~lightning_prune.structured.ChannelStructure`), ``"block"`` (whole ``block_shape`` tiles,
            :class:`~lightning_prune.patterns.BlockStructure`), an ``"N:M"`` pattern such as ``"2:4"`` (``n`` of
            every ``m`` consecutive input weights zero, :class:`~lightning_prune.patterns.NMStructure`) or a
            :class:`~lightning_prune.structures.Structure` object. With channels (blocks), ``sparsity`` is the
            fraction of channels (blocks) pruned.
        scope: ``"global"`` (one threshold across all prunable layers) or ``"layer"`` (each layer reaches
            ``sparsity`` on its own). ``None`` (the default): ``"global"``, or ``"layer"`` for per-layer targets.
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
            (:func:`~lightning_prune.structured.compact`), print and log its parameters, MACs and CPU
            latency against the masked model, and save it to ``compact_path``. Defaults to True for
            channel pruning. The LightningModule itself keeps its shapes, so checkpoints still load.
        compact_path: where to save the compact model (:func:`~lightning_prune.structured.save_compact`);
            defaults to ``compact.pt`` in the Trainer's log directory. Reload it with
            :func:`~lightning_prune.structured.load_compact` into a fresh LightningModule.
        report_latency: time the masked and compact models on the CPU at batch 1 and 64 for the report.
        importance_batches: how many optimizer steps the statistics of ``"taylor"``, ``"fisher"``, ``"apoz"`` and
            ``"activation"`` are collected over before each pruning step (default 16); set it on the object when
            passing an :class:`~lightning_prune.importance.Importance`.
        block_shape: ``structure="block"`` only: the ``(rows, columns)`` of a block of each weight's 2-D view
            (default ``(4, 4)``).
        rewind_epoch: after every pruning step, rewind the surviving weights (every parameter and buffer) to
            their values at the start of this epoch and clear the optimizer state, as in lottery-ticket pruning
            with rewinding (Frankle et al., 2020); with the ``"iterative"`` schedule this is iterative magnitude
            pruning with rewinding. At most the first pruning epoch (``0``: the initial weights). The weights are
            stored at that epoch and kept in the checkpoint.
        finetune_lr_scale: multiply every optimizer group's learning rate by this factor once, right after the
            schedule's last pruning step (at the start of its ``end_epoch``), to fine-tune the pruned network at a
            lower rate; Han et al. (2015) retrained at a tenth of the original rate: ``0.1``. The default 1.0
            leaves the rates alone. A learning-rate scheduler's base rates (``base_lrs``, ``initial_lr``, and
            ``max_lr``/``min_lr`` of one-cycle schedules) are scaled with them, so the scheduler continues from the
            lower rate instead of undoing it. Applied once per run: the checkpoint records it, and a resumed run
            does not apply it again.

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
    """

    def __init__(
        self,
        sparsity: float | Mapping[str, float] | None = None,
        schedule: str | SparsitySchedule = "cubic",
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        every_n_epochs: int | None = None,
        importance: str | Importance = "magnitude",
        structure: str | Structure = "unstructured",
        scope: str | None = None,
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
    ) -> None:
        super().__init__()
        self.structure: Structure = _resolve_structure(structure, round_to, max_layer_sparsity, block_shape)
        #: Per-layer final targets (``{pattern: sparsity}``), or None for one ``sparsity`` for all layers.
        self.layer_targets: dict[str, float] | None = None
        if isinstance(sparsity, Mapping):
            self.layer_targets = _check_layer_targets(sparsity)
            sparsity = max(self.layer_targets.values())
        elif sparsity is None and isinstance(schedule, str):
            sparsity = getattr(self.structure, "default_sparsity", None)  # N:M: n / m
        self._schedule_spec = schedule
        self._schedule_args = _schedule_args(schedule, sparsity, start_epoch, end_epoch, every_n_epochs)
        # Build once now so that every bad argument fails at construction, not epochs into a run.
        self.schedule: SparsitySchedule = self._build_schedule(end_epoch=None)
        self.importance: Importance = _resolve_importance(importance, importance_batches)
        _misconfig(self.structure.check_importance, self.importance)
        if scope is None:
            scope = "layer" if self.layer_targets is not None else "global"
        if scope not in SCOPES:
            raise MisconfigurationException(f"`scope` must be one of {list(SCOPES)}, got {scope!r}.")
        if self.layer_targets is not None and scope != "layer":
            raise MisconfigurationException(
                f"Per-layer targets (`sparsity`={self.layer_targets!r}) prune every layer to its own target, which "
                f"contradicts `scope`={scope!r}. Leave `scope` unset (or 'layer')."
            )
        self.scope = scope
        self._key_scope = scope  # the scope of the configuration: `set_targets` changes `scope`, not the state key
        self.rewind_epoch = _check_rewind_epoch(rewind_epoch, self.schedule)
        if isinstance(ignore, str):
            ignore = [ignore]
        if not all(isinstance(p, str) and p for p in ignore):
            raise MisconfigurationException(f"`ignore` must be a list of module-name patterns, got {ignore!r}.")
        self.ignore: tuple[str, ...] = tuple(ignore)
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
        number = isinstance(finetune_lr_scale, (int, float)) and not isinstance(finetune_lr_scale, bool)
        if not number or not finetune_lr_scale > 0:
            raise MisconfigurationException(
                f"`finetune_lr_scale` must be a number > 0 (e.g. 0.1 to fine-tune at a tenth of the learning rate, "
                f"1.0 for no change), got {finetune_lr_scale!r}."
            )
        self.finetune_lr_scale = float(finetune_lr_scale)
        self._lr_scaled = False  # whether finetune_lr_scale has been applied in this run (checkpointed)
        #: The compact model (on the CPU) and its report, set at the end of fitting when ``compact`` is on
        #: (on rank zero).
        self.compact_model: torch.nn.Module | None = None
        self.compaction_report: dict[str, float] = {}

        self.masks: MaskSet | None = None
        self._example: Any = None
        self._target = 0.0  # the schedule's target that the masks have been grown to
        self._pending_state: dict[str, Any] | None = None
        self._rewind_state: dict[str, torch.Tensor] | None = None  # the weights at `rewind_epoch`
        self._window_from: int | None = None  # the batch of this epoch from which statistics are collected

    # ------------------------------------------------------------------ public read-outs
    @property
    def sparsity(self) -> float:
        """The schedule's final sparsity (with per-layer targets given as a mapping, the largest of them)."""
        return self.schedule.final_sparsity

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of pruned entries among the prunable weights, of channels for channel pruning (0.0
        before any pruning). After resuming a run whose training had already ended, the checkpoint's figure."""
        if self.masks is None:
            return float((self._pending_state or {}).get("achieved_sparsity", 0.0))
        return self.structure.sparsity(self.masks)

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries per prunable parameter (of channels per layer, for channels)."""
        if self.masks is None:
            return dict((self._pending_state or {}).get("layer_sparsity", {}))
        return self.structure.layer_sparsity(self.masks)

    def set_targets(self, targets: Mapping[str, float]) -> None:
        """Replace the final sparsity with per-layer final targets ``{layer pattern: sparsity}`` (see ``sparsity``).

        Call it before the first pruning step, e.g. from
        :class:`~lightning_prune.sensitivity.SensitivityCallback`, which analyses the dense model at ``start_epoch``
        and hands over its allocation. The schedule keeps its shape: each layer reaches its own target at
        ``end_epoch``. The targets are saved in the checkpoint.

        Raises:
            MisconfigurationException: the targets are malformed, or the masks have already been grown.
        """
        targets = _check_layer_targets(targets)
        if self._target > 0:
            raise MisconfigurationException(
                "PruningCallback.set_targets must be called before the first pruning step; the masks are already "
                f"grown to a target of {self._target:g}."
            )
        if self.masks is not None:
            _misconfig(self.structure.check_target, self.masks, targets, "layer")
        self.layer_targets = targets
        self.scope = "layer"

    def targets_at(self, epoch: int) -> float | dict[str, float]:
        """The target in force during ``epoch``: the schedule's, or, with per-layer targets, each layer's target
        scaled by the schedule's progress towards its final sparsity (what ``structure.prune_`` gets).

        Example:
            >>> pruning = PruningCallback(sparsity={"head": 0.8, "body": 0.4}, schedule="linear", end_epoch=2)
            >>> pruning.targets_at(1)
            {'head': 0.4, 'body': 0.2}
        """
        target = self.schedule.sparsity_at(epoch)
        if self.layer_targets is None:
            return target
        final = self.schedule.final_sparsity
        scale = target / final if final > 0 else 0.0
        return {pattern: value * scale for pattern, value in self.layer_targets.items()}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(structure=type(self.structure).__name__, scope=self._key_scope)

    # ------------------------------------------------------------------ set-up
    def _build_schedule(self, end_epoch: int | None) -> SparsitySchedule:
        spec = self._schedule_spec
        try:
            if isinstance(spec, SparsitySchedule):
                return spec.with_end_epoch(end_epoch) if end_epoch is not None else spec
            args = dict(self._schedule_args)
            if args["end_epoch"] is None:
                # Open end: validate with a placeholder now, resolve with the trainer's last epoch in `setup`.
                # A one-shot schedule has no end of its own: it prunes at `start_epoch`.
                open_end = end_epoch is None or spec == "one_shot"
                args["end_epoch"] = args["start_epoch"] if open_end else end_epoch
            return build_schedule(spec, **args)
        except ValueError as err:
            raise MisconfigurationException(f"PruningCallback: {err}") from err

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in _UNSUPPORTED_STRATEGIES):
            raise MisconfigurationException(
                f"PruningCallback does not support the sharded strategy {strategy} yet: masks need whole "
                "parameters on every rank, and this strategy splits them across ranks. Use `strategy='ddp'` (or "
                "'ddp_spawn'), which keeps a whole copy of the model on every rank."
            )
        _misconfig(prunable_parameters, pl_module, self.ignore)  # fail early on bad `ignore` patterns
        spec = self._schedule_spec
        open_end = (
            spec.end_epoch is None if isinstance(spec, SparsitySchedule) else self._schedule_args["end_epoch"] is None
        )
        if open_end:
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs < 1:
                raise MisconfigurationException(
                    "PruningCallback: `end_epoch=None` means the last epoch, but the Trainer's `max_epochs` is "
                    f"{max_epochs!r}. Set `end_epoch` or `max_epochs`."
                )
            self.schedule = self._build_schedule(end_epoch=max_epochs - 1)
        first = next((e for e in self.schedule.pruning_epochs() if self.schedule.sparsity_at(e) > 0), None)
        if self.importance.collects != "nothing" and first == 0:
            raise MisconfigurationException(
                f"PruningCallback: {self.importance!r} scores from {self.importance.collects} that training computes, "
                "but the first pruning step is at epoch 0, before any training step. Start pruning at epoch 1 or "
                "later (`start_epoch`), or use importance='magnitude'."
            )
        end = self.schedule.end_epoch
        if trainer.max_epochs is not None and trainer.max_epochs >= 1 and end is not None and end >= trainer.max_epochs:
            rank_zero_warn(
                f"PruningCallback: the schedule ends at epoch {end} but the Trainer stops after epoch "
                f"{trainer.max_epochs - 1}; the final sparsity {self.sparsity} will not be reached."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None or not _masks_params_of(self.masks, pl_module):
            if self.structure.needs_example_inputs:
                self._example = self._resolve_example(trainer, pl_module)
            self.masks = _misconfig(self.structure.bind, pl_module, self.ignore, self._example)
            final = self.layer_targets if self.layer_targets is not None else self.sparsity
            _misconfig(self.structure.check_target, self.masks, final, self.scope)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._check_resumable(state, trainer.current_epoch)
            try:
                self.masks.load_state_dict(state["masks"])
            except ValueError as err:
                raise MisconfigurationException(f"PruningCallback cannot resume: {err}") from err
            self._target = float(state["target"])
            if state.get("rewind") is not None:
                self._rewind_state = dict(state["rewind"])
            if state.get("importance_state"):
                try:
                    self.importance.load_state_dict(state["importance_state"], self.masks)
                except ValueError as err:
                    raise MisconfigurationException(f"PruningCallback cannot resume: {err}") from err
        if self.masks.num_pruned() > 0:
            self.masks.attach(trainer.optimizers)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None:  # set in on_train_start
            return
        epoch = trainer.current_epoch
        if epoch == self.rewind_epoch and self._rewind_state is None:
            self._rewind_state = snapshot(pl_module)  # before this epoch's pruning step, if any
        target = self.schedule.sparsity_at(epoch)
        if target > self._target:
            self._prune(trainer, pl_module, target)
        self._plan_statistics(trainer, target)
        self._start_finetuning(trainer)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float) -> None:
        masks, epoch = self.masks, trainer.current_epoch
        if masks is None:
            return
        self._check_finite(masks, trainer, "before pruning")
        self._close_statistics()
        try:
            self.structure.prune_(masks, self.importance, self.targets_at(epoch), self.scope)  # type: ignore[arg-type]
        except ValueError as err:
            raise MisconfigurationException(f"PruningCallback at epoch {epoch}: {err}") from err
        self.importance.reset()  # the statistics served this step; free them
        # Rank 0's masks are every rank's: one differing decision and the ranks would train different networks.
        broadcast_masks_(masks)
        emptied = [name for name, mask in zip(masks.names, masks.masks) if not bool(mask.any())]
        if emptied:
            rank_zero_warn(
                f"PruningCallback at epoch {epoch}: every weight of {emptied} is pruned, so these layers output their "
                "bias alone. Bound each layer with scope='layer' or per-layer targets (`sparsity={pattern: s}`), "
                "ignore them, or lower the sparsity."
            )
        self._target = target
        if self.rewind_epoch is not None:
            if self._rewind_state is None:
                raise MisconfigurationException(
                    f"PruningCallback at epoch {epoch}: cannot rewind to epoch {self.rewind_epoch}, whose weights were "
                    "not stored: the run was resumed from a checkpoint written without `rewind_epoch`. Resume with "
                    "the configuration it was written with, or start a new run."
                )
            try:
                rewind_(pl_module, self._rewind_state, masks, trainer.optimizers)
            except ValueError as err:
                raise MisconfigurationException(f"PruningCallback at epoch {epoch}: {err}") from err
        masks.attach(trainer.optimizers)  # (re)installs hooks and zeroes the new entries' state

    # ------------------------------------------------------------------ statistics of the data-driven criteria
    def _plan_statistics(self, trainer: pl.Trainer, target: float) -> None:
        """Collect statistics in the last ``batches`` steps of this epoch when the next epoch prunes further."""
        self._window_from = None
        importance = self.importance
        if importance.collects == "nothing" or self.schedule.sparsity_at(trainer.current_epoch + 1) <= target:
            return
        batches = trainer.num_training_batches
        steps = importance.batches * trainer.accumulate_grad_batches
        self._window_from = max(0, int(batches) - steps) if batches != float("inf") else 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        importance = self.importance
        if self._window_from is not None and batch_idx >= self._window_from and self.masks is not None:
            self._window_from = None
            importance.reset()
            importance.start(pl_module, self.masks)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.importance.collecting and self.masks is not None:
            self.importance.observe(self.masks)  # gradients are final here: accumulated, unscaled, all-reduced

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Close the window once it is full, before validation and the end-of-epoch checkpoint: the checkpoint then
        # holds statistics already summed over the ranks.
        if self.importance.collecting and (self.importance.ready or batch_idx + 1 >= trainer.num_training_batches):
            self._close_statistics()

    def _close_statistics(self) -> None:
        if self.importance.collecting:
            self.importance.stop()
            self.importance.reduce_(all_reduce_sum_)  # a collective: every rank gets here in the same step

    def _start_finetuning(self, trainer: pl.Trainer) -> None:
        """Scale the learning rates by ``finetune_lr_scale`` once the schedule's last pruning step is done."""
        end = self.schedule.end_epoch
        if self.finetune_lr_scale == 1.0 or self._lr_scaled or end is None or trainer.current_epoch < end:
            return
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        _scale_learning_rates(trainer.optimizers, schedulers, self.finetune_lr_scale)
        self._lr_scaled = True
        rank_zero_info(
            f"PruningCallback: pruning is done; fine-tuning from epoch {trainer.current_epoch} with every learning "
            f"rate scaled by {self.finetune_lr_scale:g}."
        )

    @staticmethod
    def _check_finite(masks: MaskSet, trainer: pl.Trainer, when: str) -> None:
        """Fail with a message naming the layers when a masked parameter holds NaN or infinity: the masks are
        never computed from, nor kept on, diverged weights."""
        bad = non_finite_parameters(masks)
        if bad:
            raise MisconfigurationException(
                f"PruningCallback at epoch {trainer.current_epoch} ({when}): non-finite weights (NaN or inf) in "
                f"{bad}; training diverged, e.g. from non-finite gradients. The masks were left as they were. Lower "
                "the learning rate, clip gradients (`Trainer(gradient_clip_val=...)`) or check the data, then resume "
                "from the last good checkpoint."
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_statistics()  # an epoch shorter than `num_training_batches` said (iterable datasets)
        if self.masks is None:
            return
        if self.masks.num_pruned() > 0:
            self._check_finite(self.masks, trainer, "at the end of the epoch")
        # Every rank holds the same masks, so averaging over ranks changes nothing; it keeps Lightning quiet.
        sync = world_size() > 1
        pl_module.log(
            "prune/sparsity", self.achieved_sparsity, prog_bar=True, on_step=False, on_epoch=True, sync_dist=sync
        )
        pl_module.log("prune/target", self._target, on_step=False, on_epoch=True, sync_dist=sync)
        if self.log_per_layer:
            for name, value in self.layer_sparsity().items():
                pl_module.log(f"prune/sparsity/{name}", value, on_step=False, on_epoch=True, sync_dist=sync)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None:
            return
        rank_zero_info(self.structure.summary(self.masks))
        if self.compact and trainer.is_global_zero:
            self._compact(trainer, pl_module)

    # ------------------------------------------------------------------ channels: inputs and compaction
    def _resolve_example(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Inputs to trace the model with: ``example_inputs``, the module's ``example_input_array``, or two
        samples of the first training batch (drawn without touching the global random state)."""
        example = self.example_inputs
        if example is None:
            example = pl_module.example_input_array
        if example is None:
            loader = trainer.train_dataloader
            if loader is None:
                raise MisconfigurationException(
                    "PruningCallback(structure='channel') needs inputs to trace the model: pass `example_inputs` "
                    "or set the LightningModule's `example_input_array`."
                )
            with torch.random.fork_rng(devices=[]):
                batch = next(iter(loader))
            example = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(example, torch.Tensor):
                example = example[:2]
        return move_data_to_device(example, pl_module.device)

    def _compact(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        example = self._example
        try:
            small = compact(pl_module, example, self.ignore)
        except (ValueError, RuntimeError) as err:
            raise MisconfigurationException(f"PruningCallback could not compact the model: {err}") from err
        small = small.cpu()  # the deployable copy lives on the CPU, where the report times it
        if isinstance(example, torch.Tensor):
            batch_sizes = (1, 64) if self.report_latency else ()
            masked = pl_module if pl_module.device.type == "cpu" else copy.deepcopy(pl_module).cpu()
            before = profile_model(masked, example[:1].cpu(), batch_sizes=batch_sizes)
            after = profile_model(small, example[:1].cpu(), batch_sizes=batch_sizes)
        else:  # MACs and latency need a single input tensor to repeat
            before = ModelProfile(count_parameters(pl_module), 0, {})
            after = ModelProfile(count_parameters(small), 0, {})
        rank_zero_info(
            compare_profiles(before, after, labels=("masked", "compact"), title="Compaction (MACs = FLOPs / 2)")
        )
        report = {f"compact/{key}_before": value for key, value in before.as_dict().items()}
        report.update({f"compact/{key}_after": value for key, value in after.as_dict().items()})
        self.compaction_report = report
        for logger in trainer.loggers:
            logger.log_metrics(report, step=trainer.global_step)
        path = self.compact_path
        if path is None:
            path = Path(trainer.log_dir or trainer.default_root_dir) / "compact.pt"
        save_compact(small, path)
        rank_zero_info(f"Compact model saved to {path}; reload it with lightning_prune.load_compact(model, path).")
        self.compact_model = small

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.importance.stop()
        if self.masks is not None:
            self.masks.detach()

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._pending_state is not None:  # restored but not yet applied: keep it as it was
            return {**self._pending_state, "lr_scaled": self._lr_scaled}
        masks = self.masks.state_dict() if self.masks is not None else {}
        return {
            "version": _STATE_VERSION,
            "masks": masks,
            "target": self._target,
            "schedule": repr(self.schedule),
            "structure": repr(self.structure),
            "importance": repr(self.importance),
            "importance_state": self.importance.state_dict(),
            "layer_targets": self.layer_targets,
            "rewind": self._rewind_state,
            "lr_scaled": self._lr_scaled,
            # Read-outs for a run resumed after its training ended, when no masks are bound again.
            "achieved_sparsity": self.achieved_sparsity,
            "layer_sparsity": self.layer_sparsity(),
        }

    def _check_resumable(self, state: dict[str, Any], epoch: int) -> None:
        """Refuse saved masks that this configuration cannot continue from; warn where it continues differently."""
        saved_structure = state.get("structure")
        if saved_structure is not None and saved_structure != repr(self.structure):
            raise MisconfigurationException(
                f"PruningCallback cannot resume: the checkpoint's masks were made by {saved_structure}, this callback "
                f"prunes with {self.structure!r}. Resume with the structure the run was started with, or start a new "
                "run."
            )
        saved_target = float(state["target"])
        target_now = self.schedule.sparsity_at(epoch)
        if saved_target > target_now + 1e-12:
            raise MisconfigurationException(
                f"PruningCallback cannot resume: the checkpoint's masks are grown to a target of {saved_target:g}, but "
                f"this callback's schedule {self.schedule!r} asks for {target_now:g} at epoch {epoch}, and pruned "
                f"entries are never revived. Resume with the schedule the run was started with "
                f"({state.get('schedule', 'not recorded')}), or start a new run."
            )
        changed = [
            f"{what} {state[key]} -> {now}"
            for key, what, now in (
                ("schedule", "schedule", repr(self.schedule)),
                ("importance", "importance", repr(self.importance)),
            )
            if state.get(key) is not None and state[key] != now
        ]
        if changed:
            rank_zero_warn(
                f"PruningCallback: resuming with another pruning configuration ({'; '.join(changed)}). The saved masks "
                f"(target {saved_target:g}) are kept and grow from epoch {epoch} on as the new configuration says."
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The optimizer and scheduler states in the same checkpoint hold the scaled rates: never scale twice.
        self._lr_scaled = bool(state_dict.get("lr_scaled", False))
        if state_dict.get("layer_targets") is not None:  # e.g. handed over by a SensitivityCallback
            self.layer_targets = dict(state_dict["layer_targets"])
            self.scope = "layer"
        if state_dict.get("rewind") is not None:
            self._rewind_state = dict(state_dict["rewind"])
        if not state_dict.get("masks"):
            return
        self._pending_state = state_dict
        self._target = float(state_dict["target"])

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks") or {}
        ours = self.state_key in states or type(self).__qualname__ in states
        others = [k for k in states if isinstance(k, str) and k.startswith(type(self).__qualname__)]
        if not ours and others:
            raise MisconfigurationException(
                f"The checkpoint holds pruning state for {others}, but this PruningCallback is {self.state_key}. "
                "Resume with the same `structure` and `scope`, or start a new run."
            )
        if not ours:
            rank_zero_warn(
                "PruningCallback: the checkpoint holds no pruning state (it was written without a PruningCallback, or "
                "by an older version), so the masks start dense and are grown to the schedule's target at the start "
                "of the next training epoch; weights that are already zero score lowest and go first. Resume from a "
                "checkpoint of the pruned run to continue with its exact masks."
            )


def _resolve_structure(
    structure: object,
    round_to: int | None,
    max_layer_sparsity: float | None,
    block_shape: int | Sequence[int] | None = None,
) -> Structure:
    if block_shape is not None:
        if structure != "block":
            raise MisconfigurationException(
                f"`block_shape` applies to structure='block' only, got structure={structure!r}. Set it on the "
                "structure object itself when passing one."
            )
        if round_to is not None or max_layer_sparsity is not None:
            raise MisconfigurationException("`round_to` and `max_layer_sparsity` apply to structure='channel' only.")
        from lightning_prune.patterns import BlockStructure

        return _misconfig(BlockStructure, block_shape)
    channel_args = {"round_to": round_to, "max_layer_sparsity": max_layer_sparsity}
    given = {k: v for k, v in channel_args.items() if v is not None}
    if structure == "channel":
        return _misconfig(
            lambda: ChannelStructure(
                round_to=1 if round_to is None else round_to,
                max_layer_sparsity=0.9 if max_layer_sparsity is None else max_layer_sparsity,
            )
        )
    if given:
        raise MisconfigurationException(
            f"{' and '.join(f'`{k}`' for k in given)} apply to structure='channel' only, got "
            f"structure={structure!r}. Set them on the structure object itself when passing one."
        )
    return _misconfig(build_structure, structure)


#: Per-group keys holding a learning rate that schedulers read back: torch schedulers' ``initial_lr`` (their
#: ``base_lrs`` on construction), and ``OneCycleLR``'s ``max_lr`` and ``min_lr``.
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
#: Scheduler attributes holding per-group learning rates: ``base_lrs`` (every LRScheduler), ``max_lrs``
#: (CyclicLR) and ``_last_lr`` (what ``get_last_lr()`` and LearningRateMonitor report).
_SCHEDULER_LR_ATTRS = ("base_lrs", "max_lrs", "_last_lr")


def _scale_learning_rates(optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any], scale: float) -> None:
    """Multiply every optimizer group's learning rate by ``scale``, and the base rates that ``schedulers`` (and the
    schedulers they chain, e.g. in ``SequentialLR``) compute their rates from, so that they keep the new scale."""

    def scaled(value: Any) -> Any:
        # Out of place: a scheduler's `_last_lr` may hold the very tensor that is a group's `lr`.
        return value * scale if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool) else value

    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for key in _GROUP_LR_KEYS:
                if key in group:
                    group[key] = scaled(group[key])
    seen: set[int] = set()
    stack = list(schedulers)
    while stack:
        scheduler = stack.pop()
        if id(scheduler) in seen:
            continue
        seen.add(id(scheduler))
        for attr in _SCHEDULER_LR_ATTRS:
            values = getattr(scheduler, attr, None)
            if isinstance(values, list):
                setattr(scheduler, attr, [scaled(v) for v in values])
        stack.extend(getattr(scheduler, "_schedulers", None) or [])


def _resolve_importance(importance: object, batches: int | None) -> Importance:
    built: Importance = _misconfig(build_importance, importance)
    if batches is None:
        return built
    if not isinstance(importance, str):
        raise MisconfigurationException(
            f"`importance_batches` applies to an importance given by name; set it on {importance!r} itself."
        )
    if built.collects == "nothing":
        raise MisconfigurationException(
            f"`importance_batches` applies to the criteria that collect statistics ('taylor', 'fisher', 'apoz', "
            f"'activation'), not to importance={importance!r}."
        )
    return _misconfig(type(built), batches)


def _check_layer_targets(targets: object) -> dict[str, float]:
    """Per-layer targets as a plain dict; the patterns are matched against the model at train start."""
    if not isinstance(targets, Mapping) or not targets:
        raise MisconfigurationException(
            f"Per-layer targets must be a non-empty mapping of layer patterns to sparsities, got {targets!r}."
        )
    checked: dict[str, float] = {}
    for pattern, value in targets.items():
        if not isinstance(pattern, str) or not pattern:
            raise MisconfigurationException(f"Per-layer target patterns must be non-empty strings, got {pattern!r}.")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not 0.0 <= value < 1.0:
            raise MisconfigurationException(
                f"The per-layer target of {pattern!r} must be a sparsity in [0, 1), got {value!r}."
            )
        checked[pattern] = float(value)
    return checked


def _check_rewind_epoch(rewind_epoch: object, schedule: SparsitySchedule) -> int | None:
    if rewind_epoch is None:
        return None
    if isinstance(rewind_epoch, bool) or not isinstance(rewind_epoch, int) or rewind_epoch < 0:
        raise MisconfigurationException(f"`rewind_epoch` must be an integer >= 0 or None, got {rewind_epoch!r}.")
    first = schedule.start_epoch  # the first pruning epoch of every schedule
    if rewind_epoch > first:
        raise MisconfigurationException(
            f"`rewind_epoch`={rewind_epoch} is after the first pruning step (epoch {first}): the weights to rewind to "
            f"must be stored before pruning starts. Use an epoch <= {first} (0 rewinds to the initial weights)."
        )
    return rewind_epoch


def _masks_params_of(masks: MaskSet, module: torch.nn.Module) -> bool:
    """True when every masked parameter is still the module's parameter of that name."""
    named = dict(module.named_parameters())
    return all(named.get(n) is p for n, p in zip(masks.names, masks.params))


def _schedule_args(
    schedule: object,
    sparsity: float | None,
    start_epoch: int | None,
    end_epoch: int | None,
    every_n_epochs: int | None,
) -> dict[str, Any]:
    given = {
        "sparsity": sparsity,
        "start_epoch": start_epoch,
        "end_epoch": end_epoch,
        "every_n_epochs": every_n_epochs,
    }
    if isinstance(schedule, SparsitySchedule):
        own = {
            "sparsity": schedule.final_sparsity,
            "start_epoch": schedule.start_epoch,
            "end_epoch": schedule.end_epoch,
            "every_n_epochs": schedule.every_n_epochs,
        }
        clashes = {k: (v, own[k]) for k, v in given.items() if v is not None and v != own[k]}
        if clashes:
            detail = ", ".join(f"`{k}`={v!r} but the schedule has {o!r}" for k, (v, o) in clashes.items())
            raise MisconfigurationException(
                f"PruningCallback got a schedule object and contradicting arguments: {detail}. "
                "Set them on the schedule object only."
            )
        return own
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise MisconfigurationException(
            f"`schedule` must be one of {sorted(SCHEDULES)} or a SparsitySchedule object, got {schedule!r}."
        )
    return {
        "sparsity": _DEFAULT_SPARSITY if sparsity is None else sparsity,
        "start_epoch": 0 if start_epoch is None else start_epoch,
        "end_epoch": end_epoch,
        "every_n_epochs": 1 if every_n_epochs is None else every_n_epochs,
    }


def _misconfig(fn: Any, *args: Any) -> Any:
    """Call ``fn`` and turn the core's ``ValueError``/``TypeError`` into a ``MisconfigurationException``."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as err:
        raise MisconfigurationException(f"PruningCallback: {err}") from err
