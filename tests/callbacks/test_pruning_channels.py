"""Channel pruning through ``PruningCallback(structure="channel")`` with real, tiny ``Trainer`` runs."""

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _checks import ZeroChecker, images, make_optimizer, tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_prune import CubicSchedule, PruningCallback
from lightning_prune.criteria.base import Importance
from lightning_prune.data import DigitsDataModule
from lightning_prune.deploy.compact import load_compact
from lightning_prune.masks.channels import ChannelMaskSet
from lightning_prune.models import ImageClassifier, SmallCNN
from lightning_prune.structures.channel import ChannelStructure

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvNet(pl.LightningModule):
    """Conv + BN twice, a flatten into a hidden layer and a head: 8 + 12 + 16 = 36 prunable channels."""

    def __init__(self, optimizer: str = "sgd", seed: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1, bias=False),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 12, 3, padding=1),
                nn.BatchNorm2d(12),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
            )
            self.body = nn.Sequential(nn.Linear(12 * 4, 16), nn.ReLU(), nn.Dropout(dropout))
            self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.features(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return make_optimizer(self.hparams.optimizer, self.parameters())


GROUPS = {"features.0": 8, "features.3": 12, "body.0": 16}
CHANNELS = sum(GROUPS.values())


def channels(sparsity: float = 0.5, **kwargs) -> PruningCallback:
    kwargs.setdefault("schedule", "linear")
    kwargs.setdefault("compact", False)
    return PruningCallback(sparsity=sparsity, structure="channel", report_latency=False, **kwargs)


def assert_pruned_channels_zero(model: nn.Module, masks: ChannelMaskSet) -> None:
    """Each pruned channel is zero in every parameter slice of its group."""
    params = dict(model.named_parameters())
    for g in masks.groups:
        kept = masks.kept(g)
        for s in g.slices:
            rows = s.rows(params[s.param].detach())
            assert bool((rows[~kept[s.root]] == 0).all()), f"{s.param}: a pruned channel of {g.name} is not zero"


def eval_outputs(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was_training)
    return out


def relative_error(expected: Tensor, got: Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max())


def csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


class ChannelZeroChecker(ZeroChecker):
    """Also: every coupled slice of a pruned channel (weights, biases, BN gamma / beta, consumer columns) is zero."""

    def check(self, pl_module, masks) -> None:
        assert_pruned_channels_zero(pl_module, masks)


# ---------------------------------------------------------------------------------------------- 1. gradual pruning
@pytest.mark.parametrize(
    ("optimizer", "extra"),
    [
        ("sgd", {}),
        ("adam", {}),
        ("adamw", {}),
        ("sgd", {"accumulate_grad_batches": 2}),
        ("adamw", {"precision": "bf16-mixed"}),
    ],
    ids=["sgd-momentum", "adam", "adamw-decay", "sgd-accumulate", "adamw-bf16"],
)
def test_pruned_channels_stay_zero_through_training(tmp_path, optimizer, extra):
    pruning = channels(0.5, start_epoch=0, end_epoch=2)
    checker = ChannelZeroChecker(pruning)
    model = ConvNet(optimizer)
    tiny_trainer(tmp_path, [pruning, checker], max_epochs=4, **extra).fit(model, images())
    pruned_epochs = [e for e in range(4) if pruning.schedule.sparsity_at(e) > 0]
    assert pruned_epochs == [1, 2, 3]
    assert checker.checked == 6 * len(pruned_epochs)  # every batch from the first pruning on
    masks = pruning.masks
    assert isinstance(masks, ChannelMaskSet)
    assert {"features.1.weight", "features.1.bias", "features.3.bias", "body.0.bias"} <= set(masks.names)
    assert pruning.achieved_sparsity == round(0.5 * CHANNELS) / CHANNELS
    assert masks.num_pruned_channels() == round(0.5 * CHANNELS)
    assert_pruned_channels_zero(model, masks)
    assert not masks.attached, "hooks must be removed when fitting ends"


def test_channel_sparsity_follows_the_schedule_and_is_logged(tmp_path):
    schedule = CubicSchedule(final_sparsity=0.6, start_epoch=1, end_epoch=3)
    pruning = PruningCallback(schedule=schedule, structure="channel", compact=False, report_latency=False)
    seen: list[float] = []

    class Record(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(pruning.achieved_sparsity)

    logger = CSVLogger(tmp_path, name="run")
    module = ImageClassifier(SmallCNN(channels=(8, 16), hidden=32), lr=0.05)
    t = tiny_trainer(
        tmp_path, [pruning, Record()], max_epochs=5, logger=logger, limit_train_batches=3, limit_val_batches=1
    )
    t.fit(module, DigitsDataModule(batch_size=32, num_classes=10))

    n = pruning.masks.num_channels()
    assert n == 8 + 16 + 32
    assert seen == [round(schedule.sparsity_at(e) * n) / n for e in range(5)]
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(0.6, abs=1 / n)
    layers = pruning.layer_sparsity()
    widths = {"model.features.0": 8, "model.features.4": 16, "model.classifier.1": 32}
    assert set(layers) == set(widths)
    assert sum(layers[k] * c for k, c in widths.items()) == pytest.approx(seen[-1] * n)

    rows = csv_rows(logger)
    logged = [float(r["prune/sparsity"]) for r in rows if r.get("prune/sparsity")]
    assert logged == pytest.approx(seen)
    for name, value in layers.items():
        per_layer = [float(r[f"prune/sparsity/{name}"]) for r in rows if r.get(f"prune/sparsity/{name}")]
        assert len(per_layer) == 5 and per_layer[-1] == pytest.approx(value)
    assert float(t.callback_metrics["prune/target"]) == pytest.approx(0.6)
    assert pruning.compact_model is None and not (Path(logger.log_dir) / "compact.pt").exists()


# ---------------------------------------------------------------------------------------------- 2. resume
def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    def callback() -> PruningCallback:
        return PruningCallback(
            sparsity=0.6, schedule="cubic", start_epoch=1, end_epoch=4, structure="channel", compact=False
        )

    full, full_cb = ConvNet("adam"), callback()
    tiny_trainer(tmp_path / "a", [full_cb], max_epochs=6).fit(full, images(sampler="epoch"))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tiny_trainer(tmp_path / "b", [callback(), ckpt], max_epochs=3, enable_checkpointing=True).fit(
        ConvNet("adam"), images(sampler="epoch")
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("PruningCallback")]
    assert "features.1.weight" in state["masks"] and not state["masks"]["features.1.weight"].all()

    resumed, resumed_cb = ConvNet("adam"), callback()  # a fresh, never-pruned model
    at_start: list[float] = []

    class FirstBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not at_start:
                at_start.append(resumed_cb.achieved_sparsity)

    t = tiny_trainer(tmp_path / "c", [resumed_cb, FirstBatch()], max_epochs=6)
    t.fit(resumed, images(sampler="epoch"), ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    assert at_start[0] > 0.3, "masks were dropped on resume"
    assert resumed_cb.achieved_sparsity == full_cb.achieved_sparsity == round(0.6 * CHANNELS) / CHANNELS
    assert resumed_cb.masks.names == full_cb.masks.names
    for a, b in zip(full_cb.masks.masks, resumed_cb.masks.masks):
        assert torch.equal(a, b)
    for g_full, g_resumed in zip(full_cb.masks.groups, resumed_cb.masks.groups):
        assert torch.equal(full_cb.masks.kept(g_full), resumed_cb.masks.kept(g_resumed)), g_full.name
    expected, got = _state(full), _state(resumed)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


# ---------------------------------------------------------------------------------------------- 3. example inputs
class Recording(ConvNet):
    """Records the inputs of every forward made in eval mode: the channel trace runs the model in eval mode."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.traced: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            self.traced.append(x.detach().clone())
        return super().forward(x)


def test_example_input_array_is_used_to_trace(tmp_path):
    model = Recording()
    model.example_input_array = torch.zeros(3, 1, 8, 8)
    tiny_trainer(tmp_path, [channels(0.5, schedule="one_shot")], max_epochs=1).fit(model, images())
    assert model.traced and {x.shape[0] for x in model.traced} == {3}


def test_explicit_example_inputs_take_precedence(tmp_path):
    model = Recording()
    model.example_input_array = torch.zeros(3, 1, 8, 8)
    pruning = channels(0.5, schedule="one_shot", example_inputs=torch.ones(5, 1, 8, 8))
    tiny_trainer(tmp_path, [pruning], max_epochs=1).fit(model, images())
    assert model.traced and all(torch.equal(x, torch.ones(5, 1, 8, 8)) for x in model.traced)
    assert pruning.achieved_sparsity == 0.5


def test_without_example_inputs_two_samples_of_the_first_batch_are_traced(tmp_path):
    model = Recording()
    loader = images()
    first = next(iter(loader))[0]
    tiny_trainer(tmp_path, [channels(0.5, schedule="one_shot")], max_epochs=1).fit(model, loader)
    assert model.traced and all(torch.equal(x, first[:2]) for x in model.traced)


def test_drawing_the_first_batch_leaves_the_random_stream_alone(tmp_path):
    """A run that draws its trace inputs from the (globally shuffled) loader equals one given them."""

    def run(name: str, **kwargs) -> dict[str, Tensor]:
        model = ConvNet(dropout=0.3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pruning = channels(0.5, start_epoch=0, end_epoch=1, **kwargs)
            tiny_trainer(tmp_path / name, [pruning], max_epochs=2).fit(model, images(sampler="global"))
        return _state(model)

    drawn = run("drawn")
    given = run("given", example_inputs=torch.zeros(2, 1, 8, 8))
    for k in given:
        assert torch.equal(drawn[k], given[k]), k


# ---------------------------------------------------------------------------------------------- 4. compaction
def test_compact_model_at_the_end_of_fitting(tmp_path):
    module = ImageClassifier(SmallCNN(channels=(8, 16), hidden=32), lr=0.05)
    path = tmp_path / "out" / "small.pt"
    pruning = PruningCallback(
        sparsity=0.5,
        schedule="linear",
        start_epoch=0,
        end_epoch=1,
        structure="channel",
        compact_path=path,
        report_latency=False,
    )
    assert pruning.compact  # on by default for channels
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="final")
    logger = CSVLogger(tmp_path, name="run")
    t = tiny_trainer(tmp_path, [pruning, ckpt], max_epochs=3, logger=logger, enable_checkpointing=True)
    t.fit(module, images(classes=10))

    small = pruning.compact_model
    assert small is not None and small is not module
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = eval_outputs(module, x)
    assert relative_error(expected, eval_outputs(small, x)) <= 1e-5
    kept = {g.name: int(pruning.masks.kept(g).sum()) for g in pruning.masks.groups}
    assert small.model.features[0].out_channels == kept["model.features.0"] < 8
    assert small.model.classifier[1].out_features == kept["model.classifier.1"] < 32
    assert module.model.features[0].out_channels == 8, "the LightningModule keeps its shapes"

    report = pruning.compaction_report
    assert report["compact/params_before"] > report["compact/params_after"]
    assert report["compact/params_after"] == sum(p.numel() for p in small.parameters())
    logged = [r for r in csv_rows(logger) if r.get("compact/params_after")]
    assert logged and float(logged[-1]["compact/params_after"]) == report["compact/params_after"]

    assert path.is_file()
    reloaded = load_compact(ImageClassifier(SmallCNN(channels=(8, 16), hidden=32)), path)
    assert torch.equal(eval_outputs(reloaded, x), eval_outputs(small, x))

    restored = ImageClassifier.load_from_checkpoint(
        tmp_path / "ckpt" / "final.ckpt", model=SmallCNN(channels=(8, 16), hidden=32), strict=True
    )
    assert torch.equal(eval_outputs(restored, x), expected)

    small.train()
    nn.functional.cross_entropy(small(x), torch.arange(4)).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in small.parameters())


def test_compact_model_is_saved_in_the_log_dir_by_default(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    pruning = PruningCallback(sparsity=0.5, schedule="one_shot", structure="channel", report_latency=False)
    tiny_trainer(tmp_path, [pruning], max_epochs=1, logger=logger).fit(ConvNet(), images())
    path = Path(logger.log_dir) / "compact.pt"
    assert path.is_file()
    reloaded = load_compact(ConvNet(seed=1), path)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(eval_outputs(reloaded, x), eval_outputs(pruning.compact_model, x))


# ---------------------------------------------------------------------------------------------- 5. misconfiguration
class HalfScore(Importance):
    def __call__(self, name: str, param: Tensor) -> Tensor:
        return param.detach().abs() * 0.5


def test_round_to_larger_than_a_layer_fails_at_train_start(tmp_path):
    pruning = PruningCallback(sparsity=0.5, structure="channel", round_to=64)
    assert pruning.structure.round_to == 64
    t = tiny_trainer(tmp_path, [pruning], max_epochs=2)
    with pytest.raises(
        MisconfigurationException, match=r"`round_to`=64 would empty layer 'model.features.0', which has 32 channels"
    ):
        t.fit(ImageClassifier(SmallCNN()), images(classes=10))
    assert t.global_step == 0


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_final_sparsity_beyond_the_layer_cap_fails_before_training(tmp_path, scope):
    # Every group keeps at least ceil(10%) of its channels, so 95% of all channels can never be pruned.
    pruning = channels(0.95, start_epoch=0, end_epoch=3, scope=scope, max_layer_sparsity=0.9)
    t = tiny_trainer(tmp_path, [pruning], max_epochs=4)
    with pytest.raises(MisconfigurationException, match="95%"):
        t.fit(ConvNet(), images())
    assert t.global_step == 0, "the unreachable target should be refused before training, not epochs into it"


def test_example_inputs_of_the_wrong_shape_fail_at_train_start(tmp_path):
    pruning = channels(0.5, example_inputs=torch.zeros(2, 3, 8, 8))
    t = tiny_trainer(tmp_path, [pruning], max_epochs=1)
    with pytest.raises(
        MisconfigurationException, match=r"ConvNet cannot run on the `example_inputs` \(tensor of shape"
    ):
        t.fit(ConvNet(), images())
    assert t.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"structure": "channel", "importance": HalfScore()}, r"supports importance 'l1', 'l2' or 'magnitude'"),
        (
            {"round_to": 8},
            r"`round_to` applies to structure='channel' only \(or 'heads'\), got structure='unstructured'",
        ),
        ({"max_layer_sparsity": 0.5}, r"`max_layer_sparsity` applies to structure='channel' only"),
        ({"compact": True}, r"`compact=True` removes pruned channels and needs structure='channel'"),
        ({"structure": "channel", "round_to": 0}, r"`round_to` must be a positive integer, got 0"),
        ({"structure": "channel", "max_layer_sparsity": 1.0}, r"`max_layer_sparsity` must be a number in \[0, 1\)"),
    ],
)
def test_bad_channel_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        PruningCallback(**kwargs)


def test_channel_arguments_are_accepted():
    pruning = PruningCallback(structure="channel", importance="magnitude", round_to=8, max_layer_sparsity=0.8)
    assert isinstance(pruning.structure, ChannelStructure)
    assert repr(pruning.structure) == "ChannelStructure(round_to=8, max_layer_sparsity=0.8)"
    assert pruning.compact and PruningCallback(structure="channel", compact=False).compact is False
    assert not PruningCallback().compact
    with pytest.warns(UserWarning, match="`example_inputs` is unused by Unstructured"):
        PruningCallback(example_inputs=torch.zeros(2, 1, 8, 8))
