"""One-shot pruning in the Hydra application: ``pruning=wanda`` / ``pruning=sparsegpt`` / ``pruning=magnitude_oneshot``
(``allocation=owl`` for OWL's layer sparsity) in ``train(cfg)``, and pruning a saved checkpoint
(``scripts/oneshot.py``).

A one-shot ``pruning`` config is a :class:`~lightning_prune.PruningCallback` config (``schedule: one_shot`` at epoch
0, which keeps the masks through recovery fine-tuning) with a ``pruning.oneshot`` node: the arguments of
:class:`~lightning_prune.callbacks.OneShotPruning` (``method``, ``num_samples``, ``blocks``, ``offload``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_prune.app.config import ConfigError
from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.callbacks.pruning import PruningCallback
from lightning_prune.oneshot import OneShotReport, prune_one_shot
from lightning_prune.oneshot.base import Allocation

__all__ = ["instantiate_oneshot", "is_owl", "prune_checkpoint", "pruning_arguments"]

_OWL_TARGETS = ("lightning_prune.oneshot.OWL", "lightning_prune.oneshot.owl.OWL")


def is_owl(cfg: DictConfig) -> bool:
    """True when the ``allocation`` group is ``owl`` (an :class:`~lightning_prune.oneshot.OWL` allocation).

    Example:
        >>> is_owl(OmegaConf.create({"allocation": {"_target_": "lightning_prune.oneshot.OWL"}}))
        True
    """
    node = cfg.get("allocation")
    return bool(node) and node.get("_target_") in _OWL_TARGETS


def pruning_arguments(pruning_cfg: DictConfig) -> dict[str, Any]:
    """``pruning``'s arguments for :class:`~lightning_prune.PruningCallback`: the config without its ``oneshot`` and
    ``depth`` nodes (the arguments of the callbacks beside it).

    Example:
        >>> sorted(pruning_arguments(OmegaConf.create({"sparsity": 0.5, "oneshot": {"method": "wanda"}})))
        ['sparsity']
    """
    container = cast(dict[str, Any], OmegaConf.to_container(pruning_cfg, resolve=True))
    container.pop("oneshot", None)
    container.pop("depth", None)
    return container


def instantiate_oneshot(cfg: DictConfig, pruning: PruningCallback | None) -> OneShotPruning | None:
    """The :class:`~lightning_prune.callbacks.OneShotPruning` of ``cfg.pruning.oneshot`` wired to ``pruning``, with
    ``allocation=owl``'s OWL object; None when the pruning config has no ``oneshot`` node.

    Raises:
        ConfigError: ``allocation=owl`` without a one-shot ``pruning``.

    Example:
        >>> instantiate_oneshot(OmegaConf.create({"pruning": {"sparsity": 0.5}}), None) is None
        True
    """
    node = (cfg.get("pruning") or {}).get("oneshot")
    if not node or pruning is None:
        if is_owl(cfg):
            raise ConfigError(
                "allocation=owl sets the layer sparsities of one-shot pruning: use pruning=wanda or pruning=sparsegpt "
                "(pruning.oneshot), or allocation=sensitivity for gradual pruning."
            )
        return None
    allocation: Allocation | None = instantiate(cfg.allocation, _convert_="all") if is_owl(cfg) else None
    arguments = cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))
    arguments.pop("_target_", None)
    return OneShotPruning(pruning, allocation=allocation, **arguments)


def _calibration(datamodule: pl.LightningDataModule, num_samples: int) -> list[Any]:
    """The first batches of the training loader holding ``num_samples`` samples, read under a forked random state."""
    datamodule.setup("fit")
    batches: list[Any] = []
    seen = 0
    with torch.random.fork_rng(devices=[]):
        for batch in cast(Iterable[Any], datamodule.train_dataloader()):
            batches.append(batch)
            first = batch[0] if isinstance(batch, (tuple, list)) else batch
            seen += int(first.shape[0]) if isinstance(first, torch.Tensor) else 1
            if seen >= num_samples:
                break
    return batches


def prune_checkpoint(
    checkpoint: dict[str, Any],
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    *,
    method: str = "wanda",
    sparsity: float | None = None,
    structure: str = "unstructured",
    allocation: str | None = None,
    num_samples: int = 128,
    ignore: Iterable[str] = (),
    blocks: str | None = None,
) -> tuple[dict[str, Any], OneShotReport]:
    """Prune the weights of a Lightning checkpoint in one shot, from the run's training data.

    ``module`` (the run's LightningModule, e.g. :func:`~lightning_prune.app.train.instantiate_module` of its config)
    is loaded with the checkpoint's ``state_dict`` (strictly) and pruned by
    :func:`~lightning_prune.oneshot.prune_one_shot` on the first ``num_samples`` training samples of ``datamodule``.
    The returned checkpoint is the input with the pruned weights and the masks saved as a
    :class:`~lightning_prune.PruningCallback` (``schedule="one_shot"``, ``start_epoch=0``) saves them:
    ``scripts/export.py`` exports it, and a run given it as ``ckpt_path`` with that callback keeps the masks exact
    while fine-tuning. The optimizer state, whose moments belong to the dense weights, is dropped.

    Raises:
        ValueError: the checkpoint has no ``state_dict`` or does not fit the model, and everything
            :func:`~lightning_prune.oneshot.prune_one_shot` refuses (named by layer).

    Example:
        >>> # cfg = OmegaConf.load(".hydra/config.yaml"); checkpoint = torch.load("last.ckpt")
        >>> # module, data = instantiate_module(cfg), instantiate(cfg.data)
        >>> # pruned, report = prune_checkpoint(checkpoint, module, data, method="sparsegpt", structure="2:4")
    """
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError("The checkpoint has no `state_dict`: not a Lightning checkpoint.")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"The checkpoint does not fit the model: {err}") from err
    batches = _calibration(datamodule, num_samples)
    masks, report = prune_one_shot(
        module,
        batches,
        method=method,
        sparsity=sparsity,
        structure=structure,
        allocation=allocation,
        blocks=blocks,
        num_samples=num_samples,
        ignore=tuple(ignore),
    )
    pruning = PruningCallback(
        sparsity=report.sparsity if sparsity is None else sparsity,
        schedule="one_shot",
        start_epoch=0,
        structure=structure,
        ignore=list(ignore),
    )
    pruner = pruning.pruner
    pruner.bind(module)
    saved = pruner.masks.state_dict()  # type: ignore[union-attr]
    saved.update(masks.state_dict())
    pruner.masks.load_state_dict(saved)  # type: ignore[union-attr]
    pruner.target = pruner.sparsity
    callbacks = {
        k: v for k, v in (checkpoint.get("callbacks") or {}).items() if not str(k).startswith("PruningCallback")
    }
    callbacks[pruning.state_key] = pruning.state_dict()
    callbacks["OneShotPruning"] = {"pruned_at": 0}
    out = {k: v for k, v in checkpoint.items() if k not in ("optimizer_states", "lr_schedulers")}
    out["state_dict"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    out["callbacks"] = callbacks
    out["oneshot"] = {"report": report.table(), "method": report.method, "structure": report.structure}
    return out, report
