"""Work on the ranks of a real gloo process group of two CPU processes, for tests of what is summed over the ranks.

:func:`run_on_ranks` spawns the ranks. They import this module, torch and the plain-PyTorch parts of the package that
the work needs, never Lightning or a test module, so a group starts in about the time torch takes to import (a few
seconds), where a rank that imported a test module would import Lightning too.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from lightning_prune.criteria.activation import ActivationStatistics
from lightning_prune.masks.channels import ChannelMaskSet
from lightning_prune.structures.channel import ChannelStructure


def run_on_ranks(tmp: Path, work: Callable[..., Any], *args: Any, world_size: int = 2) -> list[Any]:
    """Run ``work(rank, *args)`` on every rank of a fresh gloo group and return what each rank returned, by rank.

    ``work`` must be a function of this module (the ranks import it by name) and ``args`` must pickle; the ranks
    run on one thread each and give up waiting for each other after five minutes.
    """
    mp.spawn(_rank, args=(work, str(tmp / "store"), str(tmp), world_size, args), nprocs=world_size, join=True)
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def _rank(rank: int, work: Callable[..., Any], store: str, out: str, world_size: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=5),
    )
    try:
        torch.save(work(rank, *args), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def collect(importance: ActivationStatistics, net: nn.Module, masks: ChannelMaskSet, batches: Sequence[Tensor]) -> None:
    """One statistics window of ``importance`` over ``batches``, one optimizer step each (in this process only)."""
    importance.start(net, masks)
    for x in batches:
        net(x)
        importance.observe(masks)
    importance.stop()


def reduce_activation_statistics(
    rank: int,
    criteria: Mapping[str, Callable[..., ActivationStatistics]],
    net: nn.Module,
    batches: Sequence[Sequence[Tensor]],
) -> dict[str, dict[str, Any]]:
    """Per criterion: the channel scores of this rank's ``batches[rank]`` alone (``local``), after ``reduce_`` over
    the group (``reduced``) and after a second ``reduce_`` (``again``), by channel group, and how many times the
    reduction called its ``all_reduce`` (``calls``). Rank 0 hands ``reduce_`` torch's ``all_reduce``, which sums in
    place; the other ranks one that returns the sum and leaves its argument alone, as ``Strategy.reduce`` does."""
    masks = ChannelStructure().bind(net, example_inputs=batches[0][0][:2])
    calls = 0

    def all_reduce(t: Tensor) -> Tensor | None:
        nonlocal calls
        calls += 1
        if rank == 0:
            dist.all_reduce(t)
            return None
        total = t.clone()
        dist.all_reduce(total)
        return total

    result = {}
    for name, cls in criteria.items():
        importance = cls(batches=len(batches[rank]))
        collect(importance, net, masks, batches[rank])
        local = {g.name: importance.channel_scores(masks, g) for g in masks.groups}
        calls = 0
        importance.reduce_(all_reduce)
        reduced = {g.name: importance.channel_scores(masks, g) for g in masks.groups}
        importance.reduce_(lambda t: t * 2)  # nothing is left to add: what was reduced is never summed again
        again = {g.name: importance.channel_scores(masks, g) for g in masks.groups}
        result[name] = {"local": local, "reduced": reduced, "again": again, "calls": calls}
    return result


def score_blocks_on_rank(rank: int, blocks: nn.Module, batches: Sequence[Sequence[Tensor]]) -> dict[str, Any]:
    """Depth pruning's block scores (Block Influence) of ``blocks`` from this rank's ``batches[rank]``, summed over the
    group by :func:`~lightning_prune.oneshot.depth.score_blocks`."""
    from lightning_prune.oneshot.depth import score_blocks

    found = score_blocks(blocks, batches[rank], num_samples=None)
    return {"scores": found.scores, "tokens": found.tokens}
