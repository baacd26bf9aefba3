"""OneShotPruning under a real Trainer: it prunes when fitting starts exactly as prune_one_shot does, hands the masks
to the PruningCallback, which keeps them exact through recovery fine-tuning, and a resumed run does not prune again."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _checks import tiny_trainer
from _oneshot_models import TinyTransformer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import PruningCallback
from lightning_prune.callbacks import DistillationCallback, OneShotPruning
from lightning_prune.callbacks import oneshot as oneshot_module
from lightning_prune.oneshot import prune_one_shot
from lightning_prune.training.distillation import DistillationMixin


class TinyLM(DistillationMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyTransformer(layers=2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids)

    def training_step(self, batch, batch_idx):
        ids, targets = batch
        return F.cross_entropy(self(ids).flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _tokens(n: int = 32, seq: int = 12, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, seq + 1), generator=g)
    return TensorDataset(ids[:, :-1], ids[:, 1:])


def _loader(shuffle: bool = False) -> DataLoader:
    return DataLoader(_tokens(), batch_size=8, shuffle=shuffle)


def _calibration() -> list[torch.Tensor]:
    return list(_tokens(16, seed=1).tensors[0].split(8))


def _pruning(**kwargs) -> PruningCallback:
    kwargs.setdefault("sparsity", 0.5)
    return PruningCallback(schedule="one_shot", start_epoch=0, ignore=["head"], log_per_layer=False, **kwargs)


def _zeros_hold(pruning: PruningCallback) -> bool:
    masks = pruning.masks
    return all(bool((p[~m] == 0).all()) for p, m in zip(masks.params, masks.masks))


@pytest.mark.parametrize(
    ("method", "structure", "sequential"),
    [("wanda", "unstructured", False), ("sparsegpt", "2:4", False), ("wanda", "unstructured", True)],
)
def test_prunes_at_fit_start_like_prune_one_shot_and_keeps_the_masks_through_recovery(
    method, structure, sequential, tmp_path
):
    model = TinyLM()
    reference = copy.deepcopy(model)
    ref_masks, _ = prune_one_shot(
        reference,
        _calibration(),
        method=method,
        structure=structure,
        ignore=["head"],
        num_samples=None,
        sequential=sequential,
    )
    pruning = _pruning(structure=structure)
    oneshot = OneShotPruning(
        pruning, method=method, calibration=_calibration(), num_samples=None, sequential=sequential
    )
    tiny_trainer(tmp_path, [oneshot, pruning], max_epochs=2).fit(model, _loader())

    assert oneshot.pruned_at == 0
    assert oneshot.report is not None and oneshot.report.samples == 16
    saved = pruning.masks.state_dict()
    for name, mask in ref_masks.state_dict().items():
        assert torch.equal(saved[name], mask), name
    assert _zeros_hold(pruning)  # 8 AdamW steps later
    params = dict(model.named_parameters())
    kept = ref_masks.masks[0]
    assert not torch.allclose(params[ref_masks.names[0]][kept], ref_masks.params[0][kept])  # it did train
    if structure == "2:4":
        for name in ref_masks.names:
            groups = saved[name].reshape(-1, 4)
            assert bool((groups.sum(1) == 2).all()), name
    else:
        layer = pruning.layer_sparsity()
        assert layer["net.blocks.0.q.weight"] == 0.5
    assert pruning.pruner.target == 0.5  # the schedule is done: nothing pruned on top


def test_the_train_dataloaders_first_batches_calibrate_without_touching_the_random_state(tmp_path):
    model = TinyLM()
    reference = copy.deepcopy(model)
    ref_masks, _ = prune_one_shot(reference, _loader(), method="wanda", ignore=["head"], num_samples=12)
    pruning = _pruning()
    oneshot = OneShotPruning(pruning, method="wanda", num_samples=12)
    seen: list[torch.Tensor] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0])

    torch.manual_seed(7)
    tiny_trainer(tmp_path, [pruning, oneshot, Record()], max_epochs=1).fit(model, _loader(shuffle=True))
    assert oneshot.report.samples == 12
    # The shuffled train loader was read for calibration under a forked random state: the epoch's order is the one
    # a run without one-shot pruning sees.
    torch.manual_seed(7)
    expected = [x for x, _ in _loader(shuffle=True)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))
    # ... and the calibration batches were its first ones in the unshuffled case.
    model2, pruning2 = TinyLM(), _pruning()
    oneshot2 = OneShotPruning(pruning2, method="wanda", num_samples=12)
    tiny_trainer(tmp_path, [pruning2, oneshot2], max_epochs=1, limit_train_batches=1).fit(model2, _loader())
    for name, mask in ref_masks.state_dict().items():
        assert torch.equal(pruning2.masks.state_dict()[name], mask), name


def test_a_resumed_run_restores_the_masks_and_does_not_prune_again(tmp_path, monkeypatch):
    model = TinyLM()
    pruning = _pruning()
    oneshot = OneShotPruning(pruning, method="sparsegpt", calibration=_calibration(), num_samples=None)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = tiny_trainer(tmp_path, [oneshot, pruning, checkpoint], max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, _loader())
    masks = pruning.masks.state_dict()

    def refuse(*args, **kwargs):
        raise AssertionError("pruned again on resume")

    monkeypatch.setattr(oneshot_module, "prune_one_shot", refuse)
    resumed, pruning2 = TinyLM(), _pruning()
    oneshot2 = OneShotPruning(pruning2, method="sparsegpt", calibration=_calibration(), num_samples=None)
    trainer2 = tiny_trainer(tmp_path, [pruning2, oneshot2], max_epochs=2)
    trainer2.fit(resumed, _loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert oneshot2.pruned_at == 0 and oneshot2.report is None
    for name, mask in masks.items():
        assert torch.equal(pruning2.masks.state_dict()[name], mask), name
    assert _zeros_hold(pruning2)


def test_distillation_teaches_from_the_dense_model(tmp_path):
    model = TinyLM()
    dense = copy.deepcopy(model.state_dict())
    pruning = _pruning()
    oneshot = OneShotPruning(pruning, method="wanda", calibration=_calibration(), num_samples=None)
    distill = DistillationCallback(alpha=0.5, temperature=2.0, pruning=pruning)
    # The distillation callback first: whatever the order, the snapshot is taken before the pruning step.
    tiny_trainer(tmp_path, [distill, pruning, oneshot], max_epochs=1).fit(model, _loader())
    teacher = distill.teacher.state_dict()
    for name, value in dense.items():
        assert torch.equal(teacher[name], value), name
    assert pruning.masks.num_pruned() > 0
    assert bool((model.net.blocks[0].q.weight == 0).any())


def test_owl_allocation_keeps_the_total(tmp_path):
    pruning = _pruning(sparsity=0.6)
    oneshot = OneShotPruning(pruning, method="wanda", allocation="owl", calibration=_calibration(), num_samples=None)
    tiny_trainer(tmp_path, [oneshot, pruning], max_epochs=1).fit(TinyLM(), _loader())
    targets = {r.target for r in oneshot.report.layers}
    assert len(targets) > 1  # non-uniform
    assert oneshot.report.sparsity == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: OneShotPruning(object()), "`pruning` must be the PruningCallback that keeps the masks, got object"),
        (lambda p: OneShotPruning(p, method="obs"), "Unknown one-shot `method` 'obs'"),
        (lambda p: OneShotPruning(p, allocation="even"), "Unknown `allocation` 'even'"),
        (lambda p: OneShotPruning(p, num_samples=0), "`num_samples` must be a positive integer or None"),
        (lambda p: OneShotPruning(p, num_samples=None), "`num_samples=None` reads every calibration batch"),
        (
            lambda p: OneShotPruning(p, offload="disk"),
            "`offload` must be 'none', 'activations' or 'blocks', got 'disk'",
        ),
        (lambda p: OneShotPruning(p, error_batches=-1), "`error_batches` must be an integer >= 0"),
        (lambda p: OneShotPruning(p, sequential=1), r"^OneShotPruning: `sequential` must be True or False, got 1\.$"),
        (
            lambda p: OneShotPruning(_pruning(structure="2:4"), allocation="owl"),
            r"OWL\(m=5.0, lam=0.08, granularity='block'\) gives layers different sparsities, but the PruningCallback's "
            r"structure NMStructure\(n=2, m=4\)",
        ),
        (
            lambda p: OneShotPruning(_pruning(sparsity={"blocks.0.*": 0.5}), allocation="owl"),
            "sets every layer's target, but the PruningCallback has per-layer targets",
        ),
        (
            lambda p: OneShotPruning(PruningCallback(sparsity=0.5, structure="channel")),
            "One-shot pruning supports structure='unstructured' or an 'N:M' pattern such as '2:4'",
        ),
    ],
)
def test_bad_arguments_are_refused(make, match):
    with pytest.raises(MisconfigurationException, match=match):
        make(_pruning())


def test_a_gradual_schedule_is_refused(tmp_path):
    pruning = PruningCallback(sparsity=0.5, schedule="cubic", start_epoch=0, end_epoch=3)
    oneshot = OneShotPruning(pruning, calibration=_calibration())
    match = r"callback's schedule CubicSchedule\(.*\) is not there at epoch 0.*Use PruningCallback\(schedule='one_shot'"
    with pytest.raises(MisconfigurationException, match=match):
        tiny_trainer(tmp_path, [pruning, oneshot], max_epochs=4).fit(TinyLM(), _loader())


def test_the_pruning_callback_must_be_the_trainers(tmp_path):
    oneshot = OneShotPruning(_pruning(), calibration=_calibration())
    with pytest.raises(MisconfigurationException, match="its `pruning` callback is not among the Trainer's callbacks"):
        tiny_trainer(tmp_path, [oneshot, _pruning()], max_epochs=1).fit(TinyLM(), _loader())


def test_an_empty_calibration_loader_is_refused_when_fitting(tmp_path):
    pruning = _pruning()
    oneshot = OneShotPruning(pruning, calibration=[], num_samples=None)
    with pytest.raises(MisconfigurationException, match="OneShotPruning: The calibration dataloader yielded no batch"):
        tiny_trainer(tmp_path, [pruning, oneshot], max_epochs=1).fit(TinyLM(), _loader())


def test_a_model_without_repeated_blocks_names_the_fix(tmp_path):
    class Flat(TinyLM):
        def __init__(self):
            super().__init__()
            self.net.blocks = torch.nn.ModuleList([self.net.blocks[0]])  # one block: nothing repeated

    pruning = _pruning()
    oneshot = OneShotPruning(pruning, calibration=_calibration(), blocks="net.missing")
    with pytest.raises(MisconfigurationException, match=r"OneShotPruning: .*net\.missing"):
        tiny_trainer(tmp_path, [pruning, oneshot], max_epochs=1).fit(Flat(), _loader())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_under_ddp_every_rank_ends_with_the_masks_and_weights_of_one_process_on_all_samples(method, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from _checks import ROOT

    job = ROOT / "tests" / "_oneshot_ddp_job.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(job), str(tmp_path), "--method", method], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["digests"][0] == result["digests"][1]  # bit-identical masks and weights on both ranks
    assert result["samples"] == 16  # 8 per rank, summed

    single = TinyLM()
    method_obj = oneshot_module.build_method(method)
    masks, _ = prune_one_shot(single, _ddp_calibration(), method=method_obj, ignore=["head"], num_samples=None)
    for name, mask in masks.state_dict().items():
        assert torch.equal(torch.tensor(result["masks"][name]), mask), name
    for name, value in single.state_dict().items():
        torch.testing.assert_close(torch.tensor(result["weights"][name]), value, rtol=1e-4, atol=1e-5, msg=name)


def _ddp_calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (16, 13), generator=g)
    return list(ids[:, :-1].split(4))
