from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _checks import CONF
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from lightning_prune.app.train import instantiate_module
from lightning_prune.data.fakes import write_fake_cifar10, write_fake_mnist
from lightning_prune.models import (
    GPT,
    TORCHVISION_MODELS,
    VGG,
    VGG_PRESETS,
    BasicBlock,
    CifarResNet,
    ImageClassifier,
    LanguageModel,
    LeNet5,
    resnet20,
    resnet56,
    torchvision_model,
    vgg11,
    vgg16,
)

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
FACTORIES = {
    "lenet5": lambda c, k: LeNet5(in_channels=c, num_classes=k),
    "vgg_tiny": lambda c, k: VGG("tiny", in_channels=c, num_classes=k),
    "vgg11": lambda c, k: vgg11(num_classes=k, in_channels=c),
    "resnet20": lambda c, k: resnet20(num_classes=k, in_channels=c),
    "resnet56": lambda c, k: resnet56(num_classes=k, in_channels=c),
    "resnet18": lambda c, k: torchvision_model("resnet18", num_classes=k, in_channels=c),
    "resnet18_small": lambda c, k: torchvision_model("resnet18", num_classes=k, in_channels=c, small_inputs=True),
    "mobilenet_v2": lambda c, k: torchvision_model("mobilenet_v2", num_classes=k, in_channels=c),
    "mobilenet_v2_small": lambda c, k: torchvision_model("mobilenet_v2", k, in_channels=c, small_inputs=True),
}


def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(FACTORIES))
def test_forward_gives_one_logit_per_class(name, shape):
    net = FACTORIES[name](shape[0], 7)
    assert net(torch.randn(2, *shape)).shape == (2, 7)
    net.eval()
    assert net(torch.randn(1, *shape)).shape == (1, 7)


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "resnet18_small", "vgg_tiny"])
def test_backward_reaches_every_parameter(name):
    net = FACTORIES[name](3, 10)
    nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_resnet20_and_56_have_the_papers_sizes():
    # He et al. (2016), Table 6: 0.27M and 0.85M parameters (option A); option B adds two 1x1 projections.
    assert _n_params(resnet20()) == pytest.approx(0.27e6, rel=0.02)
    assert _n_params(resnet56()) == pytest.approx(0.85e6, rel=0.02)
    net = resnet20()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 + 2  # 19 3x3 convolutions on the main path, 2 projection shortcuts
    assert isinstance(net.head, nn.Linear) and (net.head.in_features, net.head.out_features) == (64, 10)


def test_resnet_shortcuts_are_projections_only_where_the_shape_changes():
    net: Any = resnet20()
    kinds = [type(block.shortcut) for stage in (net.layer1, net.layer2, net.layer3) for block in stage]
    assert kinds == [nn.Identity] * 3 + [nn.Sequential, nn.Identity, nn.Identity] * 2
    projection = net.layer2[0].shortcut
    assert isinstance(projection[0], nn.Conv2d) and projection[0].kernel_size == (1, 1)
    assert projection[0].stride == (2, 2) and isinstance(projection[1], nn.BatchNorm2d)
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert BasicBlock(8, 8)(torch.zeros(1, 8, 4, 4)).shape == (1, 8, 4, 4)


def test_lenet5_layout():
    net = LeNet5()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 6, (5, 5)), (6, 16, (5, 5))]
    assert [(m.in_features, m.out_features) for m in linears] == [(400, 120), (120, 84), (84, 10)]
    assert linears[-1] is net.head
    assert _n_params(net) == 61_706


def test_vgg_presets_and_custom_plans():
    assert sum(isinstance(m, nn.Conv2d) for m in vgg11().modules()) == 8
    assert sum(isinstance(m, nn.Conv2d) for m in vgg16().modules()) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg11().modules()) == 8
    assert _n_params(vgg11()) == pytest.approx(9.23e6, rel=0.01)
    assert set(VGG_PRESETS) == {"vgg11", "vgg13", "vgg16", "vgg19", "tiny"}
    net = VGG([4, "M", 6], in_channels=1, num_classes=3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 6)]
    assert net.head.in_features == 6 and net(torch.zeros(2, 1, 5, 5)).shape == (2, 3)


def test_torchvision_models_adapt_to_the_input():
    resnet: Any = torchvision_model("resnet18", num_classes=5, in_channels=1)
    assert resnet.conv1.in_channels == 1 and resnet.conv1.kernel_size == (7, 7) and resnet.fc.out_features == 5
    assert _n_params(torchvision_model("resnet18")) == pytest.approx(11.18e6, rel=0.01)
    small: Any = torchvision_model("resnet18", small_inputs=True)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    features = nn.Sequential(*list(small.children())[:-2])
    assert features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 4, 4)
    mobile: Any = torchvision_model("mobilenet_v2", num_classes=5, in_channels=1)
    assert mobile.features[0][0].in_channels == 1 and mobile.classifier[1].out_features == 5
    mobile_small: Any = torchvision_model("mobilenet_v2", small_inputs=True)
    assert mobile_small.features[0][0].stride == (1, 1)
    unchanged: Any = torchvision_model("mobilenet_v2")
    assert unchanged.features[0][0].in_channels == 3 and unchanged.features[0][0].stride == (2, 2)
    assert TORCHVISION_MODELS == ("resnet18", "mobilenet_v2")


def test_models_are_randomly_initialised_from_the_global_seed():
    torch.manual_seed(0)
    a = resnet20()
    torch.manual_seed(0)
    b = resnet20()
    torch.manual_seed(1)
    c = resnet20()
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: LeNet5(in_channels=0), r"`in_channels` must be a sequence of integers >= 1"),
        (lambda: LeNet5(num_classes=0), r"`num_classes` must be a sequence of integers >= 1"),
        (lambda: VGG("vgg8"), r"`cfg` must be one of \('vgg11', 'vgg13', 'vgg16', 'vgg19', 'tiny'\) .*got 'vgg8'"),
        (lambda: VGG([64, "X"]), r"`cfg` must be a preset name or a sequence of integers >= 1 .*got \[64, 'X'\]"),
        (lambda: VGG(["M"]), r"`cfg` must be .*with at least one conv"),
        (lambda: VGG([0, "M"]), r"`cfg` must be .*got \[0, 'M'\]"),
        (lambda: CifarResNet(depth=18), r"`depth` must be 6 n \+ 2 for an integer n >= 1 .*got 18"),
        (lambda: CifarResNet(depth=2), r"`depth` must be 6 n \+ 2 .*got 2"),
        (lambda: CifarResNet(width=0), r"`width` must be a sequence of integers >= 1"),
        (
            lambda: torchvision_model("resnet50"),  # type: ignore[arg-type]
            r"`name` must be one of \('resnet18', 'mobilenet_v2'\), got 'resnet50'",
        ),
        (lambda: torchvision_model("resnet18", in_channels=0), r"`in_channels` must be a sequence of integers >= 1"),
        (
            lambda: torchvision_model("resnet18", small_inputs="yes"),  # type: ignore[arg-type]
            r"`small_inputs` must be a bool, got 'yes'",
        ),
    ],
)
def test_model_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


# --- Hydra configs ---------------------------------------------------------------------------------------------

MODEL_OPTIONS = ["cnn", "lenet5", "mlp", "mobilenet_v2", "resnet18", "resnet20", "resnet56", "vgg"]
LANGUAGE_MODEL_OPTIONS = ["gpt_tiny"]
EXPERIMENTS = [
    "cifar10_mobilenet_v2",
    "cifar10_resnet18",
    "cifar10_resnet20",
    "cifar10_vgg",
    "digits_cnn",
    "digits_lottery",
    "digits_mlp",
    "digits_resnet20_channel",
    "mnist_lenet5",
]
LANGUAGE_EXPERIMENTS = ["pysource_gpt"]  # tested end to end in tests/app/test_language_job.py
# One grey-scale 8x8 and one colour 32x32 dataset; MNIST's 28x28 is covered by the experiments and test_datasets.
DATA_FOR_MODEL = {"digits": [], "cifar10": ["data.num_workers=0"]}


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    write_fake_mnist(root, num_train=20, num_test=10)
    write_fake_cifar10(root, num_train=20, num_test=10)
    return root


def _compose(overrides: list[str], root: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if "root" in cfg.data:
        cfg.data.root = str(root)
    return cfg


def test_config_options_are_the_tested_ones():
    assert sorted(p.stem for p in (CONF / "model").glob("*.yaml")) == sorted(MODEL_OPTIONS + LANGUAGE_MODEL_OPTIONS)
    assert sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")) == sorted(EXPERIMENTS + LANGUAGE_EXPERIMENTS)


@pytest.mark.parametrize("data", list(DATA_FOR_MODEL))
@pytest.mark.parametrize("model", MODEL_OPTIONS)
def test_model_configs_follow_the_data(model, data, fake_root):
    cfg = _compose([f"model={model}", f"data={data}", *DATA_FOR_MODEL[data]], fake_root)
    datamodule = instantiate(cfg.data)
    module = instantiate_module(cfg)
    assert isinstance(module, ImageClassifier)
    assert module.hparams["num_classes"] == cfg.model.num_classes == datamodule.num_classes
    datamodule.setup()
    x, _ = next(iter(datamodule.val_dataloader()))
    assert module.model(x[:2]).shape == (2, datamodule.num_classes)


def test_model_configs_follow_a_synthetic_shape(fake_root):
    overrides = ["data=synthetic", "data.input_shape=[3,12,12]", "data.num_classes=4", "model=resnet20"]
    net: Any = instantiate_module(_compose(overrides, fake_root)).model
    assert net.stem[0].in_channels == 3 and net.head.out_features == 4


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose_instantiate_and_take_a_step(experiment, fake_root, tmp_path):
    overrides = [f"experiment={experiment}", "data.batch_size=4"]
    cfg = _compose(overrides, fake_root)
    if "num_workers" in cfg.data:
        cfg.data.num_workers = 0
    assert cfg.pruning.start_epoch < cfg.pruning.end_epoch < cfg.trainer.max_epochs
    assert list(cfg.optimizer.lr_milestones) == [cfg.pruning.end_epoch]
    assert experiment.split("_")[0] in cfg.data._target_.lower()
    datamodule = instantiate(cfg.data)
    module = instantiate_module(cfg)
    trainer = L.Trainer(
        fast_dev_run=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("model", LANGUAGE_MODEL_OPTIONS)
def test_language_model_configs_follow_the_data_and_take_a_step(model, tmp_path):
    for i in range(30):
        (tmp_path / f"m{i}.py").write_text(f"def f(x):\n    return x + {i}\n" * 20)
    overrides = [
        "data=pysource",
        f"model={model}",
        "module=language",
        f"data.root={tmp_path}",
        "data.seq_len=64",
        "data.batch_size=4",
        "optimizer=adamw",
    ]
    cfg = _compose(overrides, tmp_path)
    assert cfg.model.config.vocab_size == cfg.data.vocab_size == 256
    assert cfg.model.config.max_position_embeddings == cfg.data.seq_len == 64
    datamodule = instantiate(cfg.data)
    module = instantiate_module(cfg)
    assert isinstance(module, LanguageModel) and isinstance(module.model, GPT)
    datamodule.setup()
    x, y = next(iter(datamodule.val_dataloader()))
    assert module(x).shape == (*y.shape, 256)
    trainer = L.Trainer(
        fast_dev_run=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
