"""The sensitivity job: ``run_sensitivity(cfg)`` trains (or loads) the configured model, analyses it on the
validation split, allocates per-layer sparsities and writes the report; ``scripts/sensitivity.py`` wraps it
with ``@hydra.main``.

The job reads the project's config (``conf/config.yaml``) plus the ``sensitivity`` group
(``conf/sensitivity/default.yaml``): ``ratios``, ``target_sparsity``, ``macs_budget``, ``max_drop``,
``checkpoint``, ``epochs`` and ``plot``. The structure, importance and ``ignore`` come from the ``pruning``
group, so ``pruning=channel`` analyses channel groups with its ``round_to`` and ``max_layer_sparsity``.
"""

from __future__ import annotations

import collections
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_prune._helpers import is_int
from lightning_prune.app.config import ConfigError
from lightning_prune.app.quiet import quiet_third_party
from lightning_prune.app.train import instantiate_logger, instantiate_module, instantiate_pruning, resolve_output_dir
from lightning_prune.app.validation import validate
from lightning_prune.sensitivity.allocation import allocate, check_constraints
from lightning_prune.sensitivity.analysis import DEFAULT_RATIOS, analyze, check_ratios
from lightning_prune.sensitivity.report import sensitivity_markdown, write_report
from lightning_prune.sensitivity.table import SensitivityTable

_KEYS = ("ratios", "target_sparsity", "macs_budget", "max_drop", "checkpoint", "epochs", "plot")


@dataclass(frozen=True)
class SensitivityOptions:
    """The ``sensitivity`` config group, checked (see ``conf/sensitivity/default.yaml``).

    Example:
        >>> SensitivityOptions().ratios[:3]
        (0.1, 0.2, 0.3)
    """

    ratios: tuple[float, ...] = DEFAULT_RATIOS
    target_sparsity: float | None = None
    macs_budget: float | None = None
    max_drop: float | None = None
    checkpoint: str | None = None
    epochs: int | None = None
    plot: bool = True


@dataclass(frozen=True)
class SensitivityRun:
    """What :func:`run_sensitivity` produced.

    Args:
        table: The sensitivity table.
        allocation: The per-layer sparsities (exact layer names).
        target_sparsity: The target they meet, or None under a MACs budget.
        macs_budget: The MACs budget they meet, or None.
        max_drop: The bound on every layer's drop, or None.
        paths: The files written, by kind (``csv``, ``markdown``, ``plot``, ``allocation``).

    Example:
        >>> table = SensitivityTable("accuracy", 0.9, "weights", "", "", (0.5,), ())
        >>> SensitivityRun(table, {}, 0.9, None, None, {}).target_sparsity
        0.9
    """

    table: SensitivityTable
    allocation: dict[str, float]
    target_sparsity: float | None
    macs_budget: float | None
    max_drop: float | None
    paths: dict[str, Path]


def sensitivity_options(cfg: DictConfig) -> SensitivityOptions:
    """The checked ``sensitivity`` group of ``cfg`` (defaults where it is absent).

    Raises:
        ConfigError: an unknown key or a value out of range, named as ``sensitivity.<key>=<value>``.

    Example:
        >>> sensitivity_options(OmegaConf.create({"sensitivity": {"max_drop": 0.01}})).max_drop
        0.01
    """
    node = cfg.get("sensitivity")
    values = cast(dict[str, Any], OmegaConf.to_container(node, resolve=True)) if node is not None else {}
    unknown = [key for key in values if key not in _KEYS]
    if unknown:
        raise ConfigError(f"Invalid config:\n  sensitivity.{unknown[0]}: unknown key; allowed keys: {list(_KEYS)}")
    try:
        ratios = check_ratios(values.get("ratios", DEFAULT_RATIOS))
        check_constraints(
            values.get("target_sparsity"), values.get("macs_budget"), values.get("max_drop"), required=False
        )
    except ValueError as err:
        raise ConfigError(f"Invalid config:\n  sensitivity: {err}") from err
    epochs = values.get("epochs")
    if epochs is not None and (not is_int(epochs) or epochs < 0):
        raise ConfigError(f"Invalid config:\n  sensitivity.epochs={epochs!r}: must be null or an integer >= 0")
    checkpoint = values.get("checkpoint")
    if checkpoint is not None and not Path(str(checkpoint)).is_file():
        raise ConfigError(f"Invalid config:\n  sensitivity.checkpoint={checkpoint!r}: no such file")
    plot = values.get("plot", True)
    if not isinstance(plot, bool):
        raise ConfigError(f"Invalid config:\n  sensitivity.plot={plot!r}: must be true or false")

    def number(key: str) -> float | None:
        value = values.get(key)
        return None if value is None else float(value)

    return SensitivityOptions(
        ratios=ratios,
        target_sparsity=number("target_sparsity"),
        macs_budget=number("macs_budget"),
        max_drop=number("max_drop"),
        checkpoint=None if checkpoint is None else str(checkpoint),
        epochs=epochs,
        plot=plot,
    )


@quiet_third_party()  # Lightning's product tips, a known deprecation warning, ONNX INFO lines: during the job only
def run_sensitivity(cfg: DictConfig) -> SensitivityRun:
    """Train densely (or load a checkpoint), analyse on the validation split, allocate, write and print.

    The model is trained as the main job trains it until pruning would start: ``sensitivity.epochs`` epochs,
    by default ``pruning.start_epoch`` (the whole ``trainer.max_epochs`` with ``pruning=none``), with the
    configured data, optimizer and regularization; or ``sensitivity.checkpoint`` (a Lightning checkpoint of
    the same model) is loaded instead. The allocation targets ``sensitivity.target_sparsity``, by default
    ``pruning.sparsity``, unless ``sensitivity.macs_budget`` is set. Writes ``sensitivity.csv``,
    ``sensitivity.md``, ``sensitivity.png`` (unless ``sensitivity.plot=false``) and ``allocation.yaml`` into
    the run directory (the tables with ``.sha256`` digests beside them), and prints the table. Third-party noise
    (Lightning's product tips, a known dependency deprecation warning, ONNX INFO lines) is dropped while it runs
    (:func:`~lightning_prune.app.quiet.quiet_third_party`); every other warning shows.

    Args:
        cfg: A config composed from ``conf/`` with the ``sensitivity`` group.

    Returns:
        The table, allocation and paths.

    Raises:
        ConfigError: an invalid config, before anything trains.
        ValueError: a target that cannot be met (the message says how far the analysis gets); the table and
            plot are written first, and the message lists them.

    Example:
        >>> run = run_sensitivity(cfg)  # doctest: +SKIP
        >>> run.paths["allocation"]  # doctest: +SKIP
        PosixPath('outputs/sensitivity/.../allocation.yaml')
    """
    validate(cfg)
    options = sensitivity_options(cfg)
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    output_dir = resolve_output_dir(cfg)
    datamodule = instantiate(cfg.data)
    module = instantiate_module(cfg)
    pruning: Any = instantiate_pruning(cfg)
    trained = _prepare(cfg, options, module, datamodule, pruning, output_dir)
    datamodule.setup("fit")
    target = options.target_sparsity
    if target is None and options.macs_budget is None:
        if pruning is None:
            raise ConfigError(
                "Invalid config:\n  sensitivity.target_sparsity=None: set it (or sensitivity.macs_budget) when "
                "pruning=none leaves no pruning.sparsity to default to"
            )
        target = float(pruning.sparsity)
    table = analyze(
        module,
        datamodule.val_dataloader(),
        ratios=options.ratios,
        structure=pruning.structure if pruning is not None else "unstructured",
        importance=pruning.importance if pruning is not None else "magnitude",
        ignore=pruning.ignore if pruning is not None else (),
        example_inputs=getattr(pruning, "example_inputs", None),
    )
    try:
        allocation = allocate(table, target_sparsity=target, macs_budget=options.macs_budget, max_drop=options.max_drop)
    except ValueError as err:  # the finished analysis is kept: the table and plot are written before failing
        paths = write_report(table, output_dir, None, plot=options.plot)
        print(sensitivity_markdown(table, None))
        saved = ", ".join(str(path) for path in paths.values())
        raise ValueError(f"{err} The analysis is saved ({saved}); no allocation.yaml was written.") from err
    paths = write_report(
        table,
        output_dir,
        allocation,
        target_sparsity=target,
        macs_budget=options.macs_budget,
        max_drop=options.max_drop,
        plot=options.plot,
    )
    prediction = table.predict(allocation)
    constraint = f"target sparsity {target:g}" if target is not None else f"MACs budget {options.macs_budget:g}"
    lines = [
        sensitivity_markdown(table, allocation),
        "",
        f"Summary ({type(cast(torch.nn.Module, module.model)).__name__}, seed {cfg.seed}; {trained})",
        f"  {constraint}" + (f", max drop {options.max_drop:g}" if options.max_drop is not None else ""),
        f"  predicted        sparsity {prediction.sparsity:.4f} of the {table.unit}, "
        f"{prediction.macs_fraction:.4f} of the dense MACs, largest layer drop {prediction.drop:.4f}",
        f"  analysis         {table.evaluations} evaluations in {table.seconds:.1f} s",
        f"  wall time        {time.perf_counter() - start:.1f} s",
        *[f"  {kind:<16} {path}" for kind, path in paths.items()],
    ]
    print("\n".join(lines))
    return SensitivityRun(table, allocation, target, options.macs_budget, options.max_drop, paths)


def _load_checkpoint(path: str) -> Any:
    """``torch.load`` with ``weights_only=True``, allowing the OmegaConf containers Lightning keeps in a
    checkpoint's hyper-parameters (nothing that runs code when unpickled)."""
    from omegaconf import base, nodes

    allowed: list[Any] = [dict, list, int, DictConfig, ListConfig, base.ContainerMetadata, base.Metadata, Any]
    allowed += [collections.defaultdict]
    allowed += [nodes.AnyNode, nodes.BooleanNode, nodes.BytesNode, nodes.FloatNode, nodes.IntegerNode]
    allowed += [nodes.PathNode, nodes.StringNode]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if "WeightsUnpickler error" in line]
        first = lines[0] if lines else str(err).strip().splitlines()[0]
        raise ValueError(
            f"`sensitivity.checkpoint`={path!r} holds objects beyond tensors and configs, which are not loaded "
            f"(torch.load with weights_only=True: {first}). Save the model's `state_dict()` and pass that file."
        ) from err


def _prepare(
    cfg: DictConfig, options: SensitivityOptions, module: L.LightningModule, datamodule: Any, pruning: Any, output: Path
) -> str:
    """Load the checkpoint or train densely; returns what was done, for the summary."""
    if options.checkpoint is not None:
        checkpoint = _load_checkpoint(options.checkpoint)
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"`sensitivity.checkpoint`={options.checkpoint!r} holds no state dict.")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"`sensitivity.checkpoint`={options.checkpoint!r} does not fit the configured model: {err}. Compose "
                "the config the checkpoint was trained with (e.g. the same `model=`)."
            ) from err
        return f"loaded {options.checkpoint}"
    epochs = options.epochs
    if epochs is None:
        epochs = int(cfg.pruning.start_epoch) if pruning is not None else int(cfg.trainer.max_epochs)
    if epochs == 0:
        return "untrained: 0 dense epochs"
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_epochs=epochs,
        callbacks=[],
        logger=instantiate_logger(cfg, output),
        default_root_dir=output,
    )
    trainer.fit(module, datamodule=datamodule)
    return f"{epochs} dense epoch{'s' if epochs != 1 else ''}"
