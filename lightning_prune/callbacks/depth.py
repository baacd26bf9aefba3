"""The Lightning side of depth pruning: remove the least important blocks when fitting starts, then fine-tune.

:class:`DepthPruning` scores the model's repeated blocks on calibration batches
(:func:`~lightning_prune.oneshot.depth.score_blocks`), removes the least important ones from the LightningModule
(:func:`~lightning_prune.deploy.depth.remove_blocks_`) before the optimizer is built, and lets the whole fit heal
the shallower model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_prune._helpers import is_int, is_number
from lightning_prune.callbacks.oneshot import _first_samples
from lightning_prune.criteria.depth import BlockScore, build_block_score
from lightning_prune.deploy.depth import remove_blocks_
from lightning_prune.oneshot.blocks import ForwardFn
from lightning_prune.oneshot.depth import BlockScores, score_blocks
from lightning_prune.structures.depth import count_blocks, find_block_container, resolve_num_blocks

__all__ = ["DepthPruning"]


class DepthPruning(Callback):
    """Remove the ``num_blocks`` least important blocks of the model when fitting starts; the fit then fine-tunes it.

    In ``setup`` (before the optimizer is built, so it only ever sees the kept blocks), the LightningModule runs in
    eval mode on the calibration batches, every block of its repeated block list (found as
    :func:`~lightning_prune.structures.depth.find_block_container` says, e.g. ``model.layers``) is scored by how much
    it changes the hidden states (``score``: ShortGPT's Block Influence by default; Men et al., 2024), and the
    lowest-scored blocks are removed for good, with the layer counts, per-layer config lists and layer indices
    rewritten (:func:`~lightning_prune.deploy.depth.remove_blocks_`). The model is then simply shallower: it trains,
    checkpoints, saves with ``save_pretrained`` (Hugging Face) and :func:`~lightning_prune.save_compact` like any
    model; :func:`~lightning_prune.load_compact` reloads it into a fresh full-depth instance.

    Why one shot, and not a structure a :class:`~lightning_prune.PruningCallback` schedules: a block's score is a
    property of the activations flowing through it on calibration data, not of its weights, and ShortGPT removes
    the blocks at once from the dense model's scores. Masking a block to the identity while training (zero output
    projections) is exact only for pre-norm residual blocks (Llama, GPT-2) and not for post-norm ones (BERT,
    ``nn.TransformerEncoderLayer`` by default), and would keep paying for the blocks it masks; removing them first
    is exact for every block and makes the fine-tune cheaper. Combine it with a ``PruningCallback`` (heads, neurons)
    that starts later: its masks bind to the shallower model.

    A run resumed from a checkpoint removes the same number of blocks again in ``setup`` (scoring the model it is
    given; the kept blocks are numbered 0, 1, ... and alike in a fresh model), and the checkpoint then restores the
    kept blocks' weights and :attr:`removed`. Under DDP every process scores on its calibration batches and the
    sums are added over the processes, so all remove the same blocks.

    Args:
        num_blocks: how many blocks to remove (an integer >= 1), or a fraction of them in (0, 1); at least one
            block must stay.
        score: ``"influence"``, ``"angular"``, ``"relative_norm"`` (:mod:`~lightning_prune.criteria.depth`) or a
            function ``score(inputs, outputs)`` giving one score per token.
        calibration: the calibration batches (a ``DataLoader`` or a list of tensors, ``(inputs, targets)`` tuples or
            dicts); None: the first batches of the datamodule's train dataloader, read without touching the global
            random state.
        num_samples: calibration samples (None: every batch of ``calibration``, which must then be given).
        blocks: the blocks' container by name in the LightningModule (``"model.layers"``); None to find it.
        forward_fn: ``forward_fn(module, batch)`` runs the LightningModule on a batch (default: ``module(inputs)``).

    Attributes:
        removed: the indices of the removed blocks in the original block list (None before fitting).
        scores: the :class:`~lightning_prune.oneshot.depth.BlockScores` this run measured (None before).

    Raises:
        MisconfigurationException: a bad ``num_blocks``, ``score`` or ``num_samples``; at ``setup``, no repeated
            blocks, ``num_blocks`` that would remove every block, no calibration batches, and everything
            :func:`~lightning_prune.oneshot.depth.score_blocks` and :func:`~lightning_prune.deploy.depth.remove_blocks_`
            refuse, with the argument named.

    Example:
        >>> depth = DepthPruning(num_blocks=2, score="influence", num_samples=64)
        >>> depth.num_blocks, depth.removed
        (2, None)
        >>> callbacks = [depth]  # Trainer(callbacks=callbacks).fit(module, datamodule)
    """

    def __init__(
        self,
        num_blocks: int | float,
        score: str | BlockScore = "influence",
        calibration: Iterable[Any] | None = None,
        num_samples: int | None = 128,
        blocks: str | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__()
        whole = is_int(num_blocks) and num_blocks >= 1
        fraction = not is_int(num_blocks) and is_number(num_blocks, finite=True) and 0 < num_blocks < 1
        if not (whole or fraction):
            raise MisconfigurationException(
                f"DepthPruning: `num_blocks` must be an integer >= 1 (blocks to remove) or a fraction in (0, 1), got "
                f"{num_blocks!r}."
            )
        try:
            build_block_score(score)
        except ValueError as err:
            raise MisconfigurationException(f"DepthPruning: {err}") from err
        if num_samples is not None and (not is_int(num_samples) or num_samples < 1):
            raise MisconfigurationException(
                f"DepthPruning: `num_samples` must be a positive integer or None (every calibration batch), got "
                f"{num_samples!r}."
            )
        if num_samples is None and calibration is None:
            raise MisconfigurationException(
                "DepthPruning: `num_samples=None` reads every calibration batch, so `calibration` must be given: the "
                "train dataloader would be read whole. Set `num_samples` (e.g. 128) or pass `calibration`."
            )
        if blocks is not None and not isinstance(blocks, str):
            raise MisconfigurationException(
                f"DepthPruning: `blocks` must be the name of the blocks' container (e.g. 'model.layers'), got "
                f"{blocks!r}."
            )
        self.num_blocks = num_blocks
        self.score = score
        self.calibration = calibration
        self.num_samples = num_samples
        self.blocks = blocks
        self.forward_fn = forward_fn
        self.removed: list[int] | None = None
        self.scores: BlockScores | None = None
        self._pruned: nn.Module | None = None  # the container this callback shortened (a second fit skips it)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            name, container = find_block_container(pl_module, self.blocks)
            if container is self._pruned:
                return
            count = resolve_num_blocks(self.num_blocks, count_blocks(container))
            self.scores = score_blocks(
                pl_module,
                self._batches(trainer),
                self.score,
                blocks=name,
                num_samples=self.num_samples,
                forward_fn=self.forward_fn,
            )
            self.removed = self.scores.least_important(count)
            remove_blocks_(pl_module, self.removed, name)
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(f"DepthPruning: {err}") from err
        self._pruned = container
        rank_zero_info(self.scores.table(self.removed))
        rank_zero_info(
            f"DepthPruning: removed blocks {self.removed} of {name!r} "
            f"({len(self.scores.names)} -> {count_blocks(container)} blocks)."
        )

    def _batches(self, trainer: pl.Trainer) -> Iterable[Any]:
        if self.calibration is not None:
            return self.calibration
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise MisconfigurationException(
                "DepthPruning: no `calibration` batches and no datamodule to read them from (the blocks are removed "
                "in `setup`, before the Trainer loads its dataloaders): pass `calibration` or fit with a datamodule."
            )
        with torch.random.fork_rng(devices=[]):  # shuffling samplers draw from the global generator
            return list(_first_samples(datamodule.train_dataloader(), self.num_samples or 1))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"removed": self.removed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.removed = state_dict.get("removed", self.removed)
