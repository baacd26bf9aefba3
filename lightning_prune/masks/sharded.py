"""Masks of sharded parameters (FSDP2's ``fully_shard``, e.g. under Lightning's ``ModelParallelStrategy``), in
plain PyTorch.

Under FSDP2 every parameter is a ``DTensor`` whose rows are split across the processes (``Shard(0)``): each rank
holds ``param.to_local()``, its own rows. A :class:`ShardedMaskSet` keeps one boolean keep-mask per *local shard*
(one byte per weight this rank holds, never a whole-tensor mask) and keeps pruned entries exactly zero on the
shards: the gradient pass, the re-mask and the zeroing of optimizer state are
:class:`~lightning_prune.masks.maskset.MaskSet`'s, acting on the local shards of the parameters, of their gradients
(FSDP2 writes the reduce-scattered gradient into ``param.grad`` after backward, before the optimizer step that
masks it) and of their sharded optimizer state.

The selection of what to prune is exact over the whole model: each rank streams its shards through
:func:`~lightning_prune.masks.selection.prune_lowest_` with ``group=`` and ``offsets=``
(:meth:`ShardedMaskSet.selection_args`), which sums the histograms over the shard group, so the masks are those
one process computes on the gathered weights. Counts (:meth:`~ShardedMaskSet.sparsity` and friends) are over the
whole tensors; they are summed over the group whenever the masks change (in :meth:`~ShardedMaskSet.apply_`, which
every rank calls together), so reading them is local.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.masks import prunable_parameters
    >>> masks = mask_set_for(prunable_parameters(nn.Sequential(nn.Linear(4, 2))))  # no DTensor: a plain MaskSet
    >>> type(masks).__name__
    'MaskSet'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from lightning_prune.masks.maskset import MaskSet


def is_sharded(param: Tensor) -> bool:
    """True when ``param`` is a ``DTensor`` (a parameter FSDP2 or tensor parallelism has split across ranks)."""
    return isinstance(param, DTensor)


def mask_set_for(params: Mapping[str, nn.Parameter], module: nn.Module | None = None) -> MaskSet:
    """The mask set for ``params``: a :class:`ShardedMaskSet` when they are sharded ``DTensor`` parameters, else a
    :class:`~lightning_prune.masks.maskset.MaskSet`.

    Args:
        params: the parameters to mask, by name.
        module: the model that holds them, to refuse FSDP2's CPU offloading of any of them.

    Raises:
        ValueError: some of the parameters are sharded and others are not, they are sharded in a way the
            masks cannot follow (see :class:`ShardedMaskSet`), or ``module`` offloads some of them to the CPU
            (on every rank alike: the sharding and the policies are the same on every rank).
    """
    sharded = [n for n, p in params.items() if is_sharded(p)]
    if not sharded:
        return MaskSet(params)
    whole = [n for n in params if n not in sharded]
    if whole:
        raise ValueError(
            f"Prunable weights {whole} are whole on every rank while {sharded} are sharded (DTensors); pruning "
            "needs one or the other. Apply `fully_shard` to every module holding a prunable weight (e.g. also "
            "to the root module in `configure_model`), or `ignore` those layers."
        )
    if module is not None:
        offloaded = _offloaded(module)
        names = [n for n, p in params.items() if id(p) in offloaded]
        if names:
            raise ValueError(
                f"The prunable weights {names} are offloaded to the CPU by FSDP2 "
                "(`fully_shard(..., offload_policy=CPUOffloadPolicy())`): their masks live with the shards and are "
                "selected and counted with collectives over the shards' process group, which cannot carry CPU "
                "tensors on GPUs (NCCL). Shard these layers without `offload_policy`, or `ignore` them."
            )
    return ShardedMaskSet(params)


def row_split(rows: int, world: int) -> list[tuple[int, int]]:
    """The rows ``[start, stop)`` of each of ``world`` shards of a tensor with ``rows`` rows, as FSDP2 cuts them
    (``torch.chunk``: ``ceil(rows / world)`` each, the last ones shorter or empty).

    Example:
        >>> row_split(5, 2), row_split(3, 4)
        ([(0, 3), (3, 5)], [(0, 1), (1, 2), (2, 3), (3, 3)])
    """
    per = -(-rows // world)
    return [(min(r * per, rows), min((r + 1) * per, rows)) for r in range(world)]


def _offloaded(module: nn.Module) -> set[int]:
    """The ids of the parameters that FSDP2 offloads to the CPU (``offload_policy=CPUOffloadPolicy()``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    found: set[int] = set()
    for sub in module.modules():
        if not isinstance(sub, FSDPModule):
            continue
        state = sub._get_fsdp_state() if hasattr(sub, "_get_fsdp_state") else None
        group = getattr(state, "_fsdp_param_group", None)
        if group is not None and isinstance(getattr(group, "offload_policy", None), CPUOffloadPolicy):
            found |= {id(getattr(p, "sharded_param", None)) for p in getattr(group, "fsdp_params", ())}
    return found


def _shard_info(name: str, param: DTensor) -> tuple[dist.ProcessGroup, int]:
    """The process group that holds ``param``'s row shards and where this rank's shard starts in the flat order of
    the whole tensor."""
    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(
            f"The prunable weight {name!r} is a DTensor placed as {placements} on a {param.device_mesh.ndim}-D mesh; "
            "masks follow weights sharded by rows only: one mesh dimension, `Shard(0)` (what `fully_shard` does). "
            "Tensor parallelism splits weights along the dimensions pruning needs whole: train with "
            "`tensor_parallel_size=1` (FSDP2 alone), or `ignore` this layer."
        )
    group = param.device_mesh.get_group(0)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = param.to_local()
    rows = param.shape[0] if param.dim() else 1
    start, stop = row_split(rows, world)[rank]
    expected = (stop - start, *param.shape[1:])
    if tuple(local.shape) != expected or not local.is_contiguous():
        raise ValueError(
            f"The prunable weight {name!r} holds a local shard of shape {tuple(local.shape)} on rank {rank}, not the "
            f"contiguous rows {expected} FSDP2's even row sharding gives; masks cannot follow this sharding. Shard "
            "it with `fully_shard` (dim 0), or `ignore` this layer."
        )
    # The row length from the shape: indexing the DTensor (`param[0]`) would gather the whole tensor on every rank.
    return group, start * math.prod(param.shape[1:])


class ShardedMaskSet(MaskSet):
    """Boolean keep-masks of the local row shards of FSDP2 parameters, and the hooks that enforce them.

    :attr:`masks` are the local shards' masks (shaped like ``param.to_local()``); :attr:`params` stay the model's
    ``DTensor`` parameters, so names and optimizer state match the model's. Every rank must build it, prune it
    and load it together (they are collectives).

    Args:
        params: the sharded parameters to mask, by name: ``DTensor`` parameters placed ``Shard(0)`` on one mesh
            dimension, all in one process group. Their dtypes may differ (e.g. one layer kept in bfloat16): the
            selection scores every dtype in one exact order, as one process does.

    Raises:
        ValueError: a parameter is not sharded that way, or the parameters live in different process groups (raised
            on every rank alike: the placements are the same on every rank).

    Example:
        Under ``fully_shard`` on two processes (each holds half of a ``Linear(4, 8)``'s rows)::

            masks = ShardedMaskSet(prunable_parameters(model))
            masks.masks[0].shape  # torch.Size([4, 4]): the local rows
            Unstructured().prune_(masks, MagnitudeImportance(), 0.5)  # exact over both ranks' rows
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        if not params:
            raise ValueError("ShardedMaskSet needs at least one parameter to mask.")
        not_sharded = [n for n, p in params.items() if not is_sharded(p)]
        if not_sharded:
            raise ValueError(f"ShardedMaskSet masks DTensor parameters; {not_sharded} are plain tensors.")
        self.names: list[str] = list(params)
        self.params: list[nn.Parameter] = list(params.values())
        info = [_shard_info(n, p) for n, p in params.items()]  # type: ignore[arg-type]
        groups = {id(g) for g, _ in info}
        if len(groups) > 1:
            raise ValueError(
                "The prunable weights are sharded over different process groups; one global threshold needs one "
                "group. Shard every prunable module on the same device mesh."
            )
        #: The process group whose ranks hold the other shards.
        self.group: dist.ProcessGroup = info[0][0]
        self._world = dist.get_world_size(self.group)
        self._rank = dist.get_rank(self.group)
        #: Where each local shard starts in its whole tensor's flat order.
        self.offsets: list[int] = [offset for _, offset in info]
        #: The local shards of the parameters (views of the parameters' storage).
        self.local: list[Tensor] = [p.to_local() for p in self.params]  # type: ignore[attr-defined]
        self.masks: list[Tensor] = [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in self.local]
        self._init_enforcement()
        self._pruned: list[int] = [0] * len(self.params)
        self._tallies: dict[str, tuple[Callable[[Tensor], int], list[int]]] = {}

    # ------------------------------------------------------------------ statistics (over the whole tensors)
    def entry_counts(self) -> tuple[list[int], list[int]]:
        return [p.numel() for p in self.params], list(self._pruned)

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def num_pruned(self) -> int:
        return sum(self._pruned)

    def layer_sparsity(self) -> dict[str, float]:
        return {n: k / p.numel() for n, p, k in zip(self.names, self.params, self._pruned)}

    def local_tensors(self) -> list[Tensor]:
        return [t.detach() for t in self.local]

    def selection_args(self, indices: Sequence[int]) -> dict[str, Any]:
        return {"group": self.group, "offsets": [self.offsets[i] for i in indices]}

    def row_shards(self, i: int) -> list[tuple[int, int]]:
        shape = self.params[i].shape
        return row_split(shape[0] if len(shape) else 1, self._world)

    @property
    def rank(self) -> int:
        return self._rank

    def tally(self, key: str, count: Callable[[Tensor], int]) -> list[int]:
        """The first call for a ``key`` counts now, a collective (every rank calls it, e.g. when a structure binds
        or prunes); later calls read the counts kept up to date by :meth:`apply_`."""
        if key not in self._tallies:
            self._tallies[key] = (count, [])
            self._count()
        return list(self._tallies[key][1])

    def local_rows(self, i: int, whole: Tensor) -> Tensor:
        """This rank's rows of ``whole``, a tensor shaped like the whole parameter ``i`` (e.g. its whole mask or
        statistics), shaped like its local shard."""
        n = self.masks[i].numel()
        return whole.reshape(-1)[self.offsets[i] : self.offsets[i] + n].reshape(self.masks[i].shape)

    def any_process(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.masks[0].device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    @torch.no_grad()
    def _count(self) -> None:
        """Sum the pruned entries of every tensor, and every :meth:`tally`, over the group (one collective)."""
        counts = [m.numel() - int(torch.count_nonzero(m)) for m in self.masks]
        for count, _ in self._tallies.values():
            counts.extend(int(count(m)) for m in self.masks)
        # On the masks' device: the group's backend may carry only those (NCCL).
        local = torch.tensor(counts, dtype=torch.int64, device=self.masks[0].device)
        dist.all_reduce(local, group=self.group)
        values = [int(v) for v in local.tolist()]
        n = len(self.masks)
        self._pruned = values[:n]
        for j, (key, (count, _)) in enumerate(self._tallies.items()):
            self._tallies[key] = (count, values[n * (j + 1) : n * (j + 2)])

    # ------------------------------------------------------------------ enforcement, on the local shards
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every pruned local weight and refresh the global counts (a collective: call it on every rank)."""
        super().apply_()
        self._count()

    # ------------------------------------------------------------------ serialisation of the local shards
    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore this rank's mask shards (as saved by :meth:`state_dict` on the same rank of a run of the same
        world size), or whole masks (a consolidated checkpoint: this rank takes its rows); a collective.

        Raises:
            ValueError: the saved masks name other parameters or fit neither the shards nor the whole tensors.
        """
        missing = [n for n in self.names if n not in state]
        unexpected = [n for n in state if n not in self.names]
        if missing or unexpected:
            raise ValueError(
                "Saved pruning masks do not match the model's prunable parameters: "
                f"missing {missing}, unexpected {unexpected}. Was the checkpoint written for another model or "
                "another `ignore` setting?"
            )
        for i, (n, p, m) in enumerate(zip(self.names, self.params, self.masks)):
            saved = state[n]
            if saved.shape == p.shape:  # a whole mask: take this rank's rows
                saved = self.local_rows(i, saved)
            elif saved.shape != m.shape:
                raise ValueError(
                    f"Saved pruning mask of {n!r} has shape {tuple(saved.shape)}; this rank's shard of the parameter "
                    f"is {tuple(m.shape)} and the whole parameter {tuple(p.shape)}."
                )
            m.copy_(saved.to(device=m.device, dtype=torch.bool))
        self.apply_()
