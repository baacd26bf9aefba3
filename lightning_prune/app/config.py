"""Schemas for the Hydra configs in ``conf/``: with the checks of :mod:`~lightning_prune.app.validation`, every
mistake fails before anything is built.

Two layers, both before training starts:

* **Structured configs** (the dataclasses below, registered in Hydra's ``ConfigStore`` under
  ``lightning_prune/schema``) give the ``pruning``, ``trainer``, ``logger``, ``optimizer``,
  ``regularization``, ``distillation`` and ``export`` groups a closed set of typed keys. Hydra rejects a misspelt key
  (``trainer.max_epoch=3``) or a wrong type (``pruning.sparsity=abc``, ``trainer.max_epochs=1.5``) while
  composing, naming the key and the value.
* :func:`~lightning_prune.app.validation.validate` checks ranges and the relations between keys
  (``pruning.sparsity=1.5``, ``end_epoch`` before ``start_epoch``, ``seed=-1``, ``pruning.round_to=0``,
  channel-only keys such as ``pruning.compact=true`` with ``structure=unstructured``,
  ``regularization.strength=-1``, ``distillation.alpha=2``) and raises one :class:`ConfigError` listing every problem as
  ``key=value: what is allowed``. :func:`~lightning_prune.app.train.train` calls it before
  instantiating anything.

The ``data`` and ``model`` groups stay open: any ``_target_`` with any arguments.

Example:
    >>> PruningConfig().sparsity
    0.9
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

SCHEMA_GROUP = "lightning_prune/schema"


#: Strategies that shard parameters across ranks, which pruning cannot work with (validation refuses them).
SHARDED_STRATEGIES: tuple[str, ...] = ("fsdp", "deepspeed")


class ConfigError(ValueError):
    """A composed config that type-checks but asks for something impossible, e.g. ``pruning.sparsity=1.5``."""


@dataclass
class PruningConfig:
    """The arguments of :class:`~lightning_prune.PruningCallback` (see its docstring for each one).

    The ``schedule`` group (``conf/schedule/``, package ``pruning``) sets ``schedule``.
    """

    _target_: str = "lightning_prune.PruningCallback"
    # A number in [0, 1), or per-layer targets {layer pattern: sparsity} (checked by `validate`).
    sparsity: Any = 0.9
    schedule: str = "cubic"
    start_epoch: int = 0
    end_epoch: int | None = None
    every_n_epochs: int = 1
    importance: str = "magnitude"
    structure: str = "unstructured"  # unstructured | channel | block | an N:M pattern such as "2:4"
    scope: str | None = "global"  # null: global, or layer for per-layer targets
    ignore: list[str] = field(default_factory=list)
    log_per_layer: bool = True
    # structure="channel" only; null leaves the callback's default (see PruningCallback).
    round_to: int | None = None
    max_layer_sparsity: float | None = None
    compact: bool | None = None
    compact_path: str | None = None  # null: compact.pt in the run directory (train() sets it)
    report_latency: bool = True
    finetune_lr_scale: float = 1.0
    importance_batches: int | None = None  # taylor, fisher, apoz, activation: steps of statistics per pruning step
    block_shape: list[int] | None = None  # structure=block only: [rows, columns]
    rewind_epoch: int | None = None  # rewind surviving weights to this epoch after every pruning step
    # pruning=wanda|sparsegpt|magnitude_oneshot: OneShotPruning's arguments (one-shot pruning when fitting starts)
    oneshot: Any = None
    # DepthPruning's arguments (DepthConfig): whole blocks removed when fitting starts, before this callback's pruning,
    # e.g. pruning=heads 'pruning.depth={num_blocks: 1}'
    depth: Any = None


@dataclass
class DepthConfig:
    """The arguments of :class:`~lightning_prune.callbacks.DepthPruning` (``pruning.depth``: depth pruning)."""

    num_blocks: Any = 1  # blocks to remove (an integer >= 1) or a fraction of them in (0, 1)
    score: str = "influence"  # influence | angular | relative_norm
    num_samples: int = 128  # calibration samples: the first ones of the train dataloader
    blocks: str | None = None  # null: the model's block list; or its container's name (model.layers)


@dataclass
class AllocationConfig:
    """The arguments of :class:`~lightning_prune.callbacks.sensitivity.SensitivityCallback`
    (``allocation=sensitivity``)."""

    _target_: str = "lightning_prune.SensitivityCallback"
    target_sparsity: float | None = None
    macs_budget: float | None = None
    max_drop: float | None = None
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98])


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
    """The penalty of :class:`~lightning_prune.training.regularization.L1RegularizationMixin`; ``train()`` passes
    it to the module as ``reg_kind``, ``reg_lambda`` (``strength``), ``reg_ignore``, ``reg_warmup_epochs`` and
    ``reg_stop_epoch``."""

    kind: str = "l1"
    strength: float = 1e-4
    ignore: list[str] = field(default_factory=list)
    warmup_epochs: int = 0
    stop_epoch: int | None = None


@dataclass
class DistillationConfig:
    """The arguments of :class:`~lightning_prune.callbacks.distillation.DistillationCallback`."""

    _target_: str = "lightning_prune.DistillationCallback"
    alpha: float = 0.5
    temperature: float = 4.0
    teacher: str | None = None
    start_epoch: int | None = None


@dataclass
class ExportConfig:
    """What ``train()`` exports after testing (:func:`lightning_prune.deploy.report.export_model`'s arguments).

    ``forms`` empty (or the group ``export=none``) exports nothing. ``dir`` is relative to the run directory.
    """

    forms: list[str] = field(default_factory=lambda: ["dense", "sparse", "torch_export", "onnx"])
    dir: str = "export"
    sparse_kernels: bool = True
    latency: bool = True
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    blocks: int = 3
    repeats: int = 10
    threads: int | None = None
    compact: Any = "auto"  # true | false | auto


_SCHEMAS: dict[str, type] = {
    "pruning": PruningConfig,
    "depth": DepthConfig,
    "trainer": TrainerConfig,
    "csv_logger": CSVLoggerConfig,
    "tensorboard_logger": TensorBoardLoggerConfig,
    "optimizer": OptimizerConfig,
    "regularization": RegularizationConfig,
    "distillation": DistillationConfig,
    "export": ExportConfig,
    "allocation": AllocationConfig,
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
