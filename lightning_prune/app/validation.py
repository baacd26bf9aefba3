"""Checks of a composed run config that its schemas cannot express: ranges, combinations, options of groups.

:func:`validate` runs first in :func:`lightning_prune.app.train.train` and raises one
:class:`~lightning_prune.app.config.ConfigError` that names every offending key, before anything is built.

Example:
    >>> from omegaconf import OmegaConf
    >>> validate(OmegaConf.create({"seed": -1}))
    Traceback (most recent call last):
        ...
    lightning_prune.app.config.ConfigError: Invalid config:
      seed=-1: must be an integer >= 0
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_prune._helpers import is_int, is_number
from lightning_prune.app.config import SHARDED_STRATEGIES, ConfigError
from lightning_prune.criteria import IMPORTANCES
from lightning_prune.criteria.depth import BLOCK_SCORES
from lightning_prune.models.optim import OPTIMIZERS
from lightning_prune.schedules import SCHEDULES
from lightning_prune.structures import STRUCTURES
from lightning_prune.structures.base import SCOPES
from lightning_prune.training.regularization import PENALTIES

# ---------------------------------------------------------------------------------------------- validation

#: The top-level keys a config composed from ``conf/`` can have: the root keys of ``config.yaml``, one per config
#: group (``+sensitivity=default`` adds its group), and the keys ``hparams_search=optuna`` adds. Any other
#: top-level key came from a ``+key=value`` override the config does not know, and :func:`validate` refuses it.
ROOT_KEYS: tuple[str, ...] = (
    "task_name",
    "seed",
    "output_dir",
    "ckpt_path",
    "module",
    "hydra",
    "data",
    "model",
    "pruning",
    "schedule",
    "trainer",
    "logger",
    "optimizer",
    "regularization",
    "distillation",
    "allocation",
    "callbacks",
    "export",
    "sensitivity",
    "experiment",
    "hparams_search",
    "objective",
    "max_accuracy_drop",
)


class _Checker:
    """Collects ``key=value: what is allowed`` lines."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, key: str, value: object, allowed: str) -> None:
        self.errors.append(f"{key}={value!r}: {allowed}")

    def integer(self, key: str, value: object, minimum: int, *, optional: bool = False) -> bool:
        if value is None and optional:
            return True
        if not is_int(value) or value < minimum:
            self.fail(key, value, f"must be an integer >= {minimum}" + (" or null" if optional else ""))
            return False
        return True

    def choice(self, key: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
        if value not in choices:
            self.fail(key, value, f"must be one of {list(choices)}")


def validate(cfg: DictConfig) -> None:
    """Check the ranges and relations the schemas cannot express; raise one :class:`ConfigError` for all.

    Checks that every top-level key is one the project's configs have (:data:`ROOT_KEYS`; ``+foo=bar`` adds
    one they do not), ``seed``, ``data.batch_size`` (when present), and the ``pruning``, ``trainer``, ``optimizer``,
    ``regularization``, ``distillation`` and ``export`` groups when present. Each problem is reported as
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
    _check_root_keys(check, cfg)
    for group in (
        "pruning",
        "trainer",
        "logger",
        "optimizer",
        "regularization",
        "distillation",
        "export",
        "allocation",
    ):
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            _check_keys(check, group, node)
    if "seed" in cfg:
        check.integer("seed", cfg.seed, 0)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and (not isinstance(ckpt_path, str) or not ckpt_path):
        check.fail("ckpt_path", ckpt_path, "must be the path of a checkpoint, `last` (resume this run), or null")
    data = cfg.get("data")
    if isinstance(data, DictConfig) and "batch_size" in data:
        check.integer("data.batch_size", data.batch_size, 1)
    trainer = cfg.get("trainer")
    max_epochs = None
    if isinstance(trainer, DictConfig):
        max_epochs = _validate_trainer(check, trainer)
    logger = cfg.get("logger")
    if isinstance(logger, DictConfig) and logger.get("flush_logs_every_n_steps") is not None:
        check.integer("logger.flush_logs_every_n_steps", logger.flush_logs_every_n_steps, 1)
    pruning = cfg.get("pruning")
    if isinstance(pruning, DictConfig) and pruning.get("_target_"):
        _validate_pruning(check, pruning, max_epochs, trainer)
    depth = pruning.get("depth") if isinstance(pruning, DictConfig) else None
    if isinstance(depth, DictConfig):
        _validate_depth(check, depth)
    optimizer = cfg.get("optimizer")
    if isinstance(optimizer, DictConfig) and "optimizer" in optimizer:
        _validate_optimizer(check, optimizer)
    regularization = cfg.get("regularization")
    if isinstance(regularization, DictConfig) and "kind" in regularization:
        _validate_regularization(check, regularization)
    distillation = cfg.get("distillation")
    has_pruning = isinstance(pruning, DictConfig) and bool(pruning.get("_target_"))
    if isinstance(distillation, DictConfig) and distillation.get("_target_"):
        _validate_distillation(check, distillation, has_pruning, max_epochs)
    allocation = cfg.get("allocation")
    if isinstance(allocation, DictConfig) and allocation.get("_target_"):
        oneshot = has_pruning and bool(pruning.get("oneshot"))
        _validate_allocation(check, allocation, has_pruning, oneshot)
    export = cfg.get("export")
    if isinstance(export, DictConfig) and "forms" in export:
        _validate_export(check, export)
    module = cfg.get("module")
    if isinstance(module, DictConfig) and str(module.get("_target_", "")).endswith("LanguageModel"):
        _validate_language_run(check, cfg)
    if check.errors:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(check.errors))


def _validate_language_run(check: _Checker, cfg: DictConfig) -> None:
    """``module=language`` reports perplexity: the parts of a run that measure accuracy do not apply."""
    allocation = cfg.get("allocation")
    target = str(allocation.get("_target_")) if isinstance(allocation, DictConfig) else "None"
    if target != "None" and not target.startswith("lightning_prune.oneshot"):
        check.fail(
            "allocation", target, "measures accuracy, which module=language does not report: use allocation=none"
        )
    export = cfg.get("export")
    if isinstance(export, DictConfig) and export.get("forms"):
        check.fail("export.forms", list(export.forms), "exports classifiers; with module=language use export=none")
    if cfg.get("objective") == "max_sparsity":
        check.fail(
            "objective", "max_sparsity", "searches within an accuracy drop, which module=language does not report"
        )


def _validate_depth(check: _Checker, depth: DictConfig) -> None:
    """``pruning.depth``: :class:`~lightning_prune.callbacks.DepthPruning`'s arguments."""
    unknown = [str(k) for k in depth if str(k) not in ("_target_", "num_blocks", "score", "num_samples", "blocks")]
    for key in unknown:
        check.fail(
            f"pruning.depth.{key}", depth.get(key), "unknown key; allowed: num_blocks, score, num_samples, blocks"
        )
    blocks = depth.get("num_blocks", 1)
    if not ((is_int(blocks) and blocks >= 1) or (not is_int(blocks) and is_number(blocks) and 0 < blocks < 1)):
        check.fail(
            "pruning.depth.num_blocks", blocks, "must be an integer >= 1 (blocks to remove) or a fraction in (0, 1)"
        )
    check.choice("pruning.depth.score", depth.get("score", "influence"), sorted(BLOCK_SCORES))
    check.integer("pruning.depth.num_samples", depth.get("num_samples", 128), 1)
    name = depth.get("blocks")
    if name is not None and not isinstance(name, str):
        check.fail("pruning.depth.blocks", name, "must be the name of the blocks' container (model.layers) or null")


def _check_root_keys(check: _Checker, cfg: DictConfig) -> None:
    """Top-level keys added with ``+key=value`` (or ``++key=value``) that nothing reads: refuse them by name."""
    for key in cfg:
        if str(key) not in ROOT_KEYS:
            close = difflib.get_close_matches(str(key), ROOT_KEYS, n=1)
            hint = f"did you mean {close[0]}?" if close else "remove the override (`+` adds a key nothing reads)"
            check.fail(str(key), cfg.get(str(key)), f"unknown top-level key; {hint}")


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
    # Optional counts (null: Lightning's default) and their smallest allowed value.
    for key, minimum in (
        ("min_epochs", 0),
        ("min_steps", 0),
        ("check_val_every_n_epoch", 1),
        ("num_sanity_val_steps", -1),
        ("log_every_n_steps", 1),
        ("reload_dataloaders_every_n_epochs", 0),
    ):
        if trainer.get(key) is not None:
            check.integer(f"trainer.{key}", trainer[key], minimum)
    if "max_steps" in trainer:
        check.integer("trainer.max_steps", trainer.max_steps, -1)
    if trainer.get("sync_batchnorm") and trainer.get("accelerator") == "cpu":
        check.fail(
            "trainer.sync_batchnorm",
            True,
            "PyTorch's SyncBatchNorm needs GPUs: set it to false with trainer.accelerator=cpu (trainer=ddp_cpu does)",
        )
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (not is_number(clip) or clip < 0):
        check.fail("trainer.gradient_clip_val", clip, "must be a number >= 0 (0 or null: no clipping)")
    interval = trainer.get("val_check_interval")
    if interval is not None and (
        not is_number(interval) or interval <= 0 or (isinstance(interval, float) and interval > 1)
    ):
        check.fail(
            "trainer.val_check_interval",
            interval,
            "must be a fraction of an epoch in (0, 1] or a number of batches >= 1 (null: once per epoch)",
        )
    devices = trainer.get("devices")
    ok = devices == "auto" or (is_int(devices) and (devices >= 1 or devices == -1))
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
    return bool(items) and all(is_int(i) and i >= 0 for i in items)


def _validate_pruning(check: _Checker, pruning: DictConfig, max_epochs: int | None, trainer: Any) -> None:
    sparsity = pruning.get("sparsity")
    what = "channels pruned" if pruning.get("structure") == "channel" else "zeros"
    if isinstance(sparsity, DictConfig):
        if not sparsity:
            check.fail("pruning.sparsity", {}, "per-layer targets need at least one {layer pattern: sparsity}")
        for pattern, value in sparsity.items():
            if not is_number(value) or not 0.0 <= value < 1.0:
                check.fail(
                    f"pruning.sparsity.{pattern!s}", value, f"must be in [0, 1) (the layer's final fraction of {what})"
                )
        if pruning.get("scope") not in (None, "layer"):
            check.fail(
                "pruning.scope",
                pruning.get("scope"),
                "per-layer targets (pruning.sparsity as a mapping) prune each layer to its own: set layer or null",
            )
    elif sparsity is not None and (not is_number(sparsity) or not 0.0 <= sparsity < 1.0):
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
    structure = pruning.get("structure", "unstructured")
    if not (isinstance(structure, str) and ":" in structure):
        check.choice("pruning.structure", structure, [*sorted(STRUCTURES), "an N:M pattern such as '1:4'"])
    scope = pruning.get("scope", "global")
    if scope is not None:
        check.choice("pruning.scope", scope, list(SCOPES))
    _validate_structure(check, pruning)
    _validate_criterion(check, pruning, start if start_ok else 0)
    scale = pruning.get("finetune_lr_scale", 1.0)
    if not is_number(scale) or not scale > 0:
        check.fail(
            "pruning.finetune_lr_scale",
            scale,
            "must be a number > 0 (the learning rates' factor once pruning ends; 0.1 as in Han et al., 2015)",
        )
    strategy = str(trainer.get("strategy", "")) if isinstance(trainer, DictConfig) else ""
    if any(name in strategy.lower() for name in SHARDED_STRATEGIES):
        check.fail("trainer.strategy", strategy, "pruning needs whole parameters on every rank: use 'ddp' or 'auto'")


def channel_importances() -> list[str]:
    """The names in :data:`~lightning_prune.criteria.IMPORTANCES` that ``structure="channel"`` can score with.

    Example:
        >>> channel_importances()
        ['activation', 'apoz', 'fisher', 'l1', 'l2', 'magnitude', 'taylor']
    """
    from lightning_prune.structures.channel import (
        ChannelStructure,  # Torch-Pruning itself is imported only when tracing
    )

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
        if not is_int(round_to) or round_to < 1:
            check.fail(
                "pruning.round_to",
                round_to,
                "must be an integer >= 1 (each pruned layer keeps a multiple of it) or null",
            )
        elif not channel:
            check.fail("pruning.round_to", round_to, only)
    max_layer = pruning.get("max_layer_sparsity")
    if max_layer is not None:
        if not is_number(max_layer) or not 0.0 <= max_layer < 1.0:
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
    block_shape = pruning.get("block_shape")
    if block_shape is not None:
        shape: list[Any] = list(block_shape) if not isinstance(block_shape, (int, str)) else [block_shape]
        if not 1 <= len(shape) <= 2 or not all(is_int(b) and int(b) >= 1 for b in shape):
            check.fail(
                "pruning.block_shape", block_shape, "must be [rows, columns] of positive integers (e.g. [4, 4]) or null"
            )
        elif structure != "block":
            check.fail(
                "pruning.block_shape", list(shape), f"applies to pruning.structure=block only (got {structure!r})"
            )
    built = _structure_or_fail(check, structure)
    if built is None:
        return
    importance = pruning.get("importance", "magnitude")
    if importance in IMPORTANCES:
        from lightning_prune.criteria import build_importance

        try:
            built.check_importance(build_importance(importance))
        except ValueError as err:
            check.fail("pruning.importance", importance, f"not with pruning.structure={structure!r}: {err}")
    limit = getattr(built, "default_sparsity", None)  # N:M: at most n / m
    sparsity = pruning.get("sparsity")
    if limit is not None and is_number(sparsity) and sparsity > limit + 1e-12:
        check.fail(
            "pruning.sparsity", sparsity, f"{structure} prunes at most {limit:g} of the weights: set it to {limit:g}"
        )


def _structure_or_fail(check: _Checker, structure: object) -> Any:
    """The structure ``structure`` names, or None after recording why it names none."""
    from lightning_prune.structures import build_structure

    if not isinstance(structure, str) or (structure not in STRUCTURES and ":" not in structure):
        return None  # reported by the choice check
    try:
        return build_structure(structure)
    except ValueError as err:
        check.fail("pruning.structure", structure, str(err))
        return None


def _validate_criterion(check: _Checker, pruning: DictConfig, start: int) -> None:
    """The statistics window of the data-driven criteria, and rewinding."""
    importance = pruning.get("importance", "magnitude")
    collects = importance in IMPORTANCES and IMPORTANCES[importance]().collects != "nothing"
    batches = pruning.get("importance_batches")
    if batches is not None and check.integer("pruning.importance_batches", batches, 1) and not collects:
        check.fail(
            "pruning.importance_batches",
            batches,
            f"applies to importance taylor, fisher, apoz or activation (got {importance!r}); set it to null",
        )
    if collects and start == 0 and pruning.get("schedule", "cubic") in ("one_shot", "iterative"):
        check.fail(
            "pruning.start_epoch",
            0,
            f"importance={importance} scores from statistics of training steps, so its first pruning step must come "
            "after an epoch of training: set it to 1 or later",
        )
    rewind = pruning.get("rewind_epoch")
    if rewind is not None and check.integer("pruning.rewind_epoch", rewind, 0, optional=True) and rewind > start:
        check.fail(
            "pruning.rewind_epoch",
            rewind,
            f"must be <= pruning.start_epoch={start}: the weights to rewind to are stored before pruning starts",
        )


def _validate_allocation(check: _Checker, allocation: DictConfig, has_pruning: bool, oneshot: bool = False) -> None:
    if str(allocation.get("_target_")).startswith("lightning_prune.oneshot"):  # allocation=owl
        if not oneshot:
            check.fail(
                "allocation",
                allocation.get("_target_"),
                "sets the layer sparsities of one-shot pruning: use pruning=wanda or pruning=sparsegpt",
            )
        return
    if not has_pruning:
        check.fail(
            "allocation",
            allocation.get("_target_"),
            "allocates per-layer targets of a pruning callback: pruning=none has none",
        )
    for key, low, high in (("target_sparsity", 0.0, 1.0), ("max_drop", 0.0, 1.0)):
        value = allocation.get(key)
        if value is not None and (not is_number(value) or not low <= value < high):
            check.fail(f"allocation.{key}", value, f"must be in [{low:g}, {high:g}) or null")
    budget = allocation.get("macs_budget")
    if budget is not None and (not is_number(budget) or not 0.0 < budget <= 1.0):
        check.fail("allocation.macs_budget", budget, "must be a fraction of the dense MACs in (0, 1] or null")
    if budget is not None and allocation.get("target_sparsity") is not None:
        check.fail("allocation.macs_budget", budget, "give either allocation.target_sparsity or allocation.macs_budget")
    ratios = list(allocation.get("ratios") or [])
    if not ratios or not all(is_number(r) and 0.0 <= r < 1.0 for r in ratios):
        check.fail("allocation.ratios", ratios, "must be a non-empty list of sparsities in [0, 1)")


def _validate_optimizer(check: _Checker, optimizer: DictConfig) -> None:
    check.choice("optimizer.optimizer", optimizer.optimizer, OPTIMIZERS)
    lr = optimizer.get("lr")
    if not is_number(lr) or not lr > 0:
        check.fail("optimizer.lr", lr, "must be a number > 0")
    momentum = optimizer.get("momentum", 0.0)
    if not is_number(momentum) or not 0.0 <= momentum < 1.0:
        check.fail("optimizer.momentum", momentum, "must be in [0, 1)")
    weight_decay = optimizer.get("weight_decay", 0.0)
    if not is_number(weight_decay) or weight_decay < 0:
        check.fail("optimizer.weight_decay", weight_decay, "must be a number >= 0")
    gamma = optimizer.get("lr_gamma", 0.1)
    if not is_number(gamma) or not gamma > 0:
        check.fail("optimizer.lr_gamma", gamma, "must be a number > 0")
    milestones = list(optimizer.get("lr_milestones") or [])
    if not all(is_int(m) and m >= 0 for m in milestones):
        check.fail(
            "optimizer.lr_milestones",
            milestones,
            "must be integer epochs >= 0; set it explicitly when pruning.end_epoch is null",
        )


def _validate_regularization(check: _Checker, regularization: DictConfig) -> None:
    check.choice("regularization.kind", regularization.kind, sorted(PENALTIES))
    strength = regularization.get("strength", 0.0)
    if not is_number(strength) or not strength >= 0:
        check.fail("regularization.strength", strength, "must be a number >= 0 (the penalty's weight lambda)")
    check.integer("regularization.warmup_epochs", regularization.get("warmup_epochs", 0), 0)
    check.integer("regularization.stop_epoch", regularization.get("stop_epoch"), 0, optional=True)


def _validate_distillation(
    check: _Checker, distillation: DictConfig, has_pruning: bool, max_epochs: int | None
) -> None:
    alpha = distillation.get("alpha", 0.5)
    if not is_number(alpha) or not 0.0 <= alpha <= 1.0:
        check.fail("distillation.alpha", alpha, "must be in [0, 1] (the distillation term's weight)")
    temperature = distillation.get("temperature", 4.0)
    if not is_number(temperature) or not temperature > 0:
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


def _validate_export(check: _Checker, export: DictConfig) -> None:
    from lightning_prune.deploy.report import FORMS

    forms = list(export.get("forms") or [])
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        check.fail("export.forms", forms, f"must be a list of {list(FORMS)} (unknown: {unknown}); [] exports nothing")
    sizes = list(export.get("batch_sizes") or [])
    if not sizes or not all(is_int(b) and b >= 1 for b in sizes):
        check.fail("export.batch_sizes", sizes, "must be a non-empty list of integers >= 1, e.g. [1, 64]")
    check.integer("export.blocks", export.get("blocks", 3), 1)
    check.integer("export.repeats", export.get("repeats", 10), 1)
    check.integer("export.threads", export.get("threads"), 1, optional=True)
    if export.get("compact", "auto") not in (True, False, "auto"):
        check.fail("export.compact", export.get("compact"), "must be true, false or auto")
    if not export.get("dir"):
        check.fail("export.dir", export.get("dir"), "must be a folder name (relative to the run directory)")
