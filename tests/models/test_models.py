import lightning as L
import pytest
import torch
from torch import nn

from lightning_prune.data import DigitsDataModule
from lightning_prune.models import MLP, ImageClassifier, SmallCNN


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (3, 28, 28), (1, 5, 7), (1, 1, 1)])
def test_forward_shapes(input_shape):
    x = torch.randn(4, *input_shape)
    assert MLP(input_shape=input_shape, num_classes=7)(x).shape == (4, 7)
    cnn = SmallCNN(in_channels=input_shape[0], num_classes=7, channels=(8, 16, 32), hidden=16)
    assert cnn(x).shape == (4, 7)


def test_mlp_is_lenet_300_100():
    net = MLP()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 300), (300, 100), (100, 10)]
    assert linears[-1] is net.head
    assert isinstance(MLP(hidden=()).features[0], nn.Flatten)
    assert MLP(hidden=())(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_small_cnn_layout():
    net = SmallCNN()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 64)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 10
    assert net.classifier[1].in_features == 64 * 2 * 2


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: MLP(hidden=(300, 0)), r"`hidden` must be a sequence of integers >= 1.*got \(300, 0\)"),
        (lambda: MLP(input_shape=()), r"`input_shape` must be a sequence of integers >= 1, got \(\)"),
        (lambda: MLP(num_classes=0), r"`num_classes` must be a sequence of integers >= 1"),
        (lambda: SmallCNN(channels=()), r"`channels` must be a sequence of integers >= 1, got \(\)"),
        (lambda: SmallCNN(hidden=-1), r"`hidden` must be .*got \(-1,\)"),
    ],
)
def test_model_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, r"`optimizer` must be one of \('sgd', 'adam', 'adamw'\), got 'rmsprop'"),
        ({"lr": 0.0}, r"`lr` must be a number > 0, got 0.0"),
        ({"num_classes": 1}, r"`num_classes` must be an integer >= 2, got 1"),
        ({"momentum": 1.0}, r"`momentum` must be in \[0, 1\), got 1.0"),
        ({"weight_decay": -1.0}, r"`weight_decay` must be >= 0, got -1.0"),
        ({"lr_milestones": (10, None)}, r"`lr_milestones` must be a sequence of integer epochs >= 0"),
        ({"lr_gamma": 0}, r"`lr_gamma` must be > 0, got 0"),
    ],
)
def test_classifier_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(MLP(hidden=(8,)), **kwargs)


def test_classifier_requires_a_module():
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got str"):
        ImageClassifier("mlp")  # type: ignore[arg-type]


def test_classifier_state_dict_is_the_model_s():
    net = SmallCNN()
    module = ImageClassifier(net)
    expected = {f"model.{k}" for k in net.state_dict()}
    assert set(module.state_dict()) == expected
    assert "model" not in module.hparams and module.hparams.lr == 0.05


@pytest.mark.parametrize(
    ("name", "cls"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_configure_optimizers(name, cls):
    assert isinstance(ImageClassifier(MLP(), optimizer=name).configure_optimizers(), cls)
    config = ImageClassifier(MLP(), optimizer=name, lr=0.1, lr_milestones=[5, 2]).configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert isinstance(config["optimizer"], cls) and config["lr_scheduler"]["interval"] == "epoch"
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    lrs = []
    for _ in range(6):
        lrs.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        scheduler.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01, 0.001])


def test_fit_on_digits_beats_chance(tmp_path):
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, seed=0)
    module = ImageClassifier(SmallCNN(channels=(8, 16), hidden=32), lr=0.05)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["val/acc"] > 0.5
    (results,) = trainer.test(module, datamodule=dm, verbose=False)
    assert set(results) == {"test/loss", "test/acc"}
    assert results["test/acc"] > 0.5  # chance is 0.1
