"""The summary's lines about the regularization penalty and distillation, for every shape of their groups."""

import pytest
from omegaconf import OmegaConf

from lightning_prune.app.summary import training_aid_lines


@pytest.mark.parametrize(
    ("regularization", "expected"),
    [
        ({}, "none"),
        ({"kind": "l1", "strength": 3e-4, "stop_epoch": None}, "l1, strength 0.0003, the whole run"),
        ({"kind": "l1", "strength": 3e-4, "stop_epoch": 0}, "l1, strength 0.0003, never (stopped at epoch 0)"),
        (
            {"kind": "group_lasso", "strength": 3e-3, "stop_epoch": 10, "warmup_epochs": 2, "ignore": ["head"]},
            "group_lasso, strength 0.003, epochs 0-9 (stopped at epoch 10), ramped up over 2 epochs, not on ['head']",
        ),
        (
            {"kind": "bn_slimming", "strength": 1e-2, "stop_epoch": 1, "warmup_epochs": 1},
            "bn_slimming, strength 0.01, epoch 0 (stopped at epoch 1), ramped up over 1 epoch",
        ),
    ],
)
def test_regularization_line(regularization, expected):
    cfg = OmegaConf.create({"regularization": regularization, "distillation": {}})
    assert training_aid_lines(cfg, pruning_start=10) == [f"  regularization   {expected}", "  distillation     none"]


@pytest.mark.parametrize(
    ("distillation", "pruning_start", "expected"),
    [
        ({}, 3, "none"),
        (
            {"_target_": "lightning_prune.DistillationCallback", "alpha": 0.9, "temperature": 2.0, "start_epoch": None},
            3,
            "alpha 0.9, temperature 2, from epoch 3, teacher: the dense model at epoch 3",
        ),
        (
            {"_target_": "lightning_prune.DistillationCallback", "alpha": 0.5, "temperature": 4.0, "start_epoch": 5},
            3,
            "alpha 0.5, temperature 4, from epoch 5, teacher: the dense model at epoch 5",
        ),
        (
            {"_target_": "lightning_prune.DistillationCallback", "teacher": "dense.ckpt", "start_epoch": None},
            None,
            "alpha 0.5, temperature 4, from epoch 0, teacher: the checkpoint dense.ckpt",
        ),
    ],
)
def test_distillation_line(distillation, pruning_start, expected):
    cfg = OmegaConf.create({"distillation": distillation})
    assert training_aid_lines(cfg, pruning_start) == ["  regularization   none", f"  distillation     {expected}"]
