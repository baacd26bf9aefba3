import csv
import inspect
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _checks import ZeroChecker, images, make_optimizer, tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_prune import CubicSchedule, LinearSchedule, PruningCallback


class Net(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten())
        self.body = nn.Sequential(nn.Linear(6 * 8 * 8, 48), nn.ReLU())
        self.head = nn.Linear(48, 4)

    def forward(self, x):
        return self.head(self.body(self.features(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return make_optimizer(self.hparams.optimizer, self.parameters())


@pytest.mark.parametrize(
    ("optimizer", "extra"),
    [
        ("sgd", {}),
        ("adam", {}),
        ("adamw", {}),
        ("sgd", {"accumulate_grad_batches": 3}),
        ("adamw", {"precision": "bf16-mixed"}),
    ],
    ids=["sgd-momentum", "adam", "adamw-decay", "sgd-accumulate", "adamw-bf16"],
)
def test_pruned_weights_stay_zero_through_training(tmp_path, optimizer, extra):
    pruning = PruningCallback(sparsity=0.8, schedule="linear", start_epoch=0, end_epoch=2)
    checker = ZeroChecker(pruning)
    model = Net(optimizer)
    # 6 batches/epoch x 10 epochs: over 50 optimizer steps at full sparsity without accumulation.
    tiny_trainer(tmp_path, [pruning, checker], max_epochs=10, **extra).fit(model, images())
    assert checker.checked >= 40
    assert pruning.achieved_sparsity == pytest.approx(0.8, abs=1e-3)
    weights = [model.features[0].weight, model.body[0].weight, model.head.weight]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * total)


def test_logs_sparsity_to_every_logger(tmp_path):
    pruning = PruningCallback(sparsity=0.5, schedule="cubic", start_epoch=0, end_epoch=2, ignore=["head"])
    logger = CSVLogger(tmp_path, name="run")
    t = tiny_trainer(tmp_path, [pruning], max_epochs=3, logger=logger)
    t.fit(Net(), images(), images(32))
    assert float(t.callback_metrics["prune/sparsity"]) == pytest.approx(0.5, abs=1e-3)
    assert "prune/sparsity" in t.progress_bar_metrics
    assert set(pruning.layer_sparsity()) == {"features.0.weight", "body.0.weight"}
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["prune/sparsity"]) for r in rows if r.get("prune/sparsity")]
    assert logged == sorted(logged) and logged[-1] == pytest.approx(0.5, abs=1e-3)
    assert any(r.get("prune/sparsity/body.0.weight") for r in rows)


def test_sparsity_follows_the_schedule_each_epoch(tmp_path):
    schedule = CubicSchedule(final_sparsity=0.9, start_epoch=1, end_epoch=4)
    pruning = PruningCallback(schedule=schedule)
    seen = []

    class Record(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(pruning.achieved_sparsity)

    tiny_trainer(tmp_path, [pruning, Record()], max_epochs=6).fit(Net(), images())
    n = pruning.masks.numel()
    assert seen == [round(schedule.sparsity_at(e) * n) / n for e in range(6)]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    def callback():
        return PruningCallback(sparsity=0.9, schedule="cubic", start_epoch=1, end_epoch=4)

    full = Net("adam")
    full_cb = callback()
    tiny_trainer(tmp_path / "a", [full_cb], max_epochs=6).fit(full, images(sampler="epoch"))

    first = Net("adam")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tiny_trainer(tmp_path / "b", [callback(), ckpt], max_epochs=3, enable_checkpointing=True).fit(
        first, images(sampler="epoch")
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert any(k.startswith("PruningCallback") for k in saved["callbacks"])

    resumed = Net("adam")  # a fresh, never-pruned model
    resumed_cb = callback()
    seen = []

    class FirstBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not seen:
                seen.append(resumed_cb.achieved_sparsity)

    t = tiny_trainer(tmp_path / "c", [resumed_cb, FirstBatch()], max_epochs=6)
    t.fit(resumed, images(sampler="epoch"), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert seen[0] > 0.5, "masks were dropped on resume"
    assert resumed_cb.achieved_sparsity == full_cb.achieved_sparsity == pytest.approx(0.9, abs=1e-3)
    for a, b in zip(full_cb.masks.masks, resumed_cb.masks.masks):
        assert torch.equal(a, b)
    expected, got = _weights(full), _weights(resumed)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def test_saved_weights_load_strictly_into_a_fresh_model(tmp_path):
    model = Net()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="final")
    pruning = PruningCallback(sparsity=0.7, schedule="one_shot", start_epoch=1)
    tiny_trainer(tmp_path, [pruning, ckpt], max_epochs=2, enable_checkpointing=True).fit(model, images())
    fresh = Net(seed=1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert set(model.state_dict()) == set(Net().state_dict())
    reloaded = Net.load_from_checkpoint(tmp_path / "final.ckpt", strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k])
    assert sum(int((p == 0).sum()) for p in [reloaded.features[0].weight, reloaded.body[0].weight]) > 0


def test_resume_with_another_structure_or_scope_is_refused(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = PruningCallback(sparsity=0.5, schedule="one_shot")
    tiny_trainer(tmp_path, [first, ckpt], max_epochs=1, enable_checkpointing=True).fit(Net(), images())
    other = PruningCallback(sparsity=0.5, schedule="one_shot", scope="layer")
    with pytest.raises(MisconfigurationException, match="Resume with the same `structure` and `scope`"):
        tiny_trainer(tmp_path, [other], max_epochs=2).fit(Net(), images(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def test_resume_into_a_model_with_other_prunable_layers_is_refused(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = PruningCallback(sparsity=0.5, schedule="one_shot")
    tiny_trainer(tmp_path, [first, ckpt], max_epochs=1, enable_checkpointing=True).fit(Net(), images())
    other = PruningCallback(sparsity=0.5, schedule="one_shot", ignore=["head"])
    with pytest.raises(MisconfigurationException, match=r"cannot resume.*unexpected \['head.weight'\]"):
        tiny_trainer(tmp_path, [other], max_epochs=2).fit(Net(), images(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def test_layer_scope_reaches_the_target_in_every_layer(tmp_path):
    pruning = PruningCallback(sparsity=0.6, schedule="exponential", start_epoch=0, end_epoch=2, scope="layer")
    tiny_trainer(tmp_path, [pruning], max_epochs=3).fit(Net(), images())
    for name, mask in zip(pruning.masks.names, pruning.masks.masks):
        assert int((~mask).sum()) == round(0.6 * mask.numel()), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\), got 1.0"),
        ({"sparsity": -0.2}, r"`sparsity` must be a number in \[0, 1\), got -0.2"),
        ({"schedule": "cubik"}, r"`schedule` must be one of .* got 'cubik'"),
        ({"importance": "taylorr"}, "Unknown importance 'taylorr'"),
        ({"structure": "channels"}, "Unknown structure 'channels'"),
        ({"scope": "local"}, r"`scope` must be one of \['global', 'layer'\], got 'local'"),
        ({"start_epoch": 5, "end_epoch": 2}, r"`end_epoch` \(2\) must not be before `start_epoch` \(5\)"),
        ({"every_n_epochs": 0}, "`every_n_epochs` must be an integer >= 1, got 0"),
        ({"start_epoch": -1}, "`start_epoch` must be an integer >= 0, got -1"),
        ({"ignore": [3]}, "`ignore` must be a list of module-name patterns"),
        (
            {"schedule": LinearSchedule(final_sparsity=0.5, start_epoch=0, end_epoch=3), "sparsity": 0.9},
            r"contradicting arguments: `sparsity`=0.9 but the schedule has 0.5",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        PruningCallback(**kwargs)


def test_the_signature_defaults_are_the_values_used():
    """``help(PruningCallback)`` and ``--print_config`` show the defaults in force; ``None`` means the same."""
    shown = inspect.signature(PruningCallback).parameters
    assert {k: shown[k].default for k in ("start_epoch", "end_epoch", "every_n_epochs", "scope")} == {
        "start_epoch": 0,
        "end_epoch": None,
        "every_n_epochs": 1,
        "scope": "global",
    }
    for pruning in (
        PruningCallback(sparsity=0.5),
        PruningCallback(sparsity=0.5, start_epoch=None, every_n_epochs=None, scope=None),
    ):
        assert (pruning.start_epoch, pruning.schedule.every_n_epochs, pruning.scope) == (0, 1, "global")
    # Per-layer targets prune each layer to its own target under the default scope.
    assert PruningCallback(sparsity={"head": 0.5}).scope == "layer"
    assert PruningCallback(sparsity={"head": 0.5}, scope="layer").scope == "layer"


def test_a_schedule_object_keeps_its_own_epochs_unless_contradicted():
    schedule = CubicSchedule(final_sparsity=0.9, start_epoch=2, end_epoch=6, every_n_epochs=2)
    for pruning in (PruningCallback(schedule=schedule), PruningCallback(schedule=schedule, start_epoch=2)):
        assert (pruning.start_epoch, pruning.schedule.every_n_epochs) == (2, 2)
    with pytest.raises(
        MisconfigurationException,
        match=r"contradicting arguments: `start_epoch`=3 but the schedule has 2, `every_n_epochs`=4 but the schedule "
        r"has 2\. Set them on the schedule object only\.",
    ):
        PruningCallback(schedule=schedule, start_epoch=3, every_n_epochs=4)


def test_bad_model_dependent_arguments_fail_at_setup(tmp_path):
    with pytest.raises(MisconfigurationException, match="`ignore` pattern 'classifier' matches no module of Net"):
        tiny_trainer(tmp_path, [PruningCallback(ignore=["classifier"])], max_epochs=1).fit(Net(), images())

    class Dense(Net):
        def __init__(self):
            super().__init__()
            self.features = nn.Flatten()
            self.body = nn.LayerNorm(64)
            self.head = nn.Sequential(nn.LayerNorm(64), nn.Unflatten(1, (4, 16)), nn.Flatten(1), nn.Identity())

        def forward(self, x):
            return self.head(self.body(self.features(x)))[:, :4]

    with pytest.raises(MisconfigurationException, match="Dense has nothing left to prune"):
        tiny_trainer(tmp_path, [PruningCallback()], max_epochs=1).fit(Dense(), images())
    with pytest.raises(MisconfigurationException, match="`max_epochs` is -1"):
        tiny_trainer(tmp_path, [PruningCallback()], max_epochs=-1, max_steps=3).fit(Net(), images())


def test_warns_when_the_schedule_outlasts_training(tmp_path):
    pruning = PruningCallback(sparsity=0.5, schedule="linear", start_epoch=0, end_epoch=9)
    with pytest.warns(UserWarning, match="will not be reached"):
        tiny_trainer(tmp_path, [pruning], max_epochs=2).fit(Net(), images())


def test_open_end_uses_the_last_epoch_and_state_keys_differ(tmp_path, caplog):
    pruning = PruningCallback(sparsity=0.5, schedule="linear")
    with caplog.at_level(logging.INFO):
        tiny_trainer(tmp_path, [pruning], max_epochs=3).fit(Net(), images())
    assert pruning.schedule.end_epoch == 2
    # The log says when the first weights go: the linear schedule's target is 0 at its start epoch.
    assert (
        "PruningCallback: linear to 0.5 over epochs 0-2 (every 1); first non-zero target 0.2500 at epoch 1."
        in caplog.messages
    )
    assert pruning.achieved_sparsity == pytest.approx(0.5, abs=1e-3)
    assert PruningCallback(scope="layer").state_key != PruningCallback().state_key
