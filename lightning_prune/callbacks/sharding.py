"""What :class:`~lightning_prune.callbacks.PruningCallback` needs under sharded training: which strategies and
configurations it supports, and how the masks of sharded weights travel through checkpoints.

Under Lightning's ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in ``LightningModule.configure_model``,
``tensor_parallel_size=1``) the masks live with the local row shards
(:class:`~lightning_prune.masks.sharded.ShardedMaskSet`) and the global threshold is exact. Checkpoints:

* a sharded checkpoint (the strategy's default, ``save_distributed_checkpoint=True``): Lightning writes the
  model and optimizer with ``torch.distributed.checkpoint`` (DCP) and the callbacks' state from rank 0 only, so the
  masks go with the model: each rank's mask shards are added to the checkpoint's ``state_dict`` as ``DTensor``s
  (one byte per weight) under ``MASK_PREFIX + name``, and read back with DCP on resume; so do the shards of a
  gradient criterion's pending statistics, under ``STATISTICS_PREFIX + name``;
* a consolidated checkpoint (``save_distributed_checkpoint=False``): the whole masks (and statistics) are gathered
  into the callback's state, so the file resumes in one process as well as sharded.

Example:
    >>> from lightning.pytorch.strategies import DDPStrategy
    >>> check_strategy(object.__new__(DDPStrategy), "unstructured", "magnitude", None) is None
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from lightning_prune.masks.sharded import ShardedMaskSet

#: Where the mask shards sit in a sharded checkpoint's ``state_dict``.
MASK_PREFIX = "lightning_prune.masks."

#: Where the shards of a criterion's per-weight statistics sit in a sharded checkpoint's ``state_dict``.
STATISTICS_PREFIX = "lightning_prune.statistics."

#: The structures (their ``name``) that prune FSDP2's row shards exactly.
SHARDED_STRUCTURES: tuple[str, ...] = ("unstructured", "n:m", "block")


def check_strategy(strategy: Strategy, structure: object, importance: object, rewind_epoch: int | None) -> None:
    """Refuse a strategy, or a configuration under a sharding strategy, that pruning cannot follow exactly.

    ``structure`` and ``importance`` are the callback's (their ``name`` and ``collects`` are read).

    Under ``ModelParallelStrategy`` (FSDP2 shards the weights by rows) these prune exactly as one process does on
    the whole weights: single weights (``"unstructured"``); N:M groups, which run along the input dimension and so
    lie within a row; blocks, when every row shard holds whole tiles (checked when the masks are bound: a shard
    that cuts a tile is refused on every rank, naming the layer and its shards); weight criteria (``magnitude``,
    ``l1``, ``l2``) and gradient criteria (``taylor``, ``fisher``), whose statistics of the local gradient shards,
    the data-parallel mean after FSDP2's reduce-scatter, equal the rows of DDP's. Channels and heads need whole
    columns that shards split, and activation criteria score channels.

    Raises:
        MisconfigurationException: FSDP1 (``FSDPStrategy``) or DeepSpeed; under ``ModelParallelStrategy``, a
            channel or head structure, a criterion that collects activations, ``rewind_epoch``, or tensor
            parallelism.
    """
    name = type(strategy).__name__
    if "DeepSpeed" in name or name.startswith("FSDP"):
        raise MisconfigurationException(
            f"PruningCallback does not support the sharded strategy {name}: it flattens the weights into shards "
            "masks cannot follow. Train sharded with `ModelParallelStrategy(data_parallel_size=..., "
            "tensor_parallel_size=1)` and `fully_shard` in `configure_model` (FSDP2), which PruningCallback "
            "supports, or use `strategy='ddp'`, which keeps a whole copy of the model on every rank."
        )
    if "ModelParallel" not in name:
        return
    tp = getattr(strategy, "_tensor_parallel_size", 1)
    if isinstance(tp, int) and tp > 1:
        raise MisconfigurationException(
            f"PruningCallback under {name}: `tensor_parallel_size`={tp} splits weights along the dimensions pruning "
            "needs whole. Use `tensor_parallel_size=1` (FSDP2 alone shards by rows, which pruning follows)."
        )
    structure_name = getattr(structure, "name", repr(structure))
    if structure_name not in SHARDED_STRUCTURES:
        raise MisconfigurationException(
            f"PruningCallback under {name} prunes single weights, N:M groups and blocks (structure='unstructured', "
            f"'2:4', 'block'), got {structure!r}: channel and head masks need whole columns that FSDP2 splits "
            "across ranks. Prune them with `strategy='ddp'`, or prune weights, N:M groups or blocks while sharded."
        )
    collects = getattr(importance, "collects", "nothing")
    if collects not in ("nothing", "gradients"):
        raise MisconfigurationException(
            f"PruningCallback under {name} scores weights from their values or gradients; {importance!r} collects "
            f"{collects}. Use importance='magnitude' (or 'l1', 'l2', 'taylor', 'fisher'), or train with "
            "`strategy='ddp'`."
        )
    if rewind_epoch is not None:
        raise MisconfigurationException(
            f"PruningCallback under {name} does not rewind weights (`rewind_epoch`={rewind_epoch}): the stored "
            "weights would be whole copies on every rank. Leave `rewind_epoch` unset, or use `strategy='ddp'`."
        )


def saves_sharded(strategy: Strategy) -> bool:
    """True when ``strategy`` writes sharded (DCP) checkpoints."""
    return bool(getattr(strategy, "_save_distributed_checkpoint", False))


def _as_dtensor(masks: ShardedMaskSet, i: int, local: Tensor) -> DTensor:
    param = masks.params[i]
    return DTensor.from_local(
        local,
        param.device_mesh,  # type: ignore[attr-defined]
        [Shard(0)],
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def mask_state(masks: ShardedMaskSet, sharded: bool) -> dict[str, Any]:
    """The masks' part of the callback's state: a marker and the world size for a sharded checkpoint (the shards
    go with the model, :func:`add_mask_shards`), or the whole masks, gathered (a collective: every rank calls it)."""
    if sharded:
        return {"masks": {}, "sharded_masks": {"world_size": dist.get_world_size(masks.group), "names": masks.names}}
    whole = {}
    for i, (name, mask) in enumerate(zip(masks.names, masks.masks)):
        whole[name] = _as_dtensor(masks, i, mask.to(torch.uint8)).full_tensor().to(torch.bool).cpu()
    return {"masks": whole, "sharded_masks": None}


def statistics_state(masks: ShardedMaskSet, state: dict[str, Any], sharded: bool) -> dict[str, Any]:
    """A criterion's state (``Importance.state_dict()``) for the checkpoint: its per-weight statistics of the local
    shards (gradient criteria, ``state["stats"]``) go with the model in a sharded checkpoint
    (:func:`add_statistics_shards`; their dtypes are kept under ``"sharded_stats"``), or are gathered whole (a
    collective: every rank calls it); any other state is kept as it is."""
    stats = state.get("stats")
    if not stats:
        return state
    if sharded:
        return {
            **state,
            "stats": {},
            "sharded_stats": {n: str(t.dtype).removeprefix("torch.") for n, t in stats.items()},
        }
    whole = {}
    for i, name in enumerate(masks.names):
        if name in stats:
            local = stats[name].to(masks.masks[i].device)
            whole[name] = _as_dtensor(masks, i, local).full_tensor().cpu()
    return {**state, "stats": whole}


def _add_shards(masks: ShardedMaskSet, prefix: str, local: dict[str, Tensor], checkpoint: dict[str, Any]) -> None:
    state = checkpoint.setdefault("state_dict", {})
    for i, name in enumerate(masks.names):
        if name in local:
            state[prefix + name] = _as_dtensor(masks, i, local[name].to(masks.masks[i].device))


def add_mask_shards(masks: ShardedMaskSet, checkpoint: dict[str, Any]) -> None:
    """Add this rank's mask shards to ``checkpoint["state_dict"]`` as ``DTensor``s, for DCP to save."""
    _add_shards(masks, MASK_PREFIX, {n: m.to(torch.uint8) for n, m in zip(masks.names, masks.masks)}, checkpoint)


def add_statistics_shards(masks: ShardedMaskSet, state: dict[str, Any], checkpoint: dict[str, Any]) -> None:
    """Add this rank's shards of a criterion's per-weight statistics (``state["stats"]`` of its ``state_dict()``,
    when it has some) to ``checkpoint["state_dict"]`` as ``DTensor``s, for DCP to save."""
    if state.get("stats"):
        _add_shards(masks, STATISTICS_PREFIX, state["stats"], checkpoint)


def _load_shards(
    masks: ShardedMaskSet, path: str | Path, prefix: str, dtypes: dict[str, torch.dtype], what: str
) -> dict[str, Tensor]:
    """This rank's shards of the tensors ``prefix + name`` of the sharded checkpoint at ``path`` (a collective)."""
    buffers = {
        prefix + name: _as_dtensor(masks, i, torch.empty(mask.shape, dtype=dtypes[name], device=mask.device))
        for i, (name, mask) in enumerate(zip(masks.names, masks.masks))
        if name in dtypes
    }
    try:
        dcp.load({"state_dict": buffers}, checkpoint_id=str(path))
    except Exception as err:  # DCP reports a missing key as a CheckpointException from every rank
        raise MisconfigurationException(
            f"PruningCallback cannot resume from {str(path)!r}: its sharded checkpoint does not hold the {what} of "
            f"{list(dtypes)} ({type(err).__name__}). Resume from a checkpoint of the same pruned run."
        ) from err
    return {name: buffers[prefix + name].to_local() for name in masks.names if name in dtypes}


def load_mask_shards(masks: ShardedMaskSet, path: str | Path) -> dict[str, Tensor]:
    """This rank's mask shards from the sharded checkpoint at ``path`` (a collective), by parameter name; DCP
    reshards them when the checkpoint was written by another number of processes.

    Raises:
        MisconfigurationException: the checkpoint holds no masks of these parameters.
    """
    loaded = _load_shards(masks, path, MASK_PREFIX, dict.fromkeys(masks.names, torch.uint8), "masks")
    return {name: t.to(torch.bool) for name, t in loaded.items()}


def local_statistics(masks: ShardedMaskSet, state: dict[str, Any], path: str | Path | None) -> dict[str, Any]:
    """A saved criterion's state with its per-weight statistics as this rank's shards: read from the sharded
    checkpoint at ``path`` (a collective; DCP reshards them for another number of processes), or this rank's rows of
    whole statistics (a consolidated checkpoint, or one written without sharding).

    Raises:
        MisconfigurationException: the sharded checkpoint holds no statistics of these parameters.
    """
    saved = state.get("sharded_stats")
    if saved:
        if path is None:
            raise MisconfigurationException(
                "PruningCallback cannot resume: its saved statistics are in a sharded checkpoint, but no checkpoint "
                "path was given to read them from. Resume with `trainer.fit(..., ckpt_path=...)`."
            )
        dtypes = {n: getattr(torch, str(d)) for n, d in saved.items()}
        shards = _load_shards(masks, path, STATISTICS_PREFIX, dtypes, "statistics")
        return {k: v for k, v in state.items() if k != "sharded_stats"} | {"stats": shards}
    whole = state.get("stats")
    if not whole:
        return state
    params = dict(zip(masks.names, masks.params))
    local = {
        n: masks.local_rows(masks.names.index(n), t) if n in params and t.shape == params[n].shape else t
        for n, t in whole.items()
    }
    return {**state, "stats": local}
