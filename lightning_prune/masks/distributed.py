"""Keeping masks identical on every process of a data-parallel run, in plain ``torch.distributed``.

Under data parallelism (Lightning's ``strategy="ddp"``, ``"ddp_spawn"``, or a hand-written
``DistributedDataParallel`` loop) every process holds whole copies of the weights, and DDP keeps them equal by
all-reducing the gradients. Masks are computed from those weights on every process, but a mask is a discrete
decision: one differing bit (a tie broken on other data statistics, a non-deterministic kernel) and the ranks
train different networks from then on. So the masks rank 0 computes are broadcast to every rank after each
pruning step, with the masked weights (:func:`broadcast_masks_`: one byte and one weight per masked entry, once per
pruning step), and statistics that
differ per rank (activation counts of criteria that score channels by their activations) are summed over ranks
before scoring (:func:`all_reduce_sum_`). Both are no-ops outside a process group, so the same code runs on one
process.

:func:`rank_digest` and :func:`ranks_agree` let a caller check that the ranks hold the same tensors, e.g. in
tests or after resuming.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.masks import MaskSet, prunable_parameters
    >>> masks = MaskSet(prunable_parameters(nn.Sequential(nn.Linear(4, 2))))
    >>> broadcast_masks_(masks)  # no process group: nothing to do
    False
    >>> world_size()
    1
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_prune.masks.maskset import MaskSet
from lightning_prune.masks.sharded import ShardedMaskSet


def world_size() -> int:
    """The number of processes in the default process group (1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_rank_zero() -> bool:
    """True on the process that reports: rank 0 of the default process group, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _transport(tensor: Tensor) -> Tensor:
    """``tensor`` itself when the process group's backend can send it, else a copy it can send: contiguous (e.g.
    for channels-last weights), bytes for bools (gloo and NCCL move none), on the GPU for NCCL."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        tensor = tensor.cuda()
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    return tensor.contiguous()


@torch.no_grad()
def broadcast_masks_(masks: MaskSet, src: int = 0) -> bool:
    """Give every rank rank ``src``'s masks and masked parameters, in place.

    Call it on every rank right after the masks changed (it is a collective: every rank must call it). The
    parameters travel too because each rank has already zeroed the entries of its own masks: a rank whose masks
    differed would otherwise keep zeros that rank ``src`` keeps as weights. Installed hooks see the new masks,
    since the mask tensors are updated in place.

    Args:
        masks: the masks of this process.
        src: the rank whose masks win.

    Returns:
        True when masks were broadcast, False outside a process group (or with a single process).
    """
    if world_size() == 1 or isinstance(masks, ShardedMaskSet):  # shards: each rank's masks are its own
        return False
    for tensor in (*masks.masks, *masks.params):
        carried = _transport(tensor.data)
        dist.broadcast(carried, src=src)
        if carried is not tensor.data:
            tensor.data.copy_(carried)
    return True


@torch.no_grad()
def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (unchanged outside a process group).

    Example:
        >>> all_reduce_sum_(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if world_size() == 1:
        return tensor
    carried = _transport(tensor)
    dist.all_reduce(carried, op=dist.ReduceOp.SUM)
    if carried is not tensor:
        tensor.copy_(carried)
    return tensor


def rank_digest(tensors: Sequence[Tensor]) -> str:
    """A short hash of the exact bytes (and shapes and dtypes) of ``tensors``: equal digests, equal tensors.

    Example:
        >>> rank_digest([torch.zeros(2)]) == rank_digest([torch.zeros(2)]) != rank_digest([torch.ones(2)])
        True
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def ranks_agree(tensors: Sequence[Tensor]) -> bool:
    """Whether every rank holds bit-identical ``tensors`` (a collective; True with a single process)."""
    if world_size() == 1:
        return True
    digests: list[str | None] = [None] * world_size()
    dist.all_gather_object(digests, rank_digest(tensors))
    return len(set(digests)) == 1
