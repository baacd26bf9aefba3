"""What :class:`~lightning_prune.callbacks.PruningCallback` does around a fit rather than during it: the inputs it
traces a model with and the compaction of a channel-pruned model once the fit ends (report, loggers, file). Plain
functions of the Trainer, the module and the callback's settings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_prune.deploy.compact import compact, save_compact
from lightning_prune.deploy.profile import compaction_report


def trace_inputs(example: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """Inputs to trace the model with: ``example`` (the callback's ``example_inputs``), the module's
    ``example_input_array``, or two samples of the first training batch (drawn without touching the global random
    state), on the module's device.

    Raises:
        MisconfigurationException: none of the three is available.
    """
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


def compact_target(compact_path: Path | None, trainer: pl.Trainer) -> Path:
    """Where the compact model goes: ``compact_path``, else ``compact.pt`` in the Trainer's log directory."""
    if compact_path is not None:
        return compact_path
    return Path(trainer.log_dir or trainer.default_root_dir) / "compact.pt"


def compact_after_fit(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    example: Any,
    ignore: Sequence[str],
    path: Path,
    latency: bool,
) -> tuple[dict[str, float], torch.nn.Module, str | None]:
    """Compact the channel-pruned ``pl_module``, report and log the comparison, and save the compact model to
    ``path``. The fit is over: a file that cannot be written is a warning, and the model is returned all the same.

    Returns:
        The compaction report, the compact model (on the CPU) and why it could not be saved (or None).

    Raises:
        MisconfigurationException: the model cannot be compacted.
    """
    try:
        small = compact(pl_module, example, ignore)
    except (ValueError, RuntimeError) as err:
        raise MisconfigurationException(f"PruningCallback could not compact the model: {err}") from err
    report, text = compaction_report(pl_module, small, example, latency=latency)
    rank_zero_info(text)
    for logger in trainer.loggers:
        logger.log_metrics(report, step=trainer.global_step)
    small = small.cpu()
    try:
        save_compact(small, path)
    except OSError as err:
        rank_zero_warn(
            f"PruningCallback could not save the compact model: {err} It is kept in memory as "
            "`PruningCallback.compact_model`; save it with lightning_prune.save_compact(model, path)."
        )
        return report, small, str(err)
    rank_zero_info(f"Compact model saved to {path}; reload it with lightning_prune.load_compact(model, path).")
    return report, small, None
