"""One-shot pruning under a real gloo process group of two processes, each feeding its own share of the
calibration batches: statistics are summed over the ranks, so both ranks end with identical masks and weights,
equal to one process that saw every batch (masks identical, weights up to float summation order).

The ranks are forked from the test process (``torch.multiprocessing``, ``start_method="fork"``), which saves
each of them the seconds of importing torch and Lightning; each runs one thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _checks import free_port
from _oneshot_models import TinyTransformer, token_batches

from lightning_prune.masks.distributed import rank_digest
from lightning_prune.oneshot import SparseGPT, build_method, prune_one_shot

WORLD = 2


def _method(name: str):
    return SparseGPT(blocksize=16) if name == "sparsegpt" else build_method(name)


def _worker(rank: int, port: int, method: str, sequential: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = TinyTransformer()
        share = token_batches(n=4)[rank::WORLD]
        masks, report = prune_one_shot(model, share, method=_method(method), num_samples=None, sequential=sequential)
        torch.save(
            {
                "masks": masks.state_dict(),
                "weights": model.state_dict(),
                "digest": rank_digest([*masks.masks, *model.parameters()]),
                "samples": report.samples,
                "errors": [r.error for r in report.layers],
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("method", "sequential"), [("wanda", False), ("sparsegpt", False), ("sparsegpt", True)])
def test_ranks_end_identical_and_equal_to_one_process_on_all_samples(method, sequential, tmp_path):
    args = (free_port(), method, sequential, str(tmp_path))
    mp.start_processes(_worker, args=args, nprocs=WORLD, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # bit-identical masks and weights on both ranks
    assert ranks[0]["errors"] == ranks[1]["errors"]
    assert ranks[0]["samples"] == 16  # 8 samples per rank, summed

    single = TinyTransformer()
    masks, report = prune_one_shot(
        single, token_batches(n=4), method=_method(method), num_samples=None, sequential=sequential
    )
    assert report.samples == 16
    for name, mask in masks.state_dict().items():
        assert torch.equal(mask, ranks[0]["masks"][name]), name
    for name, value in single.state_dict().items():
        torch.testing.assert_close(value, ranks[0]["weights"][name], rtol=1e-4, atol=1e-5, msg=name)
    alone = TinyTransformer()  # rank 0's share alone: without the reduction the ranks would prune otherwise
    masks_alone, _ = prune_one_shot(
        alone, token_batches(n=4)[0::WORLD], method=_method(method), num_samples=None, sequential=sequential
    )
    assert any(not torch.equal(a, ranks[0]["masks"][n]) for n, a in masks_alone.state_dict().items())
