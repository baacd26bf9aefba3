"""Pruning under Lightning's DDP strategy on the CPU (gloo, two processes): every rank holds the same masks and weights,
activation statistics are summed over the ranks, and DDP prunes as one process with the same global batch does.

The runs start ``tests/_ddp_job.py`` in a subprocess (``_checks.run_ddp_job``) with ``strategy="ddp"``, which re-runs
the command line for the other rank as it does for a user's script. (``strategy="ddp_spawn"`` works as well, but
torch's gloo process group sometimes aborts a spawned rank while the process shuts down after fitting, "terminate
called without an active exception", with or without pruning, which would make a test of it flaky.) Other test
modules start it the same way (``tests/structures/test_block_nm.py``).
"""

import os
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from _checks import check_ranks_agree, run_ddp_job
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_prune import PruningCallback


@pytest.mark.slow
def test_ranks_hold_identical_masks_and_weights_after_every_step(tmp_path):
    # Scores that differ per rank: without the broadcast from rank 0 the ranks' masks would differ at once. (The
    # default suite checks the same broadcast with 2:4 masks: tests/structures/test_block_nm.py.)
    result = run_ddp_job(tmp_path / "ranks.json", "--importance", "rank")
    steps = check_ranks_agree(result)
    total = 6 * 9 + 384 * 32 + 32 * 4
    assert steps[-1]["pruned"] == round(0.8 * total)
    assert result["sparsity"] == pytest.approx(round(0.8 * total) / total)


@pytest.mark.slow
def test_pruned_entries_stay_zero_under_ddp_with_adamw_and_accumulation(tmp_path):
    # Gradients are masked once per optimizer step, after DDP's all-reduce of the accumulated gradients.
    result = run_ddp_job(
        tmp_path / "adamw.json", "--importance", "magnitude", "--optimizer", "adamw", "--accumulate", "2"
    )
    check_ranks_agree(result)  # records after every batch: mid-accumulation too


def test_activation_statistics_are_reduced_over_the_ranks(tmp_path):
    # APoZ channel pruning: each rank counts zeros on its own shard, the counts are summed before scoring. The masks
    # would agree without the sum (rank 0's are broadcast); the scores every rank computed agree only with it.
    result = run_ddp_job(tmp_path / "apoz.json", "--importance", "apoz", "--structure", "channel")
    steps = check_ranks_agree(result)
    scored = [r["scores"] for r in steps if r["scores"][0] is not None]
    assert len(scored) >= 2, steps  # the steps that grew the masks scored channels
    assert all(len(set(s)) == 1 and None not in s for s in scored), scored
    assert result["sparsity"] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy], ids=["fsdp", "deepspeed"])
def test_flattening_sharded_strategies_are_refused_with_a_clear_message(strategy):
    # Neither builds in a CPU Trainer (FSDPStrategy: "requires a GPU accelerator"; DeepSpeedStrategy: its package), so
    # no Trainer.fit here; the callback looks at the strategy's class only.
    # ModelParallelStrategy (FSDP2) is supported: tests/callbacks/test_pruning_sharded.py.
    trainer = SimpleNamespace(strategy=object.__new__(strategy), max_epochs=3)
    with pytest.raises(
        MisconfigurationException, match=rf"sharded strategy {strategy.__name__}: .*ModelParallelStrategy.*'ddp'"
    ):
        PruningCallback(sparsity=0.5).setup(trainer, nn.Linear(2, 2), "fit")  # type: ignore[arg-type]


def test_channel_pruning_under_a_sharded_strategy_is_refused_through_trainer_fit(tmp_path):
    # ModelParallelStrategy builds on the CPU (one gloo process): the refusal of a structure FSDP2 splits comes from a
    # real Trainer.fit, before any step. (FSDP needs a GPU and DeepSpeed its package: checked on the class above.)
    environ = dict(os.environ)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=ModelParallelStrategy(),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[PruningCallback(sparsity=0.5, structure="channel")],
    )
    model = BoringModel()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        with pytest.raises(
            MisconfigurationException,
            match=r"PruningCallback under ModelParallelStrategy prunes single weights, N:M groups and blocks "
            r"\(structure='unstructured', '2:4', 'block'\), got ChannelStructure.*Prune them with `strategy='ddp'`, "
            r"or prune weights, N:M groups or blocks while sharded\.",
        ):
            trainer.fit(model)
    finally:  # the strategy initialised a process group and set MASTER_ADDR/PORT: leave neither to later tests
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ddp_prunes_the_channels_of_a_single_process_run_of_the_same_global_batch(tmp_path):
    # The cheap case of the test below: four epochs, 128 samples. Channel norms sum many weights, so the few ulps by
    # which the two runs' weights differ leave the same channels pruned.
    common = ["--structure", "channel", "--importance", "magnitude"]
    ddp = run_ddp_job(tmp_path / "ddp.json", *common, "--devices", "2", "--batch-size", "16")
    single = run_ddp_job(tmp_path / "single.json", *common, "--devices", "1", "--batch-size", "32")
    check_ranks_agree(ddp)
    assert single["world_size"] == 1
    assert ddp["pruned"] == single["pruned"] and ddp["sparsity"] == single["sparsity"] == 0.5
    ddp_masks, single_masks = (torch.load(tmp_path / f"{r}.masks.pt", weights_only=True) for r in ("ddp", "single"))
    assert ddp_masks.keys() == single_masks.keys()
    for name in ddp_masks:
        assert torch.equal(ddp_masks[name], single_masks[name]), name
    assert abs(ddp["accuracy"] - single["accuracy"]) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_ddp_matches_a_single_process_run_of_the_same_global_batch(tmp_path, structure):
    common = ["--structure", structure, "--importance", "magnitude", "--epochs", "8", "--samples", "512"]
    ddp = run_ddp_job(tmp_path / "ddp.json", *common, "--devices", "2", "--batch-size", "16")
    single = run_ddp_job(tmp_path / "single.json", *common, "--devices", "1", "--batch-size", "32")
    check_ranks_agree(ddp, epochs=8, steps_per_epoch=512 // 32)
    assert single["world_size"] == 1
    # Sparsity is exact in both; the ranks average the same gradients in another order, so accuracy is close, not equal.
    assert ddp["pruned"] == single["pruned"] and ddp["numel"] == single["numel"]
    assert ddp["sparsity"] == single["sparsity"]
    assert abs(ddp["accuracy"] - single["accuracy"]) < 0.1
