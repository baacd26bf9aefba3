"""Schemas and checks for the Hydra configs in ``conf/``: every mistake fails before anything is built.

Two layers, both before training starts:

* **Structured configs** (the dataclasses below, registered in Hydra's ``ConfigStore`` under
  ``lightning_prune/schema``) give the ``pruning``, ``trainer``, ``logger``, ``optimizer``,
  ``regularization`` and ``distillation`` groups a closed set of typed keys. Hydra rejects a misspelt key
  (``trainer.max_epoch=3``) or a wrong type (``pruning.sparsity=abc``, ``trainer.max_epochs=1.5``) while
  composing, naming the key and the value.
* :func:`validate` checks ranges and the relations between keys (``pruning.sparsity=1.5``, ``end_epoch``
  before ``start_epoch``, ``seed=-1``, ``pruning.round_to=0``, channel-only keys such as
  ``pruning.compact=true`` with ``structure=unstructured``, ``regularization.strength=-1``,
  ``distillation.alpha=2``) and raises one :class:`ConfigError` listing every problem as
  ``key=value: what is allowed``. :func:`~lightning_prune.train.train` calls it before
  instantiating anything.

The ``data`` and ``model`` groups stay open: any ``_target_`` with any arguments.

Example:
    >>> from omegaconf import OmegaConf
    >>> validate(OmegaConf.create({"seed": -1}))
    Traceback (most recent call last):
        ...
    lightning_prune.config.ConfigError: Invalid config:
      seed=-1: must be an integer >= 0
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lightning_prune.importance import IMPORTANCES
from lightning_prune.regularization import PENALTIES
from lightning_prune.schedules import SCHEDULES
from lightning_prune.structures import SCOPES, STRUCTURES

__all__ = [
    "SCHEMA_GROUP",
    "CSVLoggerConfig",
    "ConfigError",
    "DistillationConfig",
    "OptimizerConfig",
    "PruningConfig",
    "RegularizationConfig",
    "TensorBoardLoggerConfig",
    "TrainerConfig",
    "channel_importances",
    "register_configs",
    "validate",
]

SCHEMA_GROUP = "lightning_prune/schema"
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
_SHARDED = ("fsdp", "deepspeed")


class ConfigError(ValueError):
    """A composed config that type-checks but asks for something impossible, e.g. ``pruning.sparsity=1.5``."""


@dataclass
class PruningConfig:
    """The arguments of :class:`~lightning_prune.PruningCallback` (see its docstring for each one).

    The ``schedule`` group (``conf/schedule/``, package ``pruning``) sets ``schedule``.
    """

    _target_: str = "lightning_prune.PruningCallback"
    sparsity: float = 0.9
    schedule: str = "cubic"
    start_epoch: int = 0
    end_epoch: int | None = None
    every_n_epochs: int = 1
    importance: str = "magnitude"
    structure: str = "unstructured"
    scope: str = "global"
    ignore: list[str] = field(default_factory=list)
    log_per_layer: bool = True
    # structure="channel" only; null leaves the callback's default (see PruningCallback).
    round_to: int | None = None
    max_layer_sparsity: float | None = None
    compact: bool | None = None
    compact_path: str | None = None  # null: compact.pt in the run directory (train() sets it)
    report_latency: bool = True
    finetune_lr_scale: float = 1.0


@dataclass
class TrainerConfig:
    """The arguments of ``lightning.pytorch.Trainer`` that a config may set, with the Trainer's defaults.

    ``train()`` passes ``logger``, ``callbacks`` and ``default_root_dir`` itself. Union-typed arguments
    (``devices``, ``precision``, ``limit_*_batches``, ...) are ``Any``: the Trainer checks them.
    """

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    strategy: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: Any = None
    fast_dev_run: Any = False
    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time: Any = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    overfit_batches: Any = 0.0
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    deterministic: Any = None
    benchmark: bool | None = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    profiler: str | None = None
    detect_anomaly: bool = False
    barebones: bool = False
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0


@dataclass
class CSVLoggerConfig:
    """``lightning.pytorch.loggers.CSVLogger``; ``save_dir: null`` means the run directory."""

    _target_: str = "lightning.pytorch.loggers.CSVLogger"
    save_dir: str | None = None
    name: str | None = "csv"
    version: Any = None
    prefix: str = ""
    flush_logs_every_n_steps: int = 100


@dataclass
class TensorBoardLoggerConfig:
    """``lightning.pytorch.loggers.TensorBoardLogger``; ``save_dir: null`` means the run directory."""

    _target_: str = "lightning.pytorch.loggers.TensorBoardLogger"
    save_dir: str | None = None
    name: str | None = "tensorboard"
    version: Any = None
    log_graph: bool = False
    default_hp_metric: bool = True
    prefix: str = ""
    sub_dir: str | None = None


@dataclass
class OptimizerConfig:
    """The optimizer arguments of :class:`~lightning_prune.models.ImageClassifier`."""

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_milestones: list[int | None] = field(default_factory=list)
    lr_gamma: float = 0.1


@dataclass
class RegularizationConfig:
    """The penalty of :class:`~lightning_prune.regularization.L1RegularizationMixin`; ``train()`` passes it to the
    module as ``reg_kind``, ``reg_lambda`` (``strength``), ``reg_ignore``, ``reg_warmup_epochs`` and
    ``reg_stop_epoch``."""

    kind: str = "l1"
    strength: float = 1e-4
    ignore: list[str] = field(default_factory=list)
    warmup_epochs: int = 0
    stop_epoch: int | None = None


@dataclass
class DistillationConfig:
    """The arguments of :class:`~lightning_prune.distillation.DistillationCallback`."""

    _target_: str = "lightning_prune.DistillationCallback"
    alpha: float = 0.5
    temperature: float = 4.0
    teacher: str | None = None
    start_epoch: int | None = None


_SCHEMAS: dict[str, type] = {
    "pruning": PruningConfig,
    "trainer": TrainerConfig,
    "csv_logger": CSVLoggerConfig,
    "tensorboard_logger": TensorBoardLoggerConfig,
    "optimizer": OptimizerConfig,
    "regularization": RegularizationConfig,
    "distillation": DistillationConfig,
}


def register_configs() -> None:
    """Store the schemas in Hydra's ``ConfigStore`` as ``lightning_prune/schema/<name>``.

    The files in ``conf/`` extend them with ``defaults: [/lightning_prune/schema/<name>@_here_, _self_]``.
    The ``lightning_prune_searchpath`` Hydra plugin calls this, so any Hydra app with the package installed
    can compose those files. Storing again replaces the entries: calling it twice is harmless.

    Example:
        >>> register_configs()
        >>> "pruning.yaml" in ConfigStore.instance().list(SCHEMA_GROUP)
        True
    """
    store = ConfigStore.instance()
    for name, schema in _SCHEMAS.items():
        store.store(group=SCHEMA_GROUP, name=name, node=schema)


# ---------------------------------------------------------------------------------------------- validation
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Checker:
    """Collects ``key=value: what is allowed`` lines."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, key: str, value: object, allowed: str) -> None:
        self.errors.append(f"{key}={value!r}: {allowed}")

    def integer(self, key: str, value: object, minimum: int, *, optional: bool = False) -> bool:
        if value is None and optional:
            return True
        if not _is_int(value) or value < minimum:  # type: ignore[operator]
            self.fail(key, value, f"must be an integer >= {minimum}" + (" or null" if optional else ""))
            return False
        return True

    def choice(self, key: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
        if value not in choices:
            self.fail(key, value, f"must be one of {list(choices)}")


def validate(cfg: DictConfig) -> None:
    """Check the ranges and relations the schemas cannot express; raise one :class:`ConfigError` for all.

    Checks ``seed``, ``data.batch_size`` (when present), and the ``pruning``, ``trainer``, ``optimizer``,
    ``regularization`` and ``distillation`` groups when present. Each problem is reported as
    ``key=value: what is allowed``.

    Args:
        cfg: A config composed from ``conf/`` (or any config with some of those groups).

    Raises:
        ConfigError: listing every problem found.

    Example:
        >>> from omegaconf import OmegaConf
        >>> validate(OmegaConf.create({"seed": 0, "pruning": {"_target_": "x", "sparsity": 0.5}}))
    """
    check = _Checker()
    for group in ("pruning", "trainer", "logger", "optimizer", "regularization", "distillation"):
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            _check_keys(check, group, node)
    if "seed" in cfg:
        check.integer("seed", cfg.seed, 0)
    data = cfg.get("data")
    if isinstance(data, DictConfig) and "batch_size" in data:
        check.integer("data.batch_size", data.batch_size, 1)
    trainer = cfg.get("trainer")
    max_epochs = None
    if isinstance(trainer, DictConfig):
        max_epochs = _validate_trainer(check, trainer)
    pruning = cfg.get("pruning")
    if isinstance(pruning, DictConfig) and pruning.get("_target_"):
        _validate_pruning(check, pruning, max_epochs, trainer)
    optimizer = cfg.get("optimizer")
    if isinstance(optimizer, DictConfig) and "optimizer" in optimizer:
        _validate_optimizer(check, optimizer)
    regularization = cfg.get("regularization")
    if isinstance(regularization, DictConfig) and "kind" in regularization:
        _validate_regularization(check, regularization)
    distillation = cfg.get("distillation")
    if isinstance(distillation, DictConfig) and distillation.get("_target_"):
        has_pruning = isinstance(pruning, DictConfig) and bool(pruning.get("_target_"))
        _validate_distillation(check, distillation, has_pruning, max_epochs)
    if check.errors:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(check.errors))


def _check_keys(check: _Checker, group: str, node: DictConfig) -> None:
    """Keys added with ``+group.key=...`` get past the schema while composing; catch them here."""
    schema = OmegaConf.get_type(node)
    if schema is None or not dataclasses.is_dataclass(schema):
        return
    allowed = [f.name for f in dataclasses.fields(schema)]
    for key in node:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {group}.{close[0]}?" if close else f"allowed keys: {allowed}"
            check.fail(f"{group}.{key!s}", node.get(str(key)), f"unknown key; {hint}")


def _validate_trainer(check: _Checker, trainer: DictConfig) -> int | None:
    max_epochs = trainer.get("max_epochs")
    if max_epochs is not None and not check.integer("trainer.max_epochs", max_epochs, 1):
        max_epochs = None
    for key in ("num_nodes", "accumulate_grad_batches"):
        if key in trainer:
            check.integer(f"trainer.{key}", trainer[key], 1)
    devices = trainer.get("devices")
    ok = devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1))
    ok = ok or (isinstance(devices, str) and devices.replace(",", "").strip().isdigit())
    ok = ok or (not isinstance(devices, str) and _is_list_of_ints(devices))
    if "devices" in trainer and not ok:
        check.fail("trainer.devices", devices, "must be 'auto', an integer >= 1 (or -1 for all), or a list of ids")
    return max_epochs


def _is_list_of_ints(value: object) -> bool:
    try:
        items = list(value)  # type: ignore[call-overload]
    except TypeError:
        return False
    return bool(items) and all(_is_int(i) and i >= 0 for i in items)


def _validate_pruning(check: _Checker, pruning: DictConfig, max_epochs: int | None, trainer: Any) -> None:
    sparsity = pruning.get("sparsity")
    if sparsity is not None and (not _is_number(sparsity) or not 0.0 <= sparsity < 1.0):
        what = "channels pruned" if pruning.get("structure") == "channel" else "zeros"
        check.fail("pruning.sparsity", sparsity, f"must be in [0, 1) (the final fraction of {what})")
    schedule = pruning.get("schedule", "cubic")
    check.choice("pruning.schedule", schedule, sorted(SCHEDULES))
    start = pruning.get("start_epoch")
    end = pruning.get("end_epoch")
    start_ok = check.integer("pruning.start_epoch", 0 if start is None else start, 0)
    end_ok = check.integer("pruning.end_epoch", end, 0, optional=True)
    check.integer("pruning.every_n_epochs", pruning.get("every_n_epochs", 1), 1)
    start = start or 0
    if start_ok and end_ok and end is not None:
        if end < start:
            check.fail(
                "pruning.end_epoch", end, f"must be >= pruning.start_epoch={start}: the schedule ends before it starts"
            )
        elif schedule == "one_shot" and end != start:
            check.fail(
                "pruning.end_epoch",
                end,
                f"the one_shot schedule prunes once, at pruning.start_epoch={start}: set end_epoch to it or null",
            )
    if schedule == "iterative" and end is None:
        check.fail("pruning.end_epoch", end, "the iterative schedule needs an end epoch (an integer >= start_epoch)")
    if max_epochs is not None and start_ok and end_ok:
        last = end if end is not None else start
        if last >= max_epochs:
            key, value = ("pruning.end_epoch", end) if end is not None else ("pruning.start_epoch", start)
            check.fail(
                key,
                value,
                f"must be < trainer.max_epochs={max_epochs}: pruning must finish within training "
                f"(epochs 0-{max_epochs - 1})",
            )
    if end is None and max_epochs is None and trainer is not None:
        check.fail("pruning.end_epoch", end, "null means the last epoch, which needs trainer.max_epochs to be set")
    check.choice("pruning.importance", pruning.get("importance", "magnitude"), sorted(IMPORTANCES))
    check.choice("pruning.structure", pruning.get("structure", "unstructured"), sorted(STRUCTURES))
    check.choice("pruning.scope", pruning.get("scope", "global"), list(SCOPES))
    _validate_structure(check, pruning)
    scale = pruning.get("finetune_lr_scale", 1.0)
    if not _is_number(scale) or not scale > 0:
        check.fail(
            "pruning.finetune_lr_scale",
            scale,
            "must be a number > 0 (the learning rates' factor once pruning ends; 0.1 as in Han et al., 2015)",
        )
    strategy = str(trainer.get("strategy", "")) if isinstance(trainer, DictConfig) else ""
    if any(name in strategy.lower() for name in _SHARDED):
        check.fail("trainer.strategy", strategy, "pruning needs whole parameters on every rank: use 'ddp' or 'auto'")


def channel_importances() -> list[str]:
    """The names in :data:`~lightning_prune.importance.IMPORTANCES` that ``structure="channel"`` can score with.

    Example:
        >>> channel_importances()
        ['l1', 'l2', 'magnitude']
    """
    from lightning_prune.structured import ChannelStructure  # Torch-Pruning itself is imported only when tracing

    structure = ChannelStructure()
    names = []
    for name, build in sorted(IMPORTANCES.items()):
        try:
            structure.check_importance(build())
        except ValueError:
            continue
        names.append(name)
    return names


def _validate_structure(check: _Checker, pruning: DictConfig) -> None:
    """The keys that only channel pruning reads, and the importances it supports."""
    structure = pruning.get("structure", "unstructured")
    channel = structure == "channel"
    only = f"applies to pruning.structure=channel only (got structure={structure!r}); set it to null"
    round_to = pruning.get("round_to")
    if round_to is not None:
        if not _is_int(round_to) or round_to < 1:
            check.fail(
                "pruning.round_to",
                round_to,
                "must be an integer >= 1 (each pruned layer keeps a multiple of it) or null",
            )
        elif not channel:
            check.fail("pruning.round_to", round_to, only)
    max_layer = pruning.get("max_layer_sparsity")
    if max_layer is not None:
        if not _is_number(max_layer) or not 0.0 <= max_layer < 1.0:
            check.fail(
                "pruning.max_layer_sparsity",
                max_layer,
                "must be in [0, 1) (the largest fraction of one layer's channels pruned) or null",
            )
        elif not channel:
            check.fail("pruning.max_layer_sparsity", max_layer, only)
    compact = pruning.get("compact")
    if compact and not channel:
        check.fail(
            "pruning.compact",
            compact,
            f"removes pruned channels and needs pruning.structure=channel (got structure={structure!r}); "
            "set it to false or null",
        )
    importance = pruning.get("importance", "magnitude")
    if channel and importance in IMPORTANCES:
        supported = channel_importances()
        if importance not in supported:
            check.fail(
                "pruning.importance",
                importance,
                f"structure=channel scores channels by a norm of their weights: must be one of {supported}",
            )


def _validate_optimizer(check: _Checker, optimizer: DictConfig) -> None:
    check.choice("optimizer.optimizer", optimizer.optimizer, OPTIMIZERS)
    lr = optimizer.get("lr")
    if not _is_number(lr) or not lr > 0:
        check.fail("optimizer.lr", lr, "must be a number > 0")
    momentum = optimizer.get("momentum", 0.0)
    if not _is_number(momentum) or not 0.0 <= momentum < 1.0:
        check.fail("optimizer.momentum", momentum, "must be in [0, 1)")
    weight_decay = optimizer.get("weight_decay", 0.0)
    if not _is_number(weight_decay) or weight_decay < 0:
        check.fail("optimizer.weight_decay", weight_decay, "must be a number >= 0")
    gamma = optimizer.get("lr_gamma", 0.1)
    if not _is_number(gamma) or not gamma > 0:
        check.fail("optimizer.lr_gamma", gamma, "must be a number > 0")
    milestones = list(optimizer.get("lr_milestones") or [])
    if not all(_is_int(m) and m >= 0 for m in milestones):
        check.fail(
            "optimizer.lr_milestones",
            milestones,
            "must be integer epochs >= 0; set it explicitly when pruning.end_epoch is null",
        )


def _validate_regularization(check: _Checker, regularization: DictConfig) -> None:
    check.choice("regularization.kind", regularization.kind, sorted(PENALTIES))
    strength = regularization.get("strength", 0.0)
    if not _is_number(strength) or not strength >= 0:
        check.fail("regularization.strength", strength, "must be a number >= 0 (the penalty's weight lambda)")
    check.integer("regularization.warmup_epochs", regularization.get("warmup_epochs", 0), 0)
    check.integer("regularization.stop_epoch", regularization.get("stop_epoch"), 0, optional=True)


def _validate_distillation(
    check: _Checker, distillation: DictConfig, has_pruning: bool, max_epochs: int | None
) -> None:
    alpha = distillation.get("alpha", 0.5)
    if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
        check.fail("distillation.alpha", alpha, "must be in [0, 1] (the distillation term's weight)")
    temperature = distillation.get("temperature", 4.0)
    if not _is_number(temperature) or not temperature > 0:
        check.fail("distillation.temperature", temperature, "must be a number > 0")
    start = distillation.get("start_epoch")
    start_ok = check.integer("distillation.start_epoch", start, 0, optional=True)
    if start_ok and start is not None and max_epochs is not None and start >= max_epochs:
        check.fail("distillation.start_epoch", start, f"must be < trainer.max_epochs={max_epochs}")
    if start is None and distillation.get("teacher") is None and not has_pruning:
        check.fail(
            "distillation.start_epoch",
            start,
            "null means when pruning starts, but there is no pruning callback (pruning=none): set it, or set "
            "distillation.teacher",
        )
