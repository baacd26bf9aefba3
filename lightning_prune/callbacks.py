"""Lightning adapters: wire schedules, importance, structures and masks to ``Trainer`` hooks."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_prune.importance import Importance, build_importance
from lightning_prune.masking import MaskSet, prunable_parameters
from lightning_prune.schedules import SCHEDULES, SparsitySchedule, build_schedule
from lightning_prune.stats import ModelProfile, compare_profiles, count_parameters, profile_model
from lightning_prune.structured import ChannelStructure, compact, save_compact
from lightning_prune.structures import SCOPES, Structure, build_structure

_DEFAULT_SPARSITY = 0.9
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed")


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
            relative to what is left. Defaults to 0.9 when ``schedule`` is a name; taken from the schedule when
            it is a :class:`~lightning_prune.schedules.SparsitySchedule` object.
        schedule: ``"one_shot"``, ``"linear"``, ``"cubic"`` (Zhu & Gupta, 2017), ``"exponential"``,
            ``"iterative"`` or a schedule object.
        start_epoch: first pruning epoch (default 0).
        end_epoch: epoch at which ``sparsity`` is reached; ``None`` means the last training epoch
            (``max_epochs - 1``). Leave epochs after it for fine-tuning.
        every_n_epochs: prune every n epochs between ``start_epoch`` and ``end_epoch`` (default 1).
        importance: ``"magnitude"``, ``"l1"``, ``"l2"`` or an :class:`~lightning_prune.importance.Importance`
            object. For channels, ``"magnitude"`` is ``"l1"``: the L1 norm over every entry a channel owns.
        structure: ``"unstructured"`` (single weights), ``"channel"`` (whole coupled channels, see
            :class:`~lightning_prune.structured.ChannelStructure`) or a
            :class:`~lightning_prune.structures.Structure` object. With channels, ``sparsity`` is the fraction
            of channels pruned.
        scope: ``"global"`` (one threshold across all prunable layers) or ``"layer"`` (each layer reaches
            ``sparsity`` on its own).
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
    """

    def __init__(
        self,
        sparsity: float | None = None,
        schedule: str | SparsitySchedule = "cubic",
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        every_n_epochs: int | None = None,
        importance: str | Importance = "magnitude",
        structure: str | Structure = "unstructured",
        scope: str = "global",
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
    ) -> None:
        super().__init__()
        self._schedule_spec = schedule
        self._schedule_args = _schedule_args(schedule, sparsity, start_epoch, end_epoch, every_n_epochs)
        # Build once now so that every bad argument fails at construction, not epochs into a run.
        self.schedule: SparsitySchedule = self._build_schedule(end_epoch=None)
        self.importance: Importance = _misconfig(build_importance, importance)
        self.structure: Structure = _resolve_structure(structure, round_to, max_layer_sparsity)
        _misconfig(self.structure.check_importance, self.importance)
        if scope not in SCOPES:
            raise MisconfigurationException(f"`scope` must be one of {list(SCOPES)}, got {scope!r}.")
        self.scope = scope
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
        self._target = 0.0  # the target sparsity the masks have been grown to
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public read-outs
    @property
    def sparsity(self) -> float:
        """The schedule's final sparsity."""
        return self.schedule.final_sparsity

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of pruned entries among the prunable weights, of channels for channel pruning (0.0
        before any pruning)."""
        return self.structure.sparsity(self.masks) if self.masks is not None else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries per prunable parameter (of channels per layer, for channels)."""
        return self.structure.layer_sparsity(self.masks) if self.masks is not None else {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(structure=type(self.structure).__name__, scope=self.scope)

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
                "parameters on every rank. Use `strategy='ddp'` (or 'ddp_spawn')."
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
            _misconfig(self.structure.check_target, self.masks, self.sparsity, self.scope)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            try:
                self.masks.load_state_dict(state["masks"])
            except ValueError as err:
                raise MisconfigurationException(f"PruningCallback cannot resume: {err}") from err
            self._target = float(state["target"])
        if self.masks.num_pruned() > 0:
            self.masks.attach(trainer.optimizers)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None:  # set in on_train_start
            return
        target = self.schedule.sparsity_at(trainer.current_epoch)
        if target > self._target:
            try:
                self.structure.prune_(self.masks, self.importance, target, self.scope)  # type: ignore[arg-type]
            except ValueError as err:
                raise MisconfigurationException(f"PruningCallback at epoch {trainer.current_epoch}: {err}") from err
            self._target = target
            self.masks.attach(trainer.optimizers)  # (re)installs hooks and zeroes the new entries' state
        self._start_finetuning(trainer)

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

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None:
            return
        pl_module.log("prune/sparsity", self.achieved_sparsity, prog_bar=True, on_step=False, on_epoch=True)
        pl_module.log("prune/target", self._target, on_step=False, on_epoch=True)
        if self.log_per_layer:
            for name, value in self.layer_sparsity().items():
                pl_module.log(f"prune/sparsity/{name}", value, on_step=False, on_epoch=True)

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
        if self.masks is not None:
            self.masks.detach()

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._pending_state is not None:  # restored but not yet applied: keep it as it was
            return {**self._pending_state, "lr_scaled": self._lr_scaled}
        masks = self.masks.state_dict() if self.masks is not None else {}
        return {"masks": masks, "target": self._target, "schedule": repr(self.schedule), "lr_scaled": self._lr_scaled}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The optimizer and scheduler states in the same checkpoint hold the scaled rates: never scale twice.
        self._lr_scaled = bool(state_dict.get("lr_scaled", False))
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
                "PruningCallback: the checkpoint holds no pruning state; pruning starts from dense masks at the "
                "schedule's current target."
            )


def _resolve_structure(structure: object, round_to: int | None, max_layer_sparsity: float | None) -> Structure:
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
