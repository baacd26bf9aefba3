"""The exact selection over row shards held by a real gloo process group: the masks equal one process's on the whole
tensors, ties included, for 2 and 3 processes, and bad input raises on every rank together.

The ranks are forked from the test process (``torch.multiprocessing``, ``start_method="fork"``), one thread each;
each runs every problem in turn and saves its mask shards, which the test puts back together.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _checks import free_port

from lightning_prune.masks.selection import prune_lowest_


def _problems() -> list[tuple[list[torch.Tensor], list[torch.Tensor], int, int, bool]]:
    """(scores, keep, k, chunk size, magnitude transform): tied and untied scores, fewer rows than ranks, float64."""
    g = torch.Generator().manual_seed(0)
    out = []
    shapes = [(5, 3), (1, 4), (7,), (2, 2, 3)]
    for tied in (True, False):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            scores = [
                (torch.randint(-3, 4, s, generator=g) * 0.5 if tied else torch.randn(s, generator=g)).to(dtype)
                for s in shapes
            ]
            keep = [torch.rand(s, generator=g) > 0.2 for s in shapes]
            kept = sum(int(m.sum()) for m in keep)
            for k in (1, kept // 3, kept // 2 + 1, kept):
                for chunk in (4, 1 << 20):
                    out.append((scores, keep, k, chunk, tied))
    return out


def _shard(t: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """Rank ``rank``'s rows of ``t`` as FSDP2 cuts them (``torch.chunk`` on dim 0; trailing ranks may get none)
    and where they start in ``t``'s flat order."""
    rows = t.shape[0]
    per = -(-rows // world)
    start, stop = min(rank * per, rows), min((rank + 1) * per, rows)
    row = t[0].numel() if t.dim() > 1 else 1
    return t[start:stop].contiguous(), start * row


def _worker(rank: int, world: int, port: int, out: str, reverse: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # `reverse`: rank r holds the rows of position world - 1 - r, so that offsets, not ranks, order the ties.
        pos = world - 1 - rank if reverse else rank
        results = []
        for scores, keep, k, chunk, tied in _problems():
            shards = [_shard(s, pos, world) for s in scores]
            masks = [_shard(m, pos, world)[0].clone() for m in keep]
            prune_lowest_(
                [s for s, _ in shards],
                masks,
                k,
                transform=None if tied else torch.Tensor.abs_,
                chunk_size=chunk,
                group=dist.group.WORLD,
                offsets=[o for _, o in shards],
            )
            results.append(masks)
        errors = []
        nan = [torch.tensor([[1.0, 2.0], [3.0, float("nan")]])]
        for scores, k in ((nan, 1), ([torch.ones(2, 2)], 5)):
            try:
                prune_lowest_(
                    [_shard(s, pos, world)[0] for s in scores],
                    [torch.ones_like(_shard(s, pos, world)[0], dtype=torch.bool) for s in scores],
                    k,
                    names=["fc.weight"],
                    group=dist.group.WORLD,
                )
            except ValueError as err:
                errors.append(str(err))
        torch.save({"pos": pos, "results": results, "errors": errors}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world", "reverse"), [(2, False), (3, True)])
def test_sharded_selection_equals_one_process_ties_included(world, reverse, tmp_path):
    mp.start_processes(
        _worker, args=(world, free_port(), str(tmp_path), reverse), nprocs=world, start_method="fork", join=True
    )
    ranks = sorted((torch.load(tmp_path / f"rank{r}.pt") for r in range(world)), key=lambda r: r["pos"])
    problems = _problems()
    tie_broken = 0
    for i, (scores, keep, k, chunk, tied) in enumerate(problems):
        expected = [m.clone() for m in keep]
        prune_lowest_(scores, expected, k, transform=None if tied else torch.Tensor.abs_, chunk_size=chunk)
        for j, mask in enumerate(expected):
            got = torch.cat([r["results"][i][j] for r in ranks])
            assert torch.equal(got, mask), (i, j)
        if tied and k < sum(int(m.sum()) for m in keep):
            tie_broken += 1
    assert tie_broken >= 6  # ties at the threshold were split across ranks and tensors
    for r in ranks:  # bad input: every rank raised, none hung
        assert len(r["errors"]) == 2
        assert "Scores of 'fc.weight' contain NaN or infinite values" in r["errors"][0]
        assert r["errors"][1] == "cannot prune 5 entries: only 4 are still kept"
