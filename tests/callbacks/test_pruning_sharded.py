"""PruningCallback under sharded training: FSDP2 through Lightning's ``ModelParallelStrategy`` on the CPU (gloo, two
processes), and what it refuses, with messages that say what to do instead.

The fits run ``tests/_fsdp_job.py`` in a subprocess (the strategy re-runs the command line for the other rank); each
takes a minute or two here, so they are ``slow``. The refusals are checked on the strategy objects directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from _checks import images, tiny_trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_prune import PruningCallback
from lightning_prune.callbacks.sharding import check_strategy
from lightning_prune.criteria import build_importance
from lightning_prune.masks import MaskSet
from lightning_prune.structures import NMStructure, Structure, Unstructured

JOB = Path(__file__).resolve().parents[1] / "_fsdp_job.py"


def _setup(callback: PruningCallback, tensor_parallel_size: int = 1) -> None:
    strategy = object.__new__(ModelParallelStrategy)
    strategy._tensor_parallel_size = tensor_parallel_size  # type: ignore[attr-defined]
    strategy._save_distributed_checkpoint = True  # type: ignore[attr-defined]
    trainer = SimpleNamespace(strategy=strategy, max_epochs=3)
    callback.setup(trainer, nn.Sequential(nn.Linear(2, 2)), "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"structure": "2:4", "sparsity": 0.5},
        {"structure": "block", "block_shape": (2, 4)},
        {"importance": "taylor", "start_epoch": 1},
        {"importance": "fisher", "structure": "2:4", "sparsity": 0.5, "start_epoch": 1},
    ],
)
def test_model_parallel_strategy_accepts_what_row_shards_follow(kwargs):
    callback = PruningCallback(**{"sparsity": 0.5, **kwargs})
    _setup(callback)
    assert callback._sharded_checkpoints


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"structure": "channel"},
            r"prunes single weights, N:M groups and blocks \(structure='unstructured', '2:4', 'block'\), got "
            r"ChannelStructure.*Prune them with `strategy='ddp'`",
        ),
        (
            {"structure": "channel", "importance": "apoz", "start_epoch": 1},
            r"got ChannelStructure",
        ),
        ({"rewind_epoch": 0}, r"does not rewind weights \(`rewind_epoch`=0\)"),
    ],
)
def test_model_parallel_refuses_what_shards_cannot_follow(kwargs, match):
    with pytest.raises(MisconfigurationException, match=rf"PruningCallback under ModelParallelStrategy.*{match}"):
        _setup(PruningCallback(sparsity=0.5, **kwargs))


def test_model_parallel_refuses_criteria_that_collect_activations():
    strategy = object.__new__(ModelParallelStrategy)
    strategy._tensor_parallel_size = 1  # type: ignore[attr-defined]
    importance = SimpleNamespace(collects="activations")
    with pytest.raises(
        MisconfigurationException,
        match=r"under ModelParallelStrategy scores weights from their values or gradients; namespace\(collects="
        r"'activations'\) collects activations\. Use importance='magnitude' \(or 'l1', 'l2', 'taylor', 'fisher'\)",
    ):
        check_strategy(strategy, NMStructure(), importance, None)


def test_tensor_parallelism_is_refused():
    with pytest.raises(MisconfigurationException, match=r"`tensor_parallel_size`=2 splits weights.*=1"):
        _setup(PruningCallback(sparsity=0.5), tensor_parallel_size=2)


def run_job(out: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(JOB), str(out), *args], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def check_steps_equal_one_process(
    result: dict, scope: str = "global", structure: Structure | None = None, importance: str = "magnitude"
) -> None:
    """Every pruning step's gathered masks are what one process selects on the same gathered weights (and, for a
    gradient criterion, the same gathered statistics)."""
    structure = structure or Unstructured()
    for step in result["steps"]:
        params = {n: nn.Parameter(w.clone()) for n, w in step["weights"].items()}
        single = MaskSet(params)
        for mask, name in zip(single.masks, single.names):
            mask.copy_(step["masks_before"][name])
        criterion = build_importance(importance)
        if importance != "magnitude":
            criterion.load_state_dict(step["importance_state"], single)
        structure.prune_(single, criterion, step["target"], scope)
        for mask, name in zip(single.masks, single.names):
            assert torch.equal(step["masks_after"][name], mask), (step["target"], name)


@pytest.mark.slow
def test_fsdp2_fit_prunes_exactly_as_one_process_on_the_same_weights(tmp_path):
    # With a MaskInvariantChecker: its checks of the local shards and whole-tensor counts pass on every rank.
    result = run_job(tmp_path / "fit.pt", "--optimizer", "adamw", "--clip", "0.05", "--invariants")
    assert result["world_size"] == 2
    assert len(result["steps"]) == 3
    check_steps_equal_one_process(result)
    first = result["steps"][0]  # on the initial grid weights: the threshold cuts through ties
    w = torch.cat([v.abs().flatten() for v in first["weights"].values()])
    kept = torch.cat([m.flatten() for m in first["masks_after"].values()])
    assert bool(w[kept].min() == w[~kept].max())
    assert result["zero_after_steps"]  # pruned local weights and AdamW's moments stayed zero after every step
    assert result["masked_before_clipping"]  # the clipping norm counts kept entries only, as in one process
    for rank_shapes in result["shapes"]:  # one byte per local weight
        assert all(mask == local and dtype == "torch.bool" for mask, dtype, local in rank_shapes)
    assert [s[0] for s, _, _ in result["shapes"][1]] == [2, 3, 1]
    total = 16 * 5 + 5 * 7 + 7 * 3
    assert result["sparsity"] == round(0.8 * total) / total
    for name, mask in result["final_masks"].items():
        assert not bool(result["final_weights"][name][~mask].any())


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_resumes_bit_exact(tmp_path):
    full = run_job(tmp_path / "full.pt", "--ckpt-dir", str(tmp_path / "ckpt"))
    checkpoint = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    assert (checkpoint / "meta.pt").is_file()  # a DCP directory: the mask shards are saved with the model's
    resumed = run_job(tmp_path / "resumed.pt", "--resume", str(checkpoint))
    check_steps_equal_one_process(resumed)
    for name, mask in full["final_masks"].items():
        assert torch.equal(resumed["final_masks"][name], mask), name
    for name, value in full["final_weights"].items():
        assert torch.equal(resumed["final_weights"][name], value), name


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_resumes_on_another_world_size(tmp_path):
    # DCP reshards the mask shards as it does the model's: 2 processes save, 1 resumes with the same masks.
    full = run_job(tmp_path / "full.pt", "--ckpt-dir", str(tmp_path / "ckpt"))
    resumed = run_job(tmp_path / "one.pt", "--devices", "1", "--resume", str(tmp_path / "ckpt" / "epoch=1-step=8.ckpt"))
    assert resumed["world_size"] == 1
    for name, mask in full["steps"][1]["masks_after"].items():
        assert torch.equal(resumed["steps"][0]["masks_before"][name], mask), name
    check_steps_equal_one_process(resumed)
    assert resumed["zero_after_steps"]


@pytest.mark.slow
def test_fsdp2_fit_prunes_nm_groups_exactly_as_one_process(tmp_path):
    args = ("--structure", "2:4", "--sparsity", "0.5", "--hidden", "8,12")  # inputs 16, 8, 12: multiples of 4
    result = run_job(tmp_path / "nm.pt", *args)
    assert len(result["steps"]) == 3
    check_steps_equal_one_process(result, structure=NMStructure(2, 4))
    for mask in result["final_masks"].values():  # every group of 4 inputs has exactly 2 zeros
        assert bool(((~mask).reshape(-1, 4).sum(1) == 2).all())
    assert result["sparsity"] == 0.5 and result["zero_after_steps"]
    assert "groups at 2:4" in result["summary"] and "100.00%" in result["summary"]


@pytest.mark.slow
def test_fsdp2_fit_refuses_blocks_cut_by_shards_on_every_rank(tmp_path):
    # 5 rows over 2 ranks: shards [0:3) and [3:5) cut a 4-row block. Both ranks raise when binding (no hang).
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(JOB), str(tmp_path / "block.pt"), "--structure", "block"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0
    assert (
        "MisconfigurationException: PruningCallback: Block pruning with 4-row tiles needs every row shard to hold "
        "whole tiles, but 'body.0.weight' (shape (5, 16)) is sharded over 2 processes as rows [0:3), [3:5)"
    ) in done.stderr
    for rank in (0, 1):  # each rank raised the same error itself
        assert f"[rank{rank}]: ValueError: Block pruning with 4-row tiles needs every row shard" in done.stderr
    assert not (tmp_path / "block.pt").exists()


@pytest.mark.slow
def test_fsdp2_taylor_prunes_as_one_process_with_the_same_statistics_and_resumes_bit_exact(tmp_path):
    args = ("--importance", "taylor", "--start-epoch", "1", "--epochs", "5")
    full = run_job(tmp_path / "full.pt", *args, "--ckpt-dir", str(tmp_path / "ckpt"))
    assert len(full["steps"]) == 3 and full["steps"][-1]["target"] == 0.8  # epochs 1, 2 and 3
    check_steps_equal_one_process(full, importance="taylor")
    for step in full["steps"]:  # statistics of every weight, recorded over one epoch of each rank's steps
        assert step["importance_state"]["steps"] == 4
        assert all(bool((s > 0).any()) for s in step["importance_state"]["stats"].values())
    # The checkpoint after epoch 1 holds the statistics for epoch 2's pruning step: their shards go with the model.
    checkpoint = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    meta = torch.load(checkpoint / "meta.pt", weights_only=False)
    (saved,) = [v["importance_state"] for k, v in meta["callbacks"].items() if k.startswith("PruningCallback")]
    assert saved["stats"] == {} and saved["steps"] == 4
    assert saved["sharded_stats"] == dict.fromkeys(["body.0.weight", "body.2.weight", "head.weight"], "float32")
    resumed = run_job(tmp_path / "resumed.pt", *args, "--resume", str(checkpoint))
    check_steps_equal_one_process(resumed, importance="taylor")
    for name, mask in full["final_masks"].items():
        assert torch.equal(resumed["final_masks"][name], mask), name
    for name, value in full["final_weights"].items():
        assert torch.equal(resumed["final_weights"][name], value), name
    # One process resumes the same checkpoint: DCP reshards the statistics, and epoch 2 prunes with them alike.
    one = run_job(tmp_path / "one.pt", *args, "--devices", "1", "--resume", str(checkpoint))
    assert one["world_size"] == 1
    first, expected = one["steps"][0], full["steps"][1]
    for name, stats in expected["importance_state"]["stats"].items():
        assert torch.equal(first["importance_state"]["stats"][name], stats), name
    for name, mask in expected["masks_after"].items():
        assert torch.equal(first["masks_after"][name], mask), name


@pytest.mark.slow
def test_fsdp2_taylor_consolidated_checkpoint_holds_whole_statistics_and_resumes(tmp_path):
    args = ("--importance", "taylor", "--start-epoch", "1", "--epochs", "5")
    full = run_job(tmp_path / "full.pt", *args, "--ckpt-dir", str(tmp_path / "ckpt"), "--consolidated")
    checkpoint = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    (pruning,) = [v for k, v in state["callbacks"].items() if k.startswith("PruningCallback")]
    saved = pruning["importance_state"]
    assert "sharded_stats" not in saved and saved["steps"] == 4
    expected = full["steps"][1]["importance_state"]["stats"]  # what epoch 2's pruning step scored with
    assert {n: tuple(t.shape) for n, t in saved["stats"].items()} == {n: tuple(t.shape) for n, t in expected.items()}
    for name, stats in expected.items():
        assert torch.equal(saved["stats"][name], stats), name
    resumed = run_job(tmp_path / "resumed.pt", *args, "--resume", str(checkpoint))
    for name, mask in full["final_masks"].items():
        assert torch.equal(resumed["final_masks"][name], mask), name


@pytest.mark.slow
def test_consolidated_checkpoint_resumes_sharded_and_in_one_process(tmp_path):
    full = run_job(tmp_path / "full.pt", "--ckpt-dir", str(tmp_path / "ckpt"), "--consolidated")
    checkpoint = tmp_path / "ckpt" / "epoch=2-step=12.ckpt"
    assert checkpoint.is_file()
    state = torch.load(checkpoint, weights_only=False)
    (pruning,) = [v for k, v in state["callbacks"].items() if k.startswith("PruningCallback")]
    assert {n: tuple(m.shape) for n, m in pruning["masks"].items()} == {
        "body.0.weight": (5, 16),
        "body.2.weight": (7, 5),
        "head.weight": (3, 7),
    }
    resumed = run_job(tmp_path / "resumed.pt", "--resume", str(checkpoint))
    for name, mask in full["final_masks"].items():
        assert torch.equal(resumed["final_masks"][name], mask), name
    # One process, no strategy: the whole masks load into a plain model and keep its pruned weights zero.
    from _fsdp_job import Net

    class Plain(Net):
        def configure_model(self) -> None:
            pass

    callback = PruningCallback(sparsity=0.8, schedule="iterative", start_epoch=0, end_epoch=2)
    model = Plain()
    model.load_state_dict(state["state_dict"])
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=4)
    loader = images(n=32, shape=(16,), classes=3, batch_size=8)
    trainer.fit(model, loader, ckpt_path=str(checkpoint))
    for name, mask, param in zip(callback.masks.names, callback.masks.masks, callback.masks.params):
        assert torch.equal(mask, pruning["masks"][name]), name  # the schedule ended at epoch 2: nothing more pruned
        assert not bool(param[~mask].any())
    assert callback.achieved_sparsity == full["sparsity"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy needs CUDA")
def test_fsdp1_strategy_is_refused_in_a_real_fit(tmp_path):
    from _fsdp_job import Net

    class Plain(Net):
        def configure_model(self) -> None:
            pass

    callback = PruningCallback(sparsity=0.5)
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        strategy="fsdp",
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(MisconfigurationException, match=r"sharded strategy FSDPStrategy: .*ModelParallelStrategy"):
        trainer.fit(Plain(), images(n=8, shape=(16,), classes=3))
