import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from _checks import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from torch import nn

from lightning_prune.app.summary import compaction_metrics, sparsity_unit
from lightning_prune.app.train import (
    AccuracyAtEpochStart,
    evaluate_accuracy,
    instantiate_module,
    resolve_output_dir,
    train,
)
from lightning_prune.data import DigitsDataModule
from lightning_prune.deploy.compact import load_compact
from lightning_prune.models import ImageClassifier, SmallCNN

METRIC_KEYS = {
    "status",
    "dense_test_acc",
    "pruned_test_acc",
    "target_sparsity",
    "sparsity",
    "layer_sparsity",
    "nonzero_params",
    "total_params",
    "macs",
    "dense_macs",
    "sparsity_of",
    "weight_sparsity",
    "compact",
    "wall_time_s",
    "overrides",
    "seed",
    "epochs",
    "dense_epoch",
    "digest",
}
# A small, fast version of the main job: 3 epochs, pruning at the starts of epochs 0 and 1.
FAST = [
    "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false",
    "model.channels=[8,16]",
    "model.hidden=32",
]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_config_is_the_main_job():
    cfg = _compose([])
    assert cfg.model._target_ == "lightning_prune.models.SmallCNN"
    assert cfg.pruning._target_ == "lightning_prune.PruningCallback"
    assert (cfg.pruning.sparsity, cfg.pruning.schedule) == (0.9, "cubic")
    assert cfg.pruning.start_epoch < cfg.pruning.end_epoch < cfg.trainer.max_epochs
    # Fine-tuning at a lower rate starts where pruning ends.
    assert list(cfg.optimizer.lr_milestones) == [cfg.pruning.end_epoch]
    assert cfg.trainer.deterministic is True


def test_options_cover_the_documented_choices():
    assert {"cnn", "mlp"} <= set(_options("model"))
    assert {"magnitude", "magnitude_layerwise", "none"} <= set(_options("pruning"))
    assert {"sgd", "adam", "adamw"} <= set(_options("optimizer"))
    assert {"one_shot", "linear", "cubic", "exponential", "iterative"} <= set(_options("schedule"))
    assert {"cpu", "gpu", "ddp"} <= set(_options("trainer"))
    assert {"csv", "tensorboard"} <= set(_options("logger"))
    assert {"none", "l1", "group_lasso", "bn_slimming"} <= set(_options("regularization"))
    assert {"none", "kd"} <= set(_options("distillation"))
    assert _compose(["pruning=magnitude_layerwise"]).pruning.scope == "layer"


def _accuracy_from_checkpoint(cfg, path: Path) -> tuple[float, float]:
    """Test accuracy and weight sparsity of the model saved in ``path``, computed here by hand (a fresh model, the
    saved weights, a plain argmax count): a figure that ``train()`` reads from elsewhere than the trained model
    differs from it."""
    net = SmallCNN(in_channels=1, num_classes=10, channels=tuple(cfg.model.channels), hidden=cfg.model.hidden)
    state = torch.load(path, weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    data = DigitsDataModule(batch_size=64, seed=cfg.seed)
    data.setup("test")
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += int((net.eval()(x).argmax(1) == y).sum())
            total += len(y)
    weights = [m.weight for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return correct / total, zeros


def test_train_prunes_and_writes_metrics(tmp_path):
    cfg = _compose([*FAST, "pruning.start_epoch=0", "pruning.end_epoch=1", f"output_dir='{tmp_path}'"])
    accuracy = train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert metrics["status"] == "ok"
    saved_accuracy, saved_sparsity = _accuracy_from_checkpoint(cfg, tmp_path / "checkpoints" / "last.ckpt")
    assert accuracy == pytest.approx(saved_accuracy) and metrics["pruned_test_acc"] == pytest.approx(saved_accuracy)
    assert metrics["weight_sparsity"] == pytest.approx(saved_sparsity)
    assert accuracy > 0.5
    # Unstructured pruning: the nonzero MACs shrink roughly with the weights, the dense count stays.
    assert 0 < metrics["macs"] < 0.3 * metrics["dense_macs"]
    assert metrics["target_sparsity"] == 0.9
    assert metrics["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert metrics["sparsity_of"] == "weights" and metrics["compact"] is None
    assert metrics["weight_sparsity"] == pytest.approx(0.9, abs=0.01)  # nothing ignored: all weights prunable
    assert all(0.0 <= s <= 1.0 for s in metrics["layer_sparsity"].values())
    assert metrics["nonzero_params"] < 0.2 * metrics["total_params"]
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # checkpointing is on by default


def test_dense_accuracy_is_measured_before_pruning(tmp_path):
    # Pruning starts at epoch 2: the dense accuracy is that of the model trained for two dense epochs.
    cfg = _compose(
        [
            *FAST,
            "pruning.start_epoch=2",
            "pruning.end_epoch=2",
            "trainer.enable_checkpointing=false",
            f"output_dir='{tmp_path}'",
        ]
    )
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dense_test_acc"] > 0.5  # trained, unlike at epoch 0
    assert (metrics["dense_epoch"], metrics["epochs"], metrics["seed"]) == (2, 3, 0)
    assert metrics["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_train_without_pruning(tmp_path, capsys):
    cfg = _compose([*FAST, "pruning=none", f"output_dir='{tmp_path}'"])
    assert "_target_" not in cfg.pruning
    accuracy = train(cfg)
    summary = capsys.readouterr().out
    assert "  regularization   none\n  distillation     none\n" in summary
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    saved_accuracy, saved_sparsity = _accuracy_from_checkpoint(cfg, tmp_path / "checkpoints" / "last.ckpt")
    assert accuracy == pytest.approx(saved_accuracy) and saved_sparsity == 0.0
    assert metrics["sparsity"] == metrics["weight_sparsity"] == 0.0 and metrics["layer_sparsity"] == {}
    assert metrics["compact"] is None
    assert metrics["nonzero_params"] == metrics["total_params"]
    assert metrics["macs"] == metrics["dense_macs"] > 0
    assert metrics["dense_test_acc"] == metrics["pruned_test_acc"] == pytest.approx(accuracy)
    assert metrics["dense_epoch"] == metrics["epochs"] == 3  # the final model is the dense one
    # Without pruning, the lr milestone falls back to max_epochs: a constant learning rate.
    assert list(cfg.optimizer.lr_milestones) == [cfg.trainer.max_epochs]


def test_train_with_l1_distillation_and_a_finetuning_rate_drop(tmp_path, capsys):
    cfg = _compose(
        [
            *FAST,
            "pruning.start_epoch=1",
            "pruning.end_epoch=1",
            "schedule=one_shot",
            "pruning.finetune_lr_scale=0.1",
            "optimizer.lr_milestones=[]",
            "regularization=l1",
            "distillation=kd",
            f"output_dir='{tmp_path}'",
        ]
    )
    assert cfg.regularization.stop_epoch == 1  # the penalty stops when pruning starts
    train(cfg)
    # The summary says how the model was trained.
    summary = capsys.readouterr().out
    schedule_line = "  schedule         one_shot to 0.9 at epoch 1; first non-zero target 0.9000 at epoch 1\n"
    assert summary.count(schedule_line) == 1 and summary.count("  schedule ") == 1
    assert "  regularization   l1, strength 0.0003, epoch 0 (stopped at epoch 1)\n" in summary
    assert (
        "  distillation     alpha 0.5, temperature 4, from epoch 1, teacher: the dense model at epoch 1\n"
    ) in summary
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.9, abs=0.01) and metrics["pruned_test_acc"] > 0.3
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("epoch")]
    epochs_with = {key: sorted({int(r["epoch"]) for r in rows if r.get(key)}) for key in ("reg/l1", "distill/kd")}
    assert epochs_with == {"reg/l1": [0], "distill/kd": [1, 2]}
    # The checkpoint's model weights are the student's alone and load into a fresh module.
    (path,) = tmp_path.glob("checkpoints/*.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    fresh = instantiate_module(cfg)
    assert set(checkpoint["state_dict"]) == set(fresh.state_dict())
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert checkpoint["hyper_parameters"]["reg_lambda"] == cfg.regularization.strength
    lrs = [group["lr"] for group in checkpoint["optimizer_states"][0]["param_groups"]]
    assert lrs == [pytest.approx(cfg.optimizer.lr * 0.1)]


def test_train_with_channel_pruning_compacts_and_saves_a_reloadable_model(tmp_path, capsys):
    compact_path = tmp_path / "compact.pt"
    cfg = _compose(
        [
            *FAST,
            "pruning=channel",
            "pruning.start_epoch=0",
            "pruning.end_epoch=1",
            "trainer.enable_checkpointing=false",
            f"output_dir='{tmp_path}'",
        ]
    )
    accuracy = train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS and metrics["status"] == "ok"
    assert metrics["sparsity_of"] == "channels"
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.02) and metrics["target_sparsity"] == 0.5
    # Whole channels go: their weights and the next layers' input columns, so more weights than channels.
    assert metrics["weight_sparsity"] > metrics["sparsity"]
    compact = metrics["compact"]
    assert compact["path"] == str(compact_path) and compact_path.is_file()  # the run directory by default
    assert compact["params_before"] == metrics["total_params"]
    assert compact["params_after"] == metrics["nonzero_params"] < 0.6 * compact["params_before"]
    assert 0 < compact["macs_after"] < compact["macs_before"]
    assert {"latency_b1_ms_before", "latency_b1_ms_after", "latency_b64_ms_before", "latency_b64_ms_after"} <= set(
        compact
    )
    assert compact["test_acc"] == pytest.approx(accuracy)  # the compact model computes what the masked one does
    out = capsys.readouterr().out
    assert "(of the prunable channels; target 0.5000)" in out
    assert f"params         {compact['params_before']:,} -> {compact['params_after']:,}" in out
    assert str(compact_path) in out

    # A fresh module from the same config takes the compact widths and weights.
    fresh = load_compact(instantiate_module(cfg), compact_path)
    assert sum(p.numel() for p in fresh.parameters()) == compact["params_after"]
    datamodule = DigitsDataModule(batch_size=64, seed=cfg.seed)
    datamodule.setup("test")
    assert evaluate_accuracy(fresh, datamodule.test_dataloader()) == pytest.approx(accuracy)


def test_channel_pruning_without_compaction(tmp_path):
    cfg = _compose(
        [
            *FAST,
            "trainer.max_epochs=1",
            "pruning=channel",
            "pruning.start_epoch=0",
            "pruning.end_epoch=0",
            "pruning.compact=false",
            "trainer.enable_checkpointing=false",
            f"output_dir='{tmp_path}'",
        ]
    )
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sparsity_of"] == "channels" and metrics["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert metrics["compact"] is None and not (tmp_path / "compact.pt").exists()


def test_compaction_metrics_and_sparsity_unit():
    class Callback:
        compaction_report = {"compact/params_before": 10, "compact/params_after": 4, "compact/macs_after": 2}
        compact_path = Path("run/compact.pt")

    assert compaction_metrics(Callback()) == {
        "params_before": 10,
        "params_after": 4,
        "macs_after": 2,
        "path": str(Path("run/compact.pt")),
    }
    assert compaction_metrics(None) is None
    assert compaction_metrics(L.Callback()) is None  # another pruning callback: no compaction
    assert sparsity_unit(L.Callback()) == "weights"


@pytest.mark.slow
def test_channel_sweep_runs_under_hydra(tmp_path):
    overrides = [*FAST, "trainer.max_epochs=2", "pruning=channel", "pruning.start_epoch=0", "pruning.end_epoch=1"]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "-m",
            *overrides,
            "pruning.sparsity=0.3,0.5",
            "pruning.report_latency=false",
            f"hydra.sweep.dir={tmp_path}",
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    for job, sparsity in (("0", 0.3), ("1", 0.5)):
        metrics = json.loads((tmp_path / job / "metrics.json").read_text())
        assert metrics["sparsity"] == pytest.approx(sparsity, abs=0.02) and metrics["sparsity_of"] == "channels"
        assert metrics["compact"]["path"] == str(tmp_path / job / "compact.pt")
        assert (tmp_path / job / "compact.pt").is_file()
    assert (tmp_path / "results.csv").is_file()


def test_script_runs_under_hydra(tmp_path):
    overrides = [
        *FAST,
        "trainer.max_epochs=2",
        "pruning.start_epoch=0",
        "pruning.end_epoch=1",
        f"hydra.run.dir={tmp_path}",
    ]
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides], check=True, cwd=tmp_path, capture_output=True
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["overrides"] == overrides[:-1]  # hydra.* overrides are not task overrides
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    # The run's log file holds the summary, not only the console.
    log = (tmp_path / "train.log").read_text()
    assert "Summary (SmallCNN, seed 0)" in log and f"pruned test acc  {metrics['pruned_test_acc']:.4f}" in log


class _AccuracyAtEpochEnd(L.Callback):
    def __init__(self) -> None:
        self.accuracies: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.accuracies.append(evaluate_accuracy(pl_module, trainer.datamodule.test_dataloader()))


class _ZeroWeightsAtEpochStart(L.Callback):
    """Stands in for pruning: destroys the model at the start of epoch 1."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.zero_()


def test_accuracy_probe_runs_before_later_callbacks(tmp_path):
    L.seed_everything(0)
    probe, reference = AccuracyAtEpochStart(epoch=1), _AccuracyAtEpochEnd()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[reference, probe, _ZeroWeightsAtEpochStart()],
    )
    module = ImageClassifier(SmallCNN(channels=(8, 16), hidden=32), lr=0.1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    # The probe saw the model as epoch 0 left it, not the zeroed one.
    assert probe.accuracy == reference.accuracies[0]
    assert probe.accuracy > 0.5 and reference.accuracies[1] < 0.5


def test_evaluate_accuracy_restores_mode_and_rejects_empty_loaders():
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    running_mean = net[1].running_mean.clone()
    accuracy = evaluate_accuracy(net, [(x, y)])
    assert 0.0 <= accuracy <= 1.0 and net.training
    assert torch.equal(net[1].running_mean, running_mean)  # evaluated in eval mode
    with pytest.raises(ValueError, match="`loader` yielded no samples"):
        evaluate_accuracy(net, [])


def test_accuracy_probe_rejects_bad_epoch():
    with pytest.raises(ValueError, match=r"`epoch` must be an integer >= 0, got -1"):
        AccuracyAtEpochStart(epoch=-1)


def test_resolve_output_dir_without_hydra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_output_dir(OmegaConf.create({"output_dir": None})) == tmp_path
    target = tmp_path / "a" / "b"
    assert resolve_output_dir(OmegaConf.create({"output_dir": str(target)})) == target
    assert target.is_dir()


def test_output_dir_precedence_under_hydra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain, explicit, run = (
            compose(config_name="config", overrides=overrides, return_hydra_config=True)
            for overrides in ([], [f"output_dir='{tmp_path / 'explicit'}'"], [])
        )
    with open_dict(run):
        run.hydra.runtime.output_dir = str(tmp_path / "run")
    instance = HydraConfig.instance()
    previous = instance.cfg
    try:
        instance.set_config(plain)  # compose() leaves hydra.runtime.output_dir missing
        assert resolve_output_dir(plain) == tmp_path
        instance.set_config(run)
        assert resolve_output_dir(run) == tmp_path / "run"
        instance.set_config(explicit)
        assert resolve_output_dir(explicit) == tmp_path / "explicit"
    finally:
        instance.cfg = previous
