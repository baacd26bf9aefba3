"""What :class:`~lightning_prune.callbacks.PruningCallback` keeps in a checkpoint and how a resumed run gets it back:
the callback's state (the pruner's, with the masks and statistics of sharded weights as the strategy saves them),
the checks that a saved state can continue under this callback's schedule, and its restoration once the model is
bound. Plain functions of the pruner, the saved state and the Trainer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_prune._helpers import is_number
from lightning_prune.callbacks.sharding import load_mask_shards, local_statistics, mask_state, statistics_state
from lightning_prune.masks.sharded import ShardedMaskSet
from lightning_prune.pruner import Pruner
from lightning_prune.schedules import SparsitySchedule

#: The version of the callback's state layout (1: masks, target, schedule, lr_scaled; 2: the configuration, the
#: criterion's statistics, per-layer targets, the rewind point and read-outs).
STATE_VERSION = 2


def callback_state(pruner: Pruner, sharded_checkpoints: bool) -> dict[str, Any]:
    """The pruner's state as the callback saves it: with sharded weights, the masks and statistics in the form the
    strategy's checkpoint holds them (``sharded_checkpoints``: shards saved with the model; else gathered whole)."""
    state = pruner.state_dict()
    masks = pruner.masks
    if isinstance(masks, ShardedMaskSet):
        state.update(mask_state(masks, sharded_checkpoints))
        state["importance_state"] = statistics_state(masks, state["importance_state"], sharded_checkpoints)
    return {"version": STATE_VERSION, **state}


def check_resumable(state: Mapping[str, Any], schedule: SparsitySchedule, importance: object, epoch: int) -> None:
    """Refuse saved pruning ``state`` that ``schedule`` cannot continue from at ``epoch``; warn where it continues
    differently (another schedule or ``importance``). The pruner refuses masks of another structure.

    Raises:
        MisconfigurationException: the saved target is not a sparsity, or is above the schedule's at ``epoch``
            (pruned entries are never revived).
    """
    saved = state.get("target")
    if not is_number(saved) or not 0.0 <= saved < 1.0:
        raise MisconfigurationException(
            f"PruningCallback cannot resume: the checkpoint's pruning state has the target {saved!r}, not a "
            "sparsity in [0, 1); the checkpoint was edited or damaged. Resume from another checkpoint."
        )
    saved_target = float(saved)
    target_now = schedule.sparsity_at(epoch)
    if saved_target > target_now + 1e-12:
        raise MisconfigurationException(
            f"PruningCallback cannot resume: the checkpoint's masks are grown to a target of {saved_target:g}, but "
            f"this callback's schedule {schedule!r} asks for {target_now:g} at epoch {epoch}, and pruned "
            f"entries are never revived. Resume with the schedule the run was started with "
            f"({state.get('schedule', 'not recorded')}), or start a new run."
        )
    changed = [
        f"{what} {state[key]} -> {now}"
        for key, what, now in (
            ("schedule", "schedule", repr(schedule)),
            ("importance", "importance", repr(importance)),
        )
        if state.get(key) is not None and state[key] != now
    ]
    if changed:
        rank_zero_warn(
            f"PruningCallback: resuming with another pruning configuration ({'; '.join(changed)}). The saved masks "
            f"(target {saved_target:g}) are kept and grow from epoch {epoch} on as the new configuration says."
        )


def restore(pruner: Pruner, state: Mapping[str, Any], schedule: SparsitySchedule, trainer: pl.Trainer) -> None:
    """Load a checkpoint's pruning ``state`` into the bound ``pruner``, after :func:`check_resumable`; mask and
    statistics shards saved with the model are read back from the checkpoint (``trainer.ckpt_path``).

    Raises:
        MisconfigurationException: the state cannot continue (see :func:`check_resumable`), its masks were saved
            sharded but the model is not, or they do not fit the model.
    """
    check_resumable(state, schedule, pruner.importance, trainer.current_epoch)
    masks = pruner.masks
    if state.get("sharded_masks"):
        if not isinstance(masks, ShardedMaskSet):
            raise MisconfigurationException(
                "PruningCallback cannot resume: the checkpoint's masks were saved sharded, with the model, by "
                "`ModelParallelStrategy`; resume with that strategy, or from a checkpoint it saved with "
                "`save_distributed_checkpoint=False` (whole masks)."
            )
        state = {**state, "masks": load_mask_shards(masks, trainer.ckpt_path)}  # type: ignore[arg-type]
    if isinstance(masks, ShardedMaskSet) and state.get("importance_state"):
        statistics = local_statistics(masks, dict(state["importance_state"]), trainer.ckpt_path)
        state = {**state, "importance_state": statistics}
    try:
        pruner.load_state_dict(state)
    except ValueError as err:
        raise MisconfigurationException(f"PruningCallback cannot resume: {err}") from err


def check_checkpoint_holds(states: Mapping[Any, Any], state_key: str, class_name: str) -> None:
    """A checkpoint's callback ``states`` must hold this callback's (``state_key``, or ``class_name`` for older
    checkpoints); warn when it holds no pruning state at all.

    Raises:
        MisconfigurationException: it holds the state of a pruning callback of another structure or scope.
    """
    ours = state_key in states or class_name in states
    others = [k for k in states if isinstance(k, str) and k.startswith(class_name)]
    if not ours and others:
        raise MisconfigurationException(
            f"The checkpoint holds pruning state for {others}, but this PruningCallback is {state_key}. "
            "Resume with the same `structure` and `scope`, or start a new run."
        )
    if not ours:
        rank_zero_warn(
            "PruningCallback: the checkpoint holds no pruning state (it was written without a PruningCallback, or "
            "by an older version), so the masks start dense and are grown to the schedule's target at the start "
            "of the next training epoch; weights that are already zero score lowest and go first. Resume from a "
            "checkpoint of the pruned run to continue with its exact masks."
        )
