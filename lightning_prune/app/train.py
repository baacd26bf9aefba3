"""The importable training entry point: ``train(cfg)`` builds every object from a Hydra config and runs it.

``scripts/train.py`` wraps :func:`train` with ``@hydra.main``; tests and sweeps call it with a config from
``hydra.compose``. One run trains the model densely, prunes it as the ``pruning`` group says, fine-tunes it,
tests it, prints a short summary and writes ``metrics.json`` to the run directory.

Importing this module registers the config schemas (:func:`lightning_prune.app.config.register_configs`) that the
files in ``conf/`` extend, so ``hydra.compose`` on ``conf/`` works after ``import lightning_prune.app.train``
whether or not Hydra found the ``lightning_prune_searchpath`` plugin (editable installs hide it).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn
from typing_extensions import override

from lightning_prune._files import ArtifactWriteError, atomic_write_json, prepare_folder
from lightning_prune._helpers import eval_mode
from lightning_prune.app.config import ConfigError, register_configs
from lightning_prune.app.depth import depth_figures, instantiate_depth
from lightning_prune.app.language import (
    PerplexityAtEpochStart,
    compact_language_model,
    evaluate_splits,
    perplexity_lines,
    token_example,
)
from lightning_prune.app.oneshot import instantiate_oneshot, pruning_arguments
from lightning_prune.app.probe import EpochStartProbe
from lightning_prune.app.quiet import quiet_third_party
from lightning_prune.app.summary import (
    compaction_lines,
    compaction_metrics,
    size_figures,
    training_aid_lines,
)
from lightning_prune.app.sweep import search_objective
from lightning_prune.app.validation import validate
from lightning_prune.callbacks.checkpointing import AtomicCheckpointIO, RandomStateCheckpoint
from lightning_prune.callbacks.depth import DepthPruning
from lightning_prune.callbacks.pruning import PruningCallback
from lightning_prune.deploy.report import run_export
from lightning_prune.models.language import LanguageModel

_log = logging.getLogger(__name__)

register_configs()


def resolve_output_dir(cfg: DictConfig) -> Path:
    """The directory a run writes to, created if needed.

    ``cfg.output_dir`` when set; otherwise Hydra's run directory when running under ``@hydra.main``;
    otherwise the current directory (e.g. a config from ``hydra.compose`` without ``output_dir``).

    Args:
        cfg: The composed run config.

    Returns:
        The output directory.

    Example:
        >>> resolve_output_dir(OmegaConf.create({"output_dir": None})) == Path.cwd()
        True
    """
    output_dir = cfg.get("output_dir")
    if not output_dir and HydraConfig.initialized():
        # A config from compose(return_hydra_config=True) has no run directory: MissingMandatoryValue.
        with contextlib.suppress(MissingMandatoryValue):
            output_dir = HydraConfig.get().runtime.output_dir
    path = Path(output_dir) if output_dir else Path.cwd()
    try:
        prepare_folder(path / "metrics.json")
    except ArtifactWriteError as err:
        raise ConfigError(
            f"Invalid config:\n  output_dir={str(path)!r}: cannot hold the run's files: {err.reason}"
        ) from err
    return path


def _report(text: str) -> None:
    """Under Hydra, log ``text`` (its job logging writes the console and the run's ``train.log``); from Python,
    print it."""
    if HydraConfig.initialized():
        _log.info(text)
    else:
        print(text)


def evaluate_accuracy(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of ``model`` on ``loader``, in eval mode and without autograd.

    The model's training mode is restored afterwards; no random state is consumed.

    Args:
        model: Maps a batch of inputs to logits.
        loader: Yields ``(inputs, labels)`` batches.

    Returns:
        The fraction of correctly classified samples.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> evaluate_accuracy(net, [(torch.eye(2), net(torch.eye(2)).argmax(1))])
        1.0
    """
    device = next(model.parameters()).device
    correct = total = 0
    with eval_mode(model), torch.inference_mode():
        for x, y in loader:
            predictions = model(x.to(device)).argmax(dim=1)
            correct += int((predictions == y.to(device)).sum())
            total += y.numel()
    if total == 0:
        raise ValueError("`loader` yielded no samples.")
    return correct / total


class AccuracyAtEpochStart(EpochStartProbe):
    """Measures test accuracy at the start of training epoch ``epoch``, e.g. just before pruning starts.

    With ``pruning``, the measurement runs right before that callback's pruning step (it asks the pruning callback to
    call it), so it sees the model as the previous epochs left it wherever it is in ``Trainer(callbacks=...)``.
    The test loader comes from the trainer's datamodule; the result is in :attr:`accuracy` and logged as
    ``dense/test_acc``.

    Args:
        epoch: The epoch at whose start the model is evaluated.
        pruning: The :class:`~lightning_prune.callbacks.PruningCallback` to measure before.

    Example:
        >>> callback = AccuracyAtEpochStart(epoch=10)
        >>> callback.accuracy is None
        True
    """

    def __init__(self, epoch: int, pruning: PruningCallback | None = None) -> None:
        super().__init__(epoch, pruning)
        self.accuracy: float | None = None

    @override
    def measure(self, pl_module: L.LightningModule, datamodule: Any) -> None:
        self.accuracy = evaluate_accuracy(pl_module, datamodule.test_dataloader())
        pl_module.log("dense/test_acc", self.accuracy, on_step=False, on_epoch=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy}  # a run resumed after `epoch` still reports the dense accuracy

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accuracy = state_dict.get("accuracy", self.accuracy)


def resume_path(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from: ``cfg.ckpt_path`` (a path, or ``last``), or None for a fresh run.

    ``last`` is the run directory's ``checkpoints/last.ckpt``; when it does not exist yet (the run was stopped
    before its first epoch ended), the run starts afresh, so the same command both starts and resumes a run.

    Raises:
        FileNotFoundError: ``cfg.ckpt_path`` names a file that does not exist.

    Example:
        >>> resume_path(OmegaConf.create({"ckpt_path": None}), Path("run")) is None
        True
    """
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r}: no such checkpoint. Give the path of a .ckpt file, or `ckpt_path=last` with "
            "`output_dir` set to the run directory to resume (its checkpoints/last.ckpt)."
        )
    return str(ckpt_path)


def task_overrides() -> list[str]:
    """The command-line overrides of the current Hydra job (empty outside Hydra), e.g. ``["seed=1"]``."""
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


def regularization_arguments(cfg: DictConfig) -> dict[str, Any]:
    """The module arguments of the ``regularization`` group (empty for ``regularization=none`` or none at all).

    ``kind``, ``strength``, ``ignore``, ``warmup_epochs`` and ``stop_epoch`` become ``reg_kind``, ``reg_lambda``,
    ``reg_ignore``, ``reg_warmup_epochs`` and ``reg_stop_epoch`` of
    :class:`~lightning_prune.training.regularization.L1RegularizationMixin` (which ``ImageClassifier`` includes).

    Example:
        >>> regularization_arguments(OmegaConf.create({"regularization": {"kind": "l1", "strength": 1e-4}}))
        {'reg_kind': 'l1', 'reg_lambda': 0.0001}
    """
    node = cfg.get("regularization")
    if not node or "kind" not in node:
        return {}
    values = cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))
    names = {"kind": "reg_kind", "strength": "reg_lambda", "ignore": "reg_ignore"}
    names.update(warmup_epochs="reg_warmup_epochs", stop_epoch="reg_stop_epoch")
    return {names[key]: value for key, value in values.items() if key in names}


def instantiate_distillation(cfg: DictConfig, pruning: PruningCallback | None = None) -> L.Callback | None:
    """The distillation callback ``cfg.distillation`` (wired to ``pruning``, when given), or None when it is absent or
    has no ``_target_``.

    Example:
        >>> instantiate_distillation(OmegaConf.create({"distillation": {}})) is None
        True
    """
    node = cfg.get("distillation")
    if not node or "_target_" not in node:
        return None
    return instantiate(node, _convert_="all", **({"pruning": pruning} if pruning is not None else {}))


def instantiate_module(cfg: DictConfig) -> L.LightningModule:
    """The LightningModule ``cfg.module`` wrapping the network ``cfg.model``, with ``cfg.optimizer``'s args
    and the ``regularization`` group's (:func:`regularization_arguments`).

    Example:
        >>> cfg = OmegaConf.create({
        ...     "model": {"_target_": "lightning_prune.models.MLP", "hidden": [16]},
        ...     "module": {"_target_": "lightning_prune.models.ImageClassifier"},
        ...     "optimizer": {"optimizer": "adam", "lr": 1e-3},
        ... })
        >>> type(instantiate_module(cfg).model).__name__
        'MLP'
    """
    net = instantiate(cfg.model, _convert_="all")
    optimizer_args = cast(dict[str, Any], OmegaConf.to_container(cfg.optimizer, resolve=True))
    return instantiate(cfg.module, model=net, **optimizer_args, **regularization_arguments(cfg), _convert_="all")


def instantiate_pruning(cfg: DictConfig) -> PruningCallback | None:
    """The pruning callback ``cfg.pruning``, or None when it is absent or has no ``_target_``.

    Raises:
        ConfigError: ``pruning._target_`` builds something other than a
            :class:`~lightning_prune.callbacks.PruningCallback` (a subclass is fine).

    Example:
        >>> instantiate_pruning(OmegaConf.create({"pruning": {}})) is None
        True
    """
    pruning_cfg = cfg.get("pruning")
    if not pruning_cfg or "_target_" not in pruning_cfg:
        return None
    if "oneshot" in pruning_cfg or "depth" in pruning_cfg:  # OneShotPruning's and DepthPruning's arguments
        pruning_cfg = OmegaConf.create(pruning_arguments(pruning_cfg))
    pruning = instantiate(pruning_cfg, _convert_="all")
    if not isinstance(pruning, PruningCallback):
        raise ConfigError(
            f"pruning._target_={pruning_cfg['_target_']!r} built a {type(pruning).__name__}, not a PruningCallback: "
            "point it at lightning_prune.PruningCallback or a subclass."
        )
    return pruning


def instantiate_allocation(
    cfg: DictConfig, output_dir: Path, pruning: PruningCallback | None = None
) -> L.Callback | None:
    """The ``allocation`` group's callback, wired to ``pruning`` (``allocation=sensitivity``: a
    :class:`~lightning_prune.callbacks.SensitivityCallback` writing its report to ``output_dir/sensitivity``),
    or None for ``allocation=none``.

    Example:
        >>> instantiate_allocation(OmegaConf.create({"allocation": {}}), Path("run")) is None
        True
    """
    node = cfg.get("allocation")
    if not node or "_target_" not in node:
        return None
    wiring = {"pruning": pruning} if pruning is not None else {}
    return instantiate(node, output_dir=str(output_dir / "sensitivity"), _convert_="all", **wiring)


def instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The extra callbacks of the ``callbacks`` group: one per entry with a ``_target_``, in the group's order.

    Example:
        >>> cfg = OmegaConf.create({"callbacks": {"checks": {"_target_": "lightning_prune.MaskInvariantChecker"}}})
        >>> [type(c).__name__ for c in instantiate_callbacks(cfg)]
        ['MaskInvariantChecker']
    """
    nodes = cfg.get("callbacks") or {}
    return [instantiate(node, _convert_="all") for node in nodes.values() if node and "_target_" in node]


def instantiate_logger(cfg: DictConfig, output_dir: Path) -> Any:
    """The logger ``cfg.logger`` (CSV in ``output_dir`` when absent); ``save_dir: null`` means ``output_dir``.

    Example:
        >>> logger = instantiate_logger(OmegaConf.create({}), Path("runs"))
        >>> type(logger).__name__, logger.name
        ('CSVLogger', 'csv')
    """
    logger_cfg = cfg.get("logger")
    if not logger_cfg:
        logger_cfg = OmegaConf.create({"_target_": "lightning.pytorch.loggers.CSVLogger", "name": "csv"})
    if logger_cfg.get("save_dir"):
        return instantiate(logger_cfg)
    return instantiate(logger_cfg, save_dir=str(output_dir))


def example_input(datamodule: Any) -> torch.Tensor:
    """One sample shaped like the datamodule's inputs: zeros of ``datamodule.input_shape`` with a batch of one,
    or the first test sample when the datamodule has no ``input_shape``.

    Example:
        >>> from lightning_prune.data import DigitsDataModule
        >>> tuple(example_input(DigitsDataModule()).shape)
        (1, 1, 8, 8)
    """
    shape = getattr(datamodule, "input_shape", None)
    if shape is not None:
        return torch.zeros(1, *shape)
    inputs, _ = next(iter(datamodule.test_dataloader()))
    return inputs[:1]


@quiet_third_party()  # Lightning's product tips, a known deprecation warning, ONNX INFO lines: during the run only
def train(cfg: DictConfig) -> float:
    """Train, prune, fine-tune and test the model described by ``cfg``.

    First checks ``cfg`` with :func:`~lightning_prune.app.validation.validate` (a
    :class:`~lightning_prune.app.config.ConfigError` names every out-of-range key before anything is built). Then
    builds the datamodule (``cfg.data``), network (``cfg.model``), LightningModule (``cfg.module`` plus the
    ``cfg.optimizer`` and ``cfg.regularization`` arguments), pruning callback (``cfg.pruning``; absent or without
    ``_target_`` for none), distillation callback (``cfg.distillation``, likewise), the ``allocation`` group's
    sensitivity analysis (run by the pruning callback right before its first pruning step), the ``callbacks``
    group's extra callbacks, logger (``cfg.logger``) and trainer (``cfg.trainer``) with ``hydra.utils.instantiate``.
    With checkpointing on, ``<run dir>/checkpoints/last.ckpt`` is written atomically
    (:class:`~lightning_prune.callbacks.AtomicCheckpointIO`) at every epoch's end with every rank's random states
    (:class:`~lightning_prune.callbacks.RandomStateCheckpoint`), and
    ``cfg.ckpt_path`` (a path, or ``last``: see :func:`resume_path`) resumes from it. Under DDP every rank trains
    and tests; rank 0 alone reports. Test accuracy is measured before pruning starts (the
    dense accuracy) and after training (the pruned accuracy). Prints a summary and writes ``metrics.json`` to
    the run directory (see :func:`resolve_output_dir`), with ``status: "ok"``, ``seed``, ``epochs`` (the epochs
    trained), ``dense_epoch`` (the epochs trained when ``dense_test_acc`` was measured: ``pruning.start_epoch``, or
    ``epochs`` without pruning, whose final model is the dense one) and the pruned model's MACs per
    sample (:func:`lightning_prune.deploy.profile.count_macs`: ``macs`` counts nonzero weights, ``dense_macs`` all).
    ``sparsity`` is the callback's achieved sparsity, a fraction of weights or, for channel pruning, of
    channels, as ``sparsity_of`` says; ``weight_sparsity`` is the fraction of zeros among all Linear and Conv
    weights. When the callback compacts (channel pruning), the compact model is saved as ``compact.pt`` in
    the run directory unless ``pruning.compact_path`` says otherwise, and ``compact`` holds
    :func:`compaction_metrics` plus the compact model's own test accuracy (``test_acc``); otherwise None.
    When the ``export`` group asks for it (``export=all``), the pruned model is exported into the run directory
    after testing (:func:`lightning_prune.deploy.report.run_export`) and ``export`` holds the report.

    A :class:`~lightning_prune.models.LanguageModel` (``module=language``, e.g. ``experiment=pysource_gpt``) is
    measured by perplexity instead: ``metrics.json`` has ``dense_val_ppl``, ``pruned_val_ppl`` and
    ``compact_val_ppl`` (and ``*_test_ppl``) in place of the accuracies; pruned heads and neurons are removed after
    testing (:func:`~lightning_prune.app.language.compact_language_model`), the compact model saved as
    ``compact.pt`` in the run directory and its figures put in ``compact`` and ``compact_params``; the return
    value is the pruned model's validation perplexity.

    Args:
        cfg: A config composed from this project's ``conf/``.

    Returns:
        The test accuracy of the final, pruned model: the metric a sweep optimises (for a language model, its
        validation perplexity: lower is better).

    Raises:
        ConfigError: when ``cfg`` asks for something impossible, e.g. ``pruning.sparsity=1.5``.

    Example:
        >>> from hydra import compose, initialize_config_dir
        >>> with initialize_config_dir(config_dir="/abs/path/to/conf", version_base="1.3"):  # doctest: +SKIP
        ...     cfg = compose("config", overrides=["trainer.max_epochs=3", "output_dir=/tmp/run"])
        ...     accuracy = train(cfg)
    """
    validate(cfg)
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    output_dir = resolve_output_dir(cfg)

    datamodule = instantiate(cfg.data)
    module = instantiate_module(cfg)
    net = cast(nn.Module, module.model)
    pruning = instantiate_pruning(cfg)
    if pruning is not None and pruning.compact and pruning.compact_path is None:
        pruning.compact_path = output_dir / "compact.pt"  # the run directory, next to metrics.json
    start_epoch = pruning.start_epoch if pruning else 0
    # The pruning callback runs the probe and the sensitivity analysis right before its pruning step.
    # module=language: perplexity instead of accuracy
    probe_type = PerplexityAtEpochStart if isinstance(module, LanguageModel) else AccuracyAtEpochStart
    dense_probe = probe_type(epoch=start_epoch, pruning=pruning)
    oneshot = instantiate_oneshot(cfg, pruning)  # pruning=wanda|sparsegpt: prunes right after the probe
    allocation = instantiate_allocation(cfg, output_dir, pruning) if pruning and oneshot is None else None
    extra = [c for c in (allocation, oneshot) if c is not None]
    callbacks: list[L.Callback] = [pruning, dense_probe, *extra] if pruning else []
    depth = instantiate_depth(cfg)  # pruning.depth: removes blocks in setup, before anything binds to the model
    if depth is not None:
        callbacks.insert(0, depth)
    distillation = instantiate_distillation(cfg, pruning)
    if distillation is not None:
        callbacks.append(distillation)
    callbacks += instantiate_callbacks(cfg)

    if cfg.trainer.get("enable_checkpointing") is not False:
        # The random states make a resumed run repeat the uninterrupted one (dropout, augmentation); `last.ckpt`,
        # written atomically at every epoch's end, is what `ckpt_path=last` resumes from.
        callbacks += [
            RandomStateCheckpoint(),
            # One file, replaced at every epoch's end (ModelCheckpoint's `save_last` needs a second file to do so).
            ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last", enable_version_counter=False),
        ]
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=instantiate_logger(cfg, output_dir),
        default_root_dir=output_dir,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg, output_dir))
    trainer.test(module, datamodule=datamodule, verbose=False)  # logs test/loss and test/acc (or test/ppl)
    if isinstance(dense_probe, PerplexityAtEpochStart):
        return _finish_language_run(cfg, net, datamodule, trainer, pruning, depth, dense_probe, output_dir, start)
    # Measured exactly as the dense accuracy was, so the two numbers compare like for like.
    final_acc = evaluate_accuracy(module, datamodule.test_dataloader())
    # Without pruning, or if pruning never started, the final model is the dense one.
    dense_acc = dense_probe.accuracy if dense_probe.accuracy is not None else final_acc
    epochs = int(trainer.current_epoch)  # the epochs trained: trainer.max_epochs unless stopped early
    dense_epoch = start_epoch if dense_probe.accuracy is not None else epochs
    if not trainer.is_global_zero:  # under DDP every rank gets here with the same model; rank 0 reports
        return final_acc

    compaction = compaction_metrics(pruning)
    depth_info, depth_lines = depth_figures(depth, net, output_dir / "compact.pt" if compaction is None else None)
    if compaction is not None and pruning is not None and pruning.compact_model is not None:
        # The compact model computes what the masked one does; measured alike, the two accuracies agree.
        compaction["test_acc"] = evaluate_accuracy(pruning.compact_model, datamodule.test_dataloader())

    export, export_text = None, ""  # the `export` group: deployable files and their sizes and latencies
    if cfg.get("export") and cfg.export.get("forms"):
        export_inputs, _ = next(iter(datamodule.test_dataloader()))
        export_options = cast(dict[str, Any], OmegaConf.to_container(cfg.export, resolve=True))
        export, export_text = run_export(export_options, net, export_inputs[:8], output_dir, masks=pruning)

    sizes, size_lines = size_figures(net, pruning, example_input(datamodule))
    metrics: dict[str, Any] = {
        "status": "ok",
        "dense_test_acc": dense_acc,
        "pruned_test_acc": final_acc,
        **sizes,
        "compact": compaction,
        "wall_time_s": time.perf_counter() - start,
        "overrides": task_overrides(),
        "seed": int(cfg.seed),
        "epochs": epochs,
        "dense_epoch": dense_epoch,
    }
    if depth_info is not None:
        metrics["depth"] = depth_info
    if export is not None:
        metrics["export"] = export
    save_error = getattr(pruning, "compact_save_error", None) or (depth_info or {}).get("save_error")
    if dense_probe.accuracy is not None:
        dense_when = f"start of epoch {start_epoch}, before pruning"
    else:
        dense_when = "no pruning" if pruning is None else f"pruning never started: the model after {epochs} epochs"
    lines = [
        f"Summary ({type(net).__name__}, seed {cfg.seed})",
        f"  dense test acc   {dense_acc:.4f}  ({dense_when})",
        f"  {'pruned' if pruning else 'final '} test acc  {final_acc:.4f}",
        *size_lines,
        *training_aid_lines(cfg, start_epoch if pruning else None),
        *(compaction_lines(compaction) if compaction is not None else []),
        *depth_lines,
    ]
    _write_run(metrics, lines, output_dir, save_error, export_text)
    if cfg.get("objective") == "max_sparsity":
        return search_objective(metrics, cfg.get("max_accuracy_drop"))
    return final_acc


def _write_run(
    metrics: dict[str, Any],
    lines: list[str],
    output_dir: Path,
    save_error: str | None,
    extra_text: str = "",
) -> None:
    """Print the summary ``lines`` (with the wall time) and ``extra_text``, and write ``metrics.json``.

    Raises:
        OSError: after writing, when the compact model could not be saved (``save_error``): the run failed.
    """
    if save_error:  # the run finished; a file it could not write makes it a failed run, with everything else kept
        metrics["status"] = "failed"
        metrics["error"] = f"the compact model could not be saved: {save_error}"
    lines = [
        *lines,
        f"  wall time        {metrics['wall_time_s']:.1f} s",
        f"  metrics          {output_dir / 'metrics.json'}",
    ]
    _report("\n".join(lines))  # before writing anything more, so that the figures survive a failed write
    if extra_text:
        _report(extra_text)
    atomic_write_json(output_dir / "metrics.json", metrics)
    if save_error:
        raise OSError(f"{metrics['error']} The metrics are in {output_dir / 'metrics.json'}.")


def _finish_language_run(
    cfg: DictConfig,
    net: nn.Module,
    datamodule: Any,
    trainer: L.Trainer,
    pruning: PruningCallback | None,
    depth: DepthPruning | None,
    dense_probe: PerplexityAtEpochStart,
    output_dir: Path,
    start: float,
) -> float:
    """The end of :func:`train` for a language model: perplexity (dense, pruned, compact), compaction of pruned heads
    (:func:`~lightning_prune.app.language.compact_language_model`), sizes, the summary and ``metrics.json``.

    Returns:
        The pruned model's validation perplexity (lower is better).
    """
    pruned = evaluate_splits(net, datamodule)
    epochs = int(trainer.current_epoch)  # the epochs trained: trainer.max_epochs unless stopped early
    if not trainer.is_global_zero:
        return pruned["val"]
    dense = dense_probe.perplexity  # None without pruning, or when pruning never started
    compacted = None
    if pruning is not None:
        path = pruning.compact_path or output_dir / "compact.pt"
        compacted = compact_language_model(net, pruning, datamodule, path, latency=pruning.report_latency)
    compaction, table = compacted if compacted is not None else (None, "")
    depth_info, depth_lines = depth_figures(depth, net, output_dir / "compact.pt" if compacted is None else None)
    sizes, size_lines = size_figures(net, pruning, token_example(datamodule))
    metrics: dict[str, Any] = {
        "status": "ok",
        **{f"dense_{split}_ppl": value for split, value in (dense or pruned).items()},
        **{f"pruned_{split}_ppl": value for split, value in pruned.items()},
        **{f"compact_{split}_ppl": (compaction or {}).get(f"{split}_ppl") for split in pruned},
        **sizes,
        "compact_params": (compaction or {}).get("params_after"),
        "compact": compaction,
        "wall_time_s": time.perf_counter() - start,
        "overrides": task_overrides(),
        "seed": int(cfg.seed),
        "epochs": epochs,
        "dense_epoch": pruning.start_epoch if dense is not None and pruning else epochs,
    }
    if depth_info is not None:
        metrics["depth"] = depth_info
    start_epoch = pruning.start_epoch if pruning else None
    dense_when = f"start of epoch {start_epoch}, before pruning"
    lines = [
        f"Summary ({type(net).__name__}, seed {cfg.seed})",
        *perplexity_lines(dense, pruned, compaction, dense_when),
        *size_lines,
        *training_aid_lines(cfg, start_epoch),
    ]
    if compaction is not None:
        params = f"{compaction['params_before']:,} -> {compaction['params_after']:,}"
        lines.append(
            f"  compact params   {params}  ({1 - compaction['params_after'] / compaction['params_before']:.1%} fewer)"
        )
        lines.append(f"  compact model    {compaction['path']}  (lightning_prune.load_compact(model, path))")
    lines += depth_lines
    save_error = (compaction or {}).get("save_error") or (depth_info or {}).get("save_error")
    _write_run(metrics, lines, output_dir, save_error, table)
    return pruned["val"]
