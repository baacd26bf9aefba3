"""A callback that checks, while training runs, that pruning keeps its promises.

:class:`MaskInvariantChecker` looks at the masks of the Trainer's :class:`~lightning_prune.PruningCallback` after
every training batch (so after every optimizer step) and right after every pruning step, and raises as soon as one
of these fails:

* every pruned entry of a masked parameter is exactly zero, and so is its optimizer state (momentum, moments);
* no pruned entry was revived since the last check (masks only grow);
* with unstructured pruning, exactly the scheduled number of entries is pruned: ``round(s * N)`` over all masked
  entries (``scope="global"``) or per tensor (``scope="layer"``, or each layer's own target), ``s`` being the
  target of the epoch (:meth:`~lightning_prune.PruningCallback.targets_at`);
* under DDP, every rank holds bit-identical masks and weights (every ``check_ranks_every_n_steps`` batches and at
  every pruning step: a small collective that gathers one digest per rank). Under sharded training (FSDP2) each
  rank checks the shards it holds, and the pruned counts are those of the whole tensors.

It costs one pass over the masked parameters per check: meant for tests, soak runs and debugging, not for every
production run. :attr:`checks` counts the checks made by this process, and is logged as ``invariants/checks`` at
every epoch's end.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_prune import PruningCallback
    >>> trainer = Trainer(callbacks=[PruningCallback(sparsity=0.5), MaskInvariantChecker()], logger=False)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_prune._helpers import is_int
from lightning_prune.callbacks._lookup import find_pruning_callback
from lightning_prune.callbacks.pruning import PruningCallback
from lightning_prune.masks.distributed import ranks_agree, world_size
from lightning_prune.masks.maskset import local_shard
from lightning_prune.masks.sharded import ShardedMaskSet
from lightning_prune.structures.unstructured import Unstructured


class InvariantViolation(RuntimeError):
    """A pruning invariant failed during training (see :class:`MaskInvariantChecker`)."""


class MaskInvariantChecker(Callback):
    """Check the pruning invariants after every optimizer step and every pruning step; raise on the first failure.

    Args:
        check_ranks_every_n_steps: under DDP, compare the ranks' masks and weights every this many batches of an
            epoch (and at every pruning step); 0 compares them at pruning steps only.
        pruning: the :class:`~lightning_prune.callbacks.PruningCallback` to check; default: the only one among the
            Trainer's callbacks. Its place in ``Trainer(callbacks=[...])`` does not matter: the checker asks it to run
            the pruning-step check right after each pruning step.
    """

    def __init__(self, check_ranks_every_n_steps: int = 1, *, pruning: PruningCallback | None = None) -> None:
        if not is_int(check_ranks_every_n_steps):
            raise TypeError(f"`check_ranks_every_n_steps` must be an integer, got {check_ranks_every_n_steps!r}.")
        if check_ranks_every_n_steps < 0:
            raise ValueError(f"`check_ranks_every_n_steps` must be >= 0, got {check_ranks_every_n_steps}.")
        if pruning is not None and not isinstance(pruning, PruningCallback):
            raise TypeError(f"`pruning` must be a PruningCallback, got {type(pruning).__name__}.")
        self.check_ranks_every_n_steps = check_ranks_every_n_steps
        self.pruning = pruning
        self._bound: PruningCallback | None = None
        self.checks = 0
        self._previous: list[torch.Tensor] | None = None

    def _check(self, trainer: pl.Trainer, when: str, compare_ranks: bool) -> None:
        pruning = self._bound
        masks = None if pruning is None else pruning.masks
        if pruning is None or masks is None:
            return
        where = f"epoch {trainer.current_epoch}, step {trainer.global_step} ({when})"
        states = [opt.state for opt in trainer.optimizers]
        with torch.no_grad():  # on the entries this process holds: local shards of sharded parameters
            for name, param, local, mask in zip(masks.names, masks.params, masks.local_tensors(), masks.masks):
                if not bool((local[~mask] == 0).all()):
                    raise InvariantViolation(f"{where}: a pruned entry of {name} is not zero.")
                for state in states:
                    for key, value in state.get(param, {}).items():
                        if (
                            isinstance(value, torch.Tensor)
                            and value.shape == param.shape
                            and bool(local_shard(value)[~mask].any())
                        ):
                            raise InvariantViolation(
                                f"{where}: optimizer state {key!r} of a pruned entry of {name} is not zero."
                            )
            if self._previous is not None and len(self._previous) == len(masks.masks):
                for name, before, now in zip(masks.names, self._previous, masks.masks):
                    if bool((now & ~before.to(now.device)).any()):
                        raise InvariantViolation(f"{where}: a pruned entry of {name} was revived.")
            self._previous = [m.clone() for m in masks.masks]
        if isinstance(pruning.structure, Unstructured):
            targets = pruning.targets_at(trainer.current_epoch)
            sizes, counts = masks.entry_counts()  # whole tensors: summed over the ranks that hold shards
            every = list(range(len(sizes)))
            if isinstance(targets, list):  # per-layer targets, one per masked parameter
                units = [([i], t) for i, t in zip(every, targets)]
            elif pruning.scope == "global":
                units = [(every, targets)]
            else:
                units = [([i], targets) for i in every]
            for unit, target in units:
                total = sum(sizes[i] for i in unit)
                pruned = sum(counts[i] for i in unit)
                if pruned != round(target * total):
                    raise InvariantViolation(
                        f"{where}: {pruned} of {total} entries are pruned, the schedule's target {target:g} asks for "
                        f"{round(target * total)}."
                    )
        if (
            compare_ranks
            and world_size() > 1
            and not isinstance(masks, ShardedMaskSet)  # each rank holds other shards
            and not ranks_agree([*masks.masks, *trainer.lightning_module.parameters()])
        ):
            raise InvariantViolation(f"{where}: the ranks hold different masks or weights.")
        self.checks += 1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._bound = find_pruning_callback(trainer, self.pruning, "MaskInvariantChecker", required=False)
        if self._bound is not None:
            self._bound.after_pruning(self._after_pruning)

    def _after_pruning(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, "pruning step", compare_ranks=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After every batch: an optimizer step, or a micro-batch of an accumulation, where the masks hold as well.
        n = self.check_ranks_every_n_steps
        self._check(trainer, "optimizer step", compare_ranks=n > 0 and (batch_idx + 1) % n == 0)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("invariants/checks", float(self.checks), on_step=False, on_epoch=True, sync_dist=world_size() > 1)
