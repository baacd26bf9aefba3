"""Masks of FSDP2 row shards (``fully_shard`` over a real gloo group of two processes, plain PyTorch): the pruner's
masks, gathered, equal one process's on the same weights (global and layer scope, ties included); masks cost one
byte per local weight; pruned weights and their optimizer state stay exactly zero while training; whole masks load
into shards; bad sharding is refused on every rank alike.

Building and pruning sharded masks never gathers a weight: no collective but the counts' and histograms' all-reduces,
and a peak no higher than the local masks plus the selection's fixed chunk buffers.

The ranks are forked from the test process (``start_method="fork"``), one thread each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _checks import fork_ranks, value_error_message
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from lightning_prune import Pruner
from lightning_prune.criteria import MagnitudeImportance
from lightning_prune.masks import MaskSet, ShardedMaskSet, mask_set_for, prunable_parameters
from lightning_prune.structures import Unstructured

WORLD = 2


def _model() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-8, 9, p.shape, generator=g) / 32)  # few distinct magnitudes: ties everywhere
    return model


def _shard(model: nn.Module, mesh) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _whole(masks: MaskSet) -> dict[str, torch.Tensor]:
    out = {}
    for p, n, m in zip(masks.params, masks.names, masks.masks):
        local = DTensor.from_local(m.to(torch.uint8), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        out[n] = local.full_tensor().bool()
    return out


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        result: dict = {}
        for scope in ("global", "layer"):
            model = _shard(_model(), mesh)
            pruner = Pruner(sparsity=0.7, scope=scope)
            masks = pruner.bind(model)
            result[f"{scope}_type"] = type(masks).__name__
            result[f"{scope}_local"] = [
                (tuple(m.shape), m.dtype, tuple(p.to_local().shape)) for p, m in zip(masks.params, masks.masks)
            ]
            opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
            pruner.attach([opt])
            pruner.prune(0.25)
            result[f"{scope}_masks_0.25"] = _whole(masks)
            g = torch.Generator().manual_seed(rank)
            zero = True
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(4, 6, generator=g)).square().mean().backward()
                opt.step()
                for p, m in zip(masks.params, masks.masks):
                    zero &= not bool(p.to_local()[~m].any())
                    zero &= all(
                        not bool(v.to_local()[~m].any()) for v in opt.state[p].values() if isinstance(v, DTensor)
                    )
            result[f"{scope}_weights"] = {n: p.full_tensor() for n, p in zip(masks.names, masks.params)}
            result[f"{scope}_before"] = _whole(masks)
            pruner.prune(0.7)
            result[f"{scope}_masks_0.7"] = _whole(masks)
            result[f"{scope}_zero"] = zero and all(
                not bool(p.to_local()[~m].any()) for p, m in zip(masks.params, masks.masks)
            )
            result[f"{scope}_sparsity"] = (pruner.achieved_sparsity, masks.layer_sparsity(), masks.num_pruned())
            result[f"{scope}_summary"] = pruner.summary()
        # Whole masks (a consolidated checkpoint) load into the shards: each rank takes its rows.
        model = _shard(_model(), mesh)
        loaded = mask_set_for(prunable_parameters(model))
        loaded.load_state_dict(result["global_masks_0.7"])
        result["loaded"] = _whole(loaded)
        result["loaded_sparsity"] = loaded.sparsity()
        # Bad sharding: refused by every rank alike.
        plain = _model()
        mixed = _shard(_model(), mesh)
        mixed_params = {**prunable_parameters(mixed), "extra.weight": plain[0].weight}
        columns = nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
        result["errors"] = [
            value_error_message(lambda: mask_set_for(mixed_params)),
            value_error_message(lambda: ShardedMaskSet({"fc.weight": columns})),
        ]
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    return fork_ranks(_worker, WORLD, out)


def _single(weights: dict[str, torch.Tensor], before: dict[str, torch.Tensor] | None, target: float, scope: str):
    """One process on the gathered weights: the same pruner on a whole model holding them."""
    model = _model()
    with torch.no_grad():
        for name, p in prunable_parameters(model).items():
            p.copy_(weights[name])
    pruner = Pruner(sparsity=0.7, scope=scope)
    masks = pruner.bind(model)
    if before is not None:
        for n, m in zip(masks.names, masks.masks):
            m.copy_(before[n])
        pruner.target = 0.25
    pruner.prune(target)
    return dict(zip(masks.names, masks.masks)), pruner


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sharded_masks_equal_one_process_on_the_same_weights(ranks, scope):
    r0, r1 = ranks
    assert r0[f"{scope}_type"] == "ShardedMaskSet"
    for name, mask in r0[f"{scope}_masks_0.7"].items():
        assert torch.equal(mask, r1[f"{scope}_masks_0.7"][name])  # both ranks gathered the same whole masks
    initial = {n: p.detach() for n, p in prunable_parameters(_model()).items()}
    expected, _ = _single(initial, None, 0.25, scope)
    for name, mask in expected.items():
        assert torch.equal(r0[f"{scope}_masks_0.25"][name], mask), name
        # Ties: the threshold's magnitude is both pruned and kept (the grid makes many equal magnitudes).
    expected, single = _single(r0[f"{scope}_weights"], r0[f"{scope}_before"], 0.7, scope)
    for name, mask in expected.items():
        assert torch.equal(r0[f"{scope}_masks_0.7"][name], mask), name
    sparsity, layers, pruned = r0[f"{scope}_sparsity"]
    assert sparsity == single.achieved_sparsity and layers == single.layer_sparsity()
    assert pruned == sum(int((~m).sum()) for m in expected.values()) == round(0.7 * (30 + 35 + 21))
    assert r0[f"{scope}_summary"] == single.summary()


def test_threshold_cuts_through_ties():
    weights = torch.cat([p.detach().abs().flatten() for p in prunable_parameters(_model()).values()])
    k = round(0.25 * weights.numel())
    kth = torch.sort(weights).values[k - 1]
    assert int((weights == kth).sum()) > 1 and int((weights < kth).sum()) < k < int((weights <= kth).sum())


def test_masks_are_one_byte_per_local_weight_and_pruned_entries_stay_zero(ranks):
    for r in ranks:
        for scope in ("global", "layer"):
            assert all(m == p and dtype == torch.bool for m, dtype, p in r[f"{scope}_local"])
            assert r[f"{scope}_zero"]
    rows = [[shape[0] for shape, _, _ in r["global_local"]] for r in ranks]
    assert rows == [[3, 4, 2], [2, 3, 1]]  # each rank holds its own rows only


def test_whole_masks_load_into_shards(ranks):
    r0 = ranks[0]
    for name, mask in r0["global_masks_0.7"].items():
        assert torch.equal(r0["loaded"][name], mask)
    assert r0["loaded_sparsity"] == r0["global_sparsity"][0]


def test_bad_sharding_is_refused_on_every_rank(ranks):
    for r in ranks:
        mixed, columns = r["errors"]
        assert "['extra.weight'] are whole on every rank while" in mixed and "fully_shard" in mixed
        assert "'fc.weight' is a DTensor placed as (Shard(dim=1),)" in columns and "tensor_parallel_size=1" in columns
    assert ranks[0]["errors"] == ranks[1]["errors"]


# ------------------------------------------------------------------ memory: nothing of whole-tensor size on a rank
#: A whole weight of 4096 x 4096 (64 MiB in float32, 2048 rows per rank); gathering it once costs a rank twice that.
BIG = 4096
#: What the selection may hold beside the masks: its buffers for one chunk of 2**20 entries (scores, keys, digits,
#: three flags: 15.5 MiB) and the histograms, with room to spare; the tie-break's old int64 running count per entry
#: and its converted copy (16 MiB more) do not fit, nor does a gathered weight (128 MiB with its all-to-all chunks).
SELECTION_BYTES = 28 * 2**20


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _memory_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        # The collectives of the whole path on a tiny model (this also warms it up: code pages, gloo buffers).
        tiny = _shard(_model(), mesh)
        with CommDebugMode() as comm:
            Unstructured().prune_(mask_set_for(prunable_parameters(tiny)), MagnitudeImportance(), 0.5)
        with torch.device("meta"):
            big = _shard(nn.Sequential(nn.Linear(BIG, BIG, bias=False)), mesh)
        big.to_empty(device="cpu")
        params = prunable_parameters(big)
        g = torch.Generator().manual_seed(rank)
        with torch.no_grad():
            params["0.weight"].to_local().random_(-64, 65, generator=g).div_(64)  # 129 magnitudes: ties
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size starts again from the current one
        before = _status_bytes("VmRSS")
        masks = mask_set_for(params)
        Unstructured().prune_(masks, MagnitudeImportance(), 0.9)
        result = {
            "collectives": {str(op): n for op, n in comm.get_comm_counts().items()},
            "rise": _status_bytes("VmHWM") - before,
            "mask_bytes": sum(m.numel() * m.element_size() for m in masks.masks),
            "pruned": masks.num_pruned(),
        }
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_masks_and_pruning_stay_within_the_local_shard(tmp_path):
    ranks = fork_ranks(_memory_worker, WORLD, tmp_path)
    for r in ranks:
        assert set(r["collectives"]) == {"c10d.allreduce_"}  # counts, histograms, the tie table: never a gather
        assert r["mask_bytes"] == BIG * BIG // WORLD
        assert r["pruned"] == round(0.9 * BIG * BIG)
        assert r["rise"] <= r["mask_bytes"] + SELECTION_BYTES, r  # a gathered weight alone is 64 MiB
