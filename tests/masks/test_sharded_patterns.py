"""N:M groups, blocks and gradient criteria on FSDP2 row shards (``fully_shard`` over a real gloo group of two
processes, plain PyTorch): the masks, gathered, equal one process's on the same weights and data (gradual steps,
global and layer scope, ties included), the structures' read-outs are over the whole tensors, and what shards cannot
follow (a shard that cuts a block, CPU offloading) is refused on every rank alike; weights of several dtypes prune
as in one process.

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
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lightning_prune import Pruner
from lightning_prune.masks import MaskSet
from lightning_prune.structures import BlockStructure, NMStructure

WORLD = 2

#: (name, structure, importance, scope, targets): the runs both the ranks and one process make.
RUNS = [
    ("nm_global", "2:4", "magnitude", "global", (0.25, 0.5)),
    ("nm_layer", "1:4", "magnitude", "layer", (0.1, 0.25)),
    ("block_global", (2, 4), "magnitude", "global", (0.3, 0.6)),
    ("block_layer", (2, 4), "l2", "layer", (0.5,)),
    ("taylor_unstructured", "unstructured", "taylor", "global", (0.4, 0.7)),
    ("fisher_nm", "2:4", "fisher", "layer", (0.5,)),
    ("taylor_block", (2, 4), "taylor", "global", (0.5,)),
]


def _model(rows: int = 7) -> nn.Sequential:
    """Inputs a multiple of 4 (N:M); 8, 12 and ``rows`` rows: shards [0:4) [4:8), [0:6) [6:12) and, for 7 rows,
    [0:4) [4:7), whose last block of 2 rows is partial in the whole tensor too."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, rows))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-8, 9, p.shape, generator=g) / 32)  # few distinct magnitudes: ties everywhere
    return model


def _mixed_dtypes() -> nn.Sequential:
    model = _model()
    model[2].to(torch.bfloat16)
    return model


def _structure(spec):
    return BlockStructure(spec) if isinstance(spec, tuple) else spec


def _shard(model: nn.Module, mesh, offload: bool = False) -> nn.Module:
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            policy = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if offload and i == 2 else {}
            fully_shard(layer, mesh=mesh, **policy)
    fully_shard(model, mesh=mesh)
    return model


def _whole(masks: MaskSet, tensors: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for p, n, t in zip(masks.params, masks.names, tensors if tensors is not None else masks.masks):
        local = t.to(torch.uint8) if t.dtype == torch.bool else t
        full = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        out[n] = full.bool() if t.dtype == torch.bool else full
    return out


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches on every rank: the data-parallel mean gradient is then one process's gradient."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 8, generator=g), torch.randint(0, 7, (6,), generator=g)) for _ in range(3)]


def run(model: nn.Module, structure, importance: str, scope: str, targets, record) -> Pruner:
    """Prune ``model`` to each target in turn, training a few SGD steps before each (and collecting statistics
    over them for gradient criteria); ``record(key, pruner)`` after each step."""
    pruner = Pruner(sparsity=max(targets), structure=_structure(structure), importance=importance, scope=scope)
    pruner.bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach([opt])
    for target in targets:
        pruner.start_collecting()
        for x, y in _batches():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pruner.observe()
            opt.step()
        pruner.stop_collecting()
        record(target, pruner)
        pruner.prune(target)
        record(f"after {target}", pruner)
    return pruner


def _non_finite_on_one_rank(model: nn.Module, rank: int) -> dict:
    """A NaN in rank 0's gradient shard skips the step on both ranks; overflowed statistics on rank 1 only make both
    ranks refuse to score."""
    pruner = Pruner(sparsity=0.5, importance="taylor")
    masks = pruner.bind(model)
    pruner.start_collecting()
    x, y = _batches()[0]
    nn.functional.cross_entropy(model(x), y).backward()
    if rank == 0:
        masks.params[1].grad.to_local()[0, 0] = float("nan")
    recorded = [pruner.observe()]
    if rank == 0:
        masks.params[1].grad.to_local()[0, 0] = 0.0
    recorded.append(pruner.observe())
    pruner.stop_collecting()
    taylor = pruner.importance
    out = {"recorded": recorded, "skipped": taylor.skipped, "steps": taylor.steps}
    if rank == 1:  # as if the sums overflowed on this rank's rows only
        state = taylor.state_dict()
        state["stats"]["2.weight"][0, 0] = float("inf")
        taylor.load_state_dict(state, masks)
    out["error"] = value_error_message(lambda: pruner.prune(0.5))
    return out


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        result: dict = {}
        for name, structure, importance, scope, targets in RUNS:
            steps: dict = {}

            def record(key, pruner, steps=steps):
                masks = pruner.masks
                entry = {"masks": _whole(masks), "weights": _whole(masks, [p.to_local() for p in masks.params])}
                if isinstance(key, str):  # after a step: the read-outs
                    entry["readouts"] = (pruner.achieved_sparsity, pruner.layer_sparsity(), pruner.summary())
                    structure = pruner.structure
                    if isinstance(structure, NMStructure):
                        entry["complete"] = structure.complete_groups(masks)
                steps[key] = entry

            run(_shard(_model(), mesh), structure, importance, scope, targets, record)
            result[name] = steps
        for structure in ("unstructured", (2, 4)):  # one layer in bfloat16: pruned as one process prunes it
            pruner = Pruner(sparsity=0.6, structure=_structure(structure))
            masks = pruner.bind(_shard(_mixed_dtypes(), mesh))
            pruner.prune(0.6)
            result[f"mixed {structure}"] = (_whole(masks), pruner.achieved_sparsity)
        result["non_finite"] = _non_finite_on_one_rank(_shard(_model(), mesh), rank)
        errors = []
        for rows in (6, 7):  # 6 rows: shards [0:3) [3:6), which cut a block of 2 rows
            model = _shard(_model(rows), mesh)
            errors.append(value_error_message(lambda model=model: Pruner(structure=BlockStructure((2, 4))).bind(model)))
        offloaded = _shard(_model(), mesh, offload=True)
        errors.append(value_error_message(lambda: Pruner().bind(offloaded)))
        result["errors"] = errors
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_patterns")
    return fork_ranks(_worker, WORLD, out)


@pytest.mark.parametrize("case", RUNS, ids=[r[0] for r in RUNS])
def test_sharded_patterns_and_gradient_criteria_equal_one_process(ranks, case):
    name, structure, importance, scope, targets = case
    torch.set_num_threads(1)
    single: dict = {}

    def record(key, pruner):
        masks = pruner.masks
        entry = {
            "masks": dict(zip(masks.names, [m.clone() for m in masks.masks])),
            "weights": {n: p.detach().clone() for n, p in zip(masks.names, masks.params)},
        }
        if isinstance(key, str):
            entry["readouts"] = (pruner.achieved_sparsity, pruner.layer_sparsity(), pruner.summary())
            if isinstance(pruner.structure, NMStructure):
                entry["complete"] = pruner.structure.complete_groups(masks)
        single[key] = entry

    run(_model(), structure, importance, scope, targets, record)
    sharded = ranks[0][name]
    assert list(sharded) == list(single)
    for key, expected in single.items():
        for layer, weight in expected["weights"].items():  # the same data: the same training, bit for bit
            assert torch.equal(sharded[key]["weights"][layer], weight), (key, layer)
        for layer, mask in expected["masks"].items():
            assert torch.equal(sharded[key]["masks"][layer], mask), (key, layer)
            assert torch.equal(ranks[1][name][key]["masks"][layer], mask), (key, layer)
        if "readouts" in expected:
            assert sharded[key]["readouts"] == expected["readouts"], key
            assert sharded[key].get("complete") == expected.get("complete"), key
    final = single[f"after {targets[-1]}"]
    assert any(not bool(m.all()) for m in final["masks"].values())  # something was pruned


@pytest.mark.parametrize("structure", ["unstructured", (2, 4)], ids=["unstructured", "block"])
def test_prunable_weights_of_several_dtypes_prune_as_one_process(ranks, structure):
    pruner = Pruner(sparsity=0.6, structure=_structure(structure))
    masks = pruner.bind(_mixed_dtypes())
    assert [p.dtype for p in masks.params] == [torch.float32, torch.bfloat16, torch.float32]
    pruner.prune(0.6)
    sharded, sparsity = ranks[0][f"mixed {structure}"]
    assert sparsity == pruner.achieved_sparsity
    for name, mask in zip(masks.names, masks.masks):
        assert torch.equal(sharded[name], mask), name


def test_non_finite_gradients_and_statistics_are_decided_by_every_rank_together(ranks):
    for r in ranks:
        assert r["non_finite"]["recorded"] == [False, True]  # the NaN was in rank 0's shard only
        assert (r["non_finite"]["skipped"], r["non_finite"]["steps"]) == (1, 1)
        assert r["non_finite"]["error"].startswith("The taylor statistics of '2.weight' are not finite")
    assert ranks[0]["non_finite"] == ranks[1]["non_finite"]


def test_nm_pattern_is_complete_on_shards(ranks):
    after = ranks[0]["nm_global"]["after 0.5"]
    assert after["complete"] == {"0.weight": 1.0, "2.weight": 1.0, "4.weight": 1.0}
    for mask in after["masks"].values():
        assert bool(((~mask).reshape(-1, 4).sum(1) == 2).all())


def test_shards_that_cut_blocks_or_offload_are_refused_on_every_rank(ranks):
    cut, partial_last, offloaded = ranks[0]["errors"]
    assert cut == (
        "Block pruning with 2-row tiles needs every row shard to hold whole tiles, but '4.weight' (shape (6, 12)) is "
        "sharded over 2 processes as rows [0:3), [3:6): rows [0:3) cut a tile. Use a block height that divides 3 "
        "(the rows of a shard), give the layer a multiple of 4 rows, or add '4' to `ignore`."
    )
    assert partial_last == "no error"  # [4:7) ends at the last row: its partial tile is the whole tensor's
    assert offloaded.startswith(
        "The prunable weights ['2.weight'] are offloaded to the CPU by FSDP2 "
        "(`fully_shard(..., offload_policy=CPUOffloadPolicy())`)"
    )
    assert offloaded.endswith("Shard these layers without `offload_policy`, or `ignore` them.")
    assert ranks[1]["errors"] == ranks[0]["errors"]
