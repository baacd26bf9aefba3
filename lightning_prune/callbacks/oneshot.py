"""The Lightning side of one-shot pruning: prune from calibration data when fitting starts, then recover.

:class:`OneShotPruning` runs :func:`~lightning_prune.oneshot.prune_one_shot` on the LightningModule at the start of
fitting and hands the masks to a :class:`~lightning_prune.PruningCallback`, which keeps them exact through the
recovery fine-tune, saves them in checkpoints and restores them on resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_prune._helpers import check_flag, is_int
from lightning_prune.callbacks._lookup import find_pruning_callback
from lightning_prune.callbacks.pruning import PruningCallback
from lightning_prune.masks.distributed import world_size
from lightning_prune.oneshot import Allocation, OneShotMethod, OneShotReport, build_allocation, build_method
from lightning_prune.oneshot.base import build_oneshot_structure
from lightning_prune.oneshot.blocks import ForwardFn
from lightning_prune.oneshot.runner import Offload, prune_one_shot

__all__ = ["OneShotPruning"]


class OneShotPruning(Callback):
    """Prune the model once, from calibration data, at the start of fitting; fine-tune with the masks fixed.

    At the start of the first training epoch, right before ``pruning``'s own pruning step (whatever the order of the
    Trainer's callbacks), the LightningModule is pruned by :func:`~lightning_prune.oneshot.prune_one_shot` with
    ``pruning``'s sparsity (or per-layer targets), structure (``"unstructured"`` or N:M) and ``ignore``, block by
    block from the calibration batches: Wanda (Sun et al., 2023), SparseGPT (Frantar & Alistarh, 2023) or
    magnitude, with OWL's layer sparsity (Yin et al., 2023) as an option. The masks are then ``pruning``'s: its
    schedule counts as done, and from then on it keeps pruned weights exactly zero through the recovery fine-tune,
    logs the sparsity and saves the masks in checkpoints. A run resumed from a checkpoint restores the masks and
    does not prune again. With a :class:`~lightning_prune.callbacks.DistillationCallback` wired to the same
    ``pruning`` (its default start is ``pruning``'s first epoch), the teacher is a snapshot of the dense model,
    taken before this callback prunes.

    Under DDP every process calibrates on its own share of the samples and the statistics (Wanda's column norms,
    SparseGPT's Hessians) are summed over the processes, so every process ends with the same masks and weights,
    those of one process on all the samples (masks identical, weights up to float summation order).

    Args:
        pruning: the :class:`~lightning_prune.PruningCallback` that takes the masks over; it must be among the
            Trainer's callbacks and reach its final sparsity at epoch 0 (``schedule="one_shot", start_epoch=0``).
        method: ``"wanda"``, ``"sparsegpt"``, ``"magnitude"`` or a
            :class:`~lightning_prune.oneshot.OneShotMethod` such as ``SparseGPT(blocksize=64)``.
        allocation: None (every layer at ``pruning``'s sparsity) or ``"owl"`` /
            :class:`~lightning_prune.oneshot.OWL` (non-uniform layer targets, same total; unstructured only).
        calibration: the calibration batches (a ``DataLoader`` or a list; tensors, ``(inputs, targets)`` or dicts).
            Under DDP, process ``r`` of ``w`` takes batches ``r, r + w, r + 2w, ...``. None: the first batches of
            the Trainer's train dataloader (under DDP, each process's own share, as its sampler gives it), read
            without touching the global random state.
        num_samples: calibration samples per process (None: every batch of ``calibration``; it must then be given).
        blocks: the repeated blocks: None to find them (an ``nn.ModuleList`` of blocks), their container's name or
            their names (see :func:`~lightning_prune.oneshot.find_blocks`).
        forward_fn: ``forward_fn(module, batch)`` runs the LightningModule on a batch (default: ``module(inputs)``).
        offload: ``"none"``, ``"activations"`` (captured activations on the CPU) or ``"blocks"`` (the model on the
            CPU, one block at a time on the device).
        error_batches: on how many calibration batches each layer's reconstruction error is measured
            (:attr:`report`); 0 for none.
        sequential: run each block once, each layer pruned when the calibration samples (all at once) reach it,
            instead of twice (see ``sequential`` of :func:`~lightning_prune.oneshot.prune_one_shot`): about half
            the time, with the block's activations on all calibration samples in memory at once.

    Attributes:
        report: the :class:`~lightning_prune.oneshot.OneShotReport` of the pruning run (None before it, and in a run
            resumed after it).

    Raises:
        MisconfigurationException: ``pruning`` is not a PruningCallback or not among the Trainer's callbacks, or its
            schedule or structure does not fit one-shot pruning; an unknown method or allocation; an allocation with
            an N:M structure or per-layer targets; a bad ``num_samples``, ``offload``, ``error_batches`` or
            ``sequential``; and everything :func:`~lightning_prune.oneshot.prune_one_shot` refuses (an empty
            calibration loader, batches of other shapes, no repeated blocks, an N:M width that does not divide, a
            singular Hessian), with the layer named.

    Example:
        >>> from lightning_prune import PruningCallback
        >>> pruning = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=0, ignore=["lm_head"])
        >>> oneshot = OneShotPruning(pruning, method="sparsegpt", allocation="owl", num_samples=128)
        >>> oneshot.method, oneshot.allocation
        (SparseGPT(blocksize=128, damping=0.01, dtype=torch.float32), OWL(m=5.0, lam=0.08, granularity='block'))
        >>> callbacks = [pruning, oneshot]  # Trainer(callbacks=callbacks).fit(model, datamodule)
    """

    def __init__(
        self,
        pruning: PruningCallback,
        method: str | OneShotMethod = "wanda",
        allocation: str | Allocation | None = None,
        calibration: Iterable[Any] | None = None,
        num_samples: int | None = 128,
        blocks: str | Sequence[str] | None = None,
        forward_fn: ForwardFn | None = None,
        offload: Offload = "none",
        error_batches: int = 1,
        sequential: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(pruning, PruningCallback):
            raise MisconfigurationException(
                f"OneShotPruning: `pruning` must be the PruningCallback that keeps the masks, got "
                f"{type(pruning).__name__}."
            )
        try:
            self.method: OneShotMethod = build_method(method)
            self.allocation: Allocation | None = build_allocation(allocation)
            self.structure = build_oneshot_structure(pruning.structure)  # type: ignore[arg-type]  # others refused
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(f"OneShotPruning: {err}") from err
        if self.allocation is not None and pruning.structure.name != "unstructured":
            raise MisconfigurationException(
                f"OneShotPruning: `allocation`={self.allocation!r} gives layers different sparsities, but the "
                f"PruningCallback's structure {pruning.structure!r} fixes every layer's. Use structure='unstructured'."
            )
        if self.allocation is not None and pruning.layer_targets is not None:
            raise MisconfigurationException(
                f"OneShotPruning: `allocation`={self.allocation!r} sets every layer's target, but the PruningCallback "
                f"has per-layer targets {pruning.layer_targets}. Use one or the other."
            )
        if num_samples is not None and (not is_int(num_samples) or num_samples < 1):
            raise MisconfigurationException(
                f"OneShotPruning: `num_samples` must be a positive integer or None (every calibration batch), got "
                f"{num_samples!r}."
            )
        if num_samples is None and calibration is None:
            raise MisconfigurationException(
                "OneShotPruning: `num_samples=None` reads every calibration batch, so `calibration` must be given: "
                "the train dataloader would be read whole. Set `num_samples` (e.g. 128) or pass `calibration`."
            )
        if offload not in ("none", "activations", "blocks"):
            raise MisconfigurationException(
                f"OneShotPruning: `offload` must be 'none', 'activations' or 'blocks', got {offload!r}."
            )
        if not is_int(error_batches) or error_batches < 0:
            raise MisconfigurationException(
                f"OneShotPruning: `error_batches` must be an integer >= 0 (0: no error measured), got "
                f"{error_batches!r}."
            )
        self.pruning = pruning
        self.calibration = calibration
        self.num_samples = num_samples
        self.blocks = blocks
        self.forward_fn = forward_fn
        self.offload: Offload = offload
        self.error_batches = int(error_batches)
        try:
            self.sequential = check_flag("sequential", sequential)
        except TypeError as err:
            raise MisconfigurationException(f"OneShotPruning: {err}") from err
        self.report: OneShotReport | None = None
        #: The epoch the model was pruned at (None before; restored from checkpoints, so a resumed run skips it).
        self.pruned_at: int | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        find_pruning_callback(trainer, self.pruning, "OneShotPruning")
        schedule = self.pruning.schedule
        if schedule is None or schedule.sparsity_at(0) < self.pruning.sparsity:
            raise MisconfigurationException(
                f"OneShotPruning prunes to the PruningCallback's final sparsity {self.pruning.sparsity:g} when fitting "
                f"starts, but that callback's schedule {schedule!r} is not there at epoch 0, and would later prune "
                "again with its own importance. Use PruningCallback(schedule='one_shot', start_epoch=0)."
            )
        self.pruning.before_pruning(self._prune)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned_at is not None:
            return
        pruner = self.pruning.pruner
        masks = pruner.masks
        if masks is None:  # bound by the PruningCallback in on_train_start
            raise MisconfigurationException("OneShotPruning: the PruningCallback's masks are not bound yet.")
        if pruner.target > 0:
            raise MisconfigurationException(
                f"OneShotPruning: the PruningCallback's masks are already pruned to {pruner.target:g} (a run resumed "
                "from a checkpoint of another configuration?); one-shot pruning starts from a dense model."
            )
        sparsity = pruner.layer_targets if pruner.layer_targets is not None else pruner.sparsity
        try:
            found, report = prune_one_shot(
                pl_module,
                self._batches(trainer),
                method=self.method,
                sparsity=sparsity,
                structure=self.structure,
                allocation=self.allocation,
                blocks=self.blocks,
                num_samples=self.num_samples,
                ignore=pruner.ignore,
                forward_fn=self.forward_fn,
                device=pl_module.device,
                offload=self.offload,
                error_batches=self.error_batches,
                sequential=self.sequential,
            )
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(f"OneShotPruning: {err}") from err
        state = masks.state_dict()
        for name, mask in found.state_dict().items():
            if name not in state:  # the same module, `ignore` and layer types: a bug if it happens
                raise RuntimeError(f"OneShotPruning: {name!r} was pruned but is not among the PruningCallback's masks.")
            state[name] = mask
        masks.load_state_dict(state)
        # The schedule is done: the PruningCallback keeps these masks and never prunes on top of them.
        pruner.target = pruner.sparsity
        pruner.attach(trainer.optimizers)
        self.report = report
        self.pruned_at = trainer.current_epoch
        rank_zero_info(report.table())

    def _batches(self, trainer: pl.Trainer) -> Iterable[Any]:
        if self.calibration is not None:
            size = world_size()
            return self.calibration if size == 1 else _every_nth(self.calibration, dist.get_rank(), size)
        loader = trainer.train_dataloader
        if loader is None:
            raise MisconfigurationException(
                "OneShotPruning: no `calibration` batches and the Trainer has no train dataloader to read them from."
            )
        with torch.random.fork_rng(devices=[]):  # shuffling samplers draw from the global generator
            return list(_first_samples(loader, self.num_samples or 1))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"pruned_at": self.pruned_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned_at = state_dict.get("pruned_at")


def _every_nth(batches: Iterable[Any], start: int, step: int) -> Iterator[Any]:
    for index, batch in enumerate(batches):
        if index % step == start:
            yield batch


def _first_samples(loader: Iterable[Any], samples: int) -> Iterator[Any]:
    """Batches of ``loader`` until they hold ``samples`` samples (the engine trims the last one)."""
    seen = 0
    for batch in loader:
        yield batch
        seen += _batch_size(batch)
        if seen >= samples:
            return


def _batch_size(batch: Any) -> int:
    """The first dimension of a batch's inputs (``input_ids`` of a dict); 1 when there is none (the engine refuses
    such batches with its own message)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict) and batch:
        return _batch_size(batch.get("input_ids", next(iter(batch.values()))))
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    return 1
