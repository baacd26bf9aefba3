import gzip
import pickle
import struct
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from _checks import CONF
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_prune.data import (
    CIFAR10DataModule,
    ClassificationDataModule,
    DatasetFilesNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    NormalizedImages,
    SyntheticDataModule,
    stratified_split,
)
from lightning_prune.data.cifar import CIFAR10_FILES
from lightning_prune.data.fakes import write_fake_cifar10, write_fake_mnist, write_idx
from lightning_prune.data.mnist import IDX_FILES
from lightning_prune.models import MLP, VGG, ImageClassifier, LeNet5

IDX_MODULES = [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")]
D = TypeVar("D", bound=Any)


def _sets(dm: ClassificationDataModule[D]) -> tuple[D, D, D]:
    assert dm.train_set is not None and dm.val_set is not None and dm.test_set is not None, "call setup() first"
    return dm.train_set, dm.val_set, dm.test_set


def _fit(
    datamodule: L.LightningDataModule, net: torch.nn.Module, tmp_path: Path, epochs: int = 1, lr: float = 0.01
) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(ImageClassifier(net, lr=lr), datamodule=datamodule)
    return trainer


# --- stratified_split -------------------------------------------------------------------------------------------


def test_stratified_split_sizes_and_proportions():
    labels = torch.arange(1000) % 4
    labels[:100] = 0  # unbalanced: class 0 is 325 of 1000
    train, val = stratified_split(labels, val_fraction=0.2, seed=0)
    assert len(val) == 200 and len(train) == 800
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(1000))
    for c in range(4):
        share = (labels == c).float().mean().item()
        assert abs((labels[val] == c).sum().item() - share * 200) <= 1


def test_stratified_split_is_a_function_of_the_seed_alone():
    labels = torch.arange(60) % 3
    torch.manual_seed(123)
    first = stratified_split(labels, 0.25, seed=5)
    torch.manual_seed(456)  # global state must not matter
    again = stratified_split(labels, 0.25, seed=5)
    other = stratified_split(labels, 0.25, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])


def test_stratified_split_on_tiny_sets_keeps_both_parts_non_empty():
    train, val = stratified_split(torch.tensor([0, 1, 2]), val_fraction=0.01, seed=0)
    assert len(val) == 1 and len(train) == 2
    train, val = stratified_split(torch.tensor([0, 1]), val_fraction=0.99, seed=0)
    assert len(val) == 1 and len(train) == 1


@pytest.mark.parametrize(
    ("labels", "fraction", "match"),
    [
        (torch.tensor([0, 1]), 1.0, r"`val_fraction` must be in the open interval \(0, 1\), got 1.0"),
        (torch.tensor([0]), 0.5, r"`labels` must be a 1-D integer tensor of at least 2 samples, got shape \(1,\)"),
        (torch.zeros(4), 0.5, r"`labels` must be a 1-D integer tensor .*dtype torch.float32"),
    ],
)
def test_stratified_split_bad_arguments(labels, fraction, match):
    with pytest.raises(ValueError, match=match):
        stratified_split(labels, fraction, seed=0)


# --- SyntheticDataModule -----------------------------------------------------------------------------------------


def test_synthetic_shapes_sizes_and_balance():
    dm = SyntheticDataModule(num_samples=200, num_test_samples=30, input_shape=(3, 4, 5), num_classes=4, batch_size=8)
    dm.setup()
    train, val, test = _sets(dm)
    assert (len(train), len(val), len(test)) == (160, 40, 30)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 4, 5) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.num_classes == 4 and dm.input_shape == (3, 4, 5)
    assert torch.bincount(val.tensors[1], minlength=4).tolist() == [10, 10, 10, 10]
    assert torch.bincount(test.tensors[1], minlength=4).tolist() == [8, 8, 7, 7]


def test_synthetic_data_follows_the_seed_not_global_state():
    def images(seed: int, global_seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):  # the global generator in another state for each call, restored
            torch.manual_seed(global_seed)
            dm = SyntheticDataModule(num_samples=50, num_test_samples=10, seed=seed)
            dm.setup()
            return _sets(dm)[0].tensors[0]

    # The same seed under different global states gives the same data; different seeds under the same global
    # state give different data: a module that drew from the global generator fails one of the two.
    assert torch.equal(images(0, global_seed=1), images(0, global_seed=2))
    assert not torch.equal(images(0, global_seed=3), images(1, global_seed=3))


def test_synthetic_noise_controls_the_difficulty():
    pool, test = SyntheticDataModule(num_samples=200, noise=0.0, input_shape=(2, 2, 2), num_classes=3).generate()
    images, labels = pool.tensors
    for c in range(3):  # without noise every sample is its class prototype
        assert torch.equal(images[labels == c], images[labels == c][:1].expand_as(images[labels == c]))
    assert torch.equal(test.tensors[0][test.tensors[1] == 0][0], images[labels == 0][0])


def test_synthetic_accepts_omegaconf_lists():
    cfg = {"_target_": "lightning_prune.data.SyntheticDataModule", "input_shape": [1, 6, 6], "num_classes": 3}
    dm = instantiate(cfg)
    assert dm.input_shape == (1, 6, 6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, r"`num_classes` must be an integer >= 2, got 1"),
        ({"num_samples": 1}, r"`num_samples` must be an integer >= 2, got 1"),
        ({"num_test_samples": 0}, r"`num_test_samples` must be an integer >= 1, got 0"),
        ({"input_shape": ()}, r"`input_shape` must be a non-empty sequence of integers >= 1, .*got \(\)"),
        ({"input_shape": (1, 0)}, r"`input_shape` must be .*got \(1, 0\)"),
        ({"input_shape": "1x8x8"}, r"`input_shape` must be .*got '1x8x8'"),
        ({"noise": -0.5}, r"`noise` must be a number >= 0, got -0.5"),
        ({"val_fraction": 0.0}, r"`val_fraction` must be in the open interval \(0, 1\), got 0.0"),
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
        ({"num_workers": -1}, r"`num_workers` must be an integer >= 0, got -1"),
        ({"seed": 1.5}, r"`seed` must be an integer, got 1.5"),
    ],
)
def test_synthetic_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticDataModule(**kwargs)


def test_fit_on_synthetic_data(tmp_path):
    L.seed_everything(0)
    dm = SyntheticDataModule(num_samples=400, num_test_samples=100, noise=0.5, batch_size=32)
    trainer = _fit(dm, MLP(hidden=(32,)), tmp_path, epochs=3, lr=0.05)
    assert trainer.callback_metrics["val/acc"] > 0.5  # chance is 0.1


# --- The files in their real formats ----------------------------------------------------------------------------


def test_idx_files_have_the_mnist_magic_numbers_and_big_endian_sizes(tmp_path):
    raw = write_fake_mnist(tmp_path, num_train=20, num_test=10)
    images = (raw / "train-images-idx3-ubyte").read_bytes()
    labels = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    assert struct.unpack(">IIII", images[:16]) == (2051, 20, 28, 28) and len(images) == 16 + 20 * 28 * 28
    assert struct.unpack(">II", labels[:8]) == (2049, 10) and len(labels) == 8 + 10
    assert max(labels[8:]) <= 9
    compressed = write_idx(tmp_path / "x.gz", torch.tensor([7], dtype=torch.uint8), compress=True)
    assert gzip.decompress(compressed.read_bytes()) == struct.pack(">II", 2049, 1) + b"\x07"


def test_idx_writer_rejects_other_dtypes(tmp_path):
    with pytest.raises(ValueError, match=r"`data` must be a uint8 tensor of 1 to 3 dimensions, got torch.int64"):
        write_idx(tmp_path / "x", torch.zeros(3, dtype=torch.long))


def test_cifar_batches_are_python2_style_pickles(tmp_path):
    folder = write_fake_cifar10(tmp_path, num_train=12, num_test=4)
    assert sorted(p.name for p in folder.iterdir()) == sorted(CIFAR10_FILES)
    with (folder / "data_batch_1").open("rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")  # the CIFAR-10 page's recipe
    with (folder / "data_batch_1").open("rb") as f:
        as_latin1 = pickle.load(f, encoding="latin1")  # torchvision's
    assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert as_bytes[b"data"].dtype == np.uint8 and as_bytes[b"data"].shape == (3, 3072)  # 12 dealt over 5
    assert isinstance(as_bytes[b"labels"], list) and len(as_bytes[b"labels"]) == 3
    assert np.array_equal(as_latin1["data"], as_bytes[b"data"])
    with (folder / "batches.meta").open("rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert meta["label_names"][0] == "airplane" and meta["num_vis"] == 3072
    with pytest.raises(ValueError, match=r"`num_train` must be an integer >= 5, got 4"):
        write_fake_cifar10(tmp_path, num_train=4)


# --- MNIST and Fashion-MNIST ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "folder"), IDX_MODULES)
def test_idx_datamodule_reads_the_files(cls, folder, tmp_path):
    write_fake_mnist(tmp_path, folder=folder, num_train=20, num_test=10)
    dm = cls(root=tmp_path, batch_size=4, val_fraction=0.2)
    dm.prepare_data()
    dm.setup()
    assert tuple(map(len, _sets(dm))) == (16, 4, 10)
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The test set is the t10k files in order, standardised with the dataset's constants.
    reference = getattr(torchvision.datasets, folder)(str(tmp_path), train=False)
    test_x, test_y = next(iter(dm.test_dataloader()))
    pixels = test_x * dm.std[0] + dm.mean[0]
    assert torch.allclose(pixels * 255, reference.data[:4].unsqueeze(1).float(), atol=1e-3)
    assert torch.equal(test_y, reference.targets[:4])


def test_mnist_unpacks_gzipped_files(tmp_path):
    raw = write_fake_mnist(tmp_path, num_train=12, num_test=6, compress=True)
    assert not (raw / IDX_FILES[0]).exists()
    dm = MNISTDataModule(root=tmp_path, val_fraction=0.25)
    dm.setup()
    assert tuple(map(len, _sets(dm))) == (9, 3, 6)
    assert all((raw / name).is_file() for name in IDX_FILES)


def test_mnist_split_follows_the_seed(tmp_path):
    write_fake_mnist(tmp_path, num_train=40, num_test=5)

    def val_images(seed: int) -> torch.Tensor:
        dm = MNISTDataModule(root=tmp_path, val_fraction=0.25, seed=seed)
        dm.setup()
        return _sets(dm)[1].images

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))


@pytest.mark.parametrize(("cls", "folder"), IDX_MODULES)
def test_idx_missing_files_error_names_each_file(cls, folder, tmp_path):
    dm = cls(root=tmp_path / "nowhere")
    with pytest.raises(DatasetFilesNotFoundError) as error:
        dm.setup()
    message = str(error.value)
    for name in IDX_FILES:
        assert f"{tmp_path / 'nowhere' / folder / 'raw' / name} (or {name}.gz)" in message
    assert "`download=True`" in message and "data.download=true" in message and "data.root" in message
    assert isinstance(error.value, FileNotFoundError)


def test_missing_files_error_lists_only_the_missing_ones(tmp_path):
    raw = write_fake_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"Missing: \S+/MNIST/raw/t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\)\. "
    ):
        MNISTDataModule(root=tmp_path).prepare_data()


def test_download_is_opt_in(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(MNISTDataModule, "download_files", lambda self: calls.append(write_fake_mnist(self.root)))
    with pytest.raises(DatasetFilesNotFoundError):
        MNISTDataModule(root=tmp_path).prepare_data()
    assert calls == []
    dm = MNISTDataModule(root=tmp_path, download=True)
    dm.prepare_data()
    dm.setup()
    assert len(calls) == 1 and len(_sets(dm)[2]) == 10


def test_fit_on_tiny_mnist(tmp_path):
    L.seed_everything(0)
    write_fake_mnist(tmp_path, num_train=40, num_test=10)
    trainer = _fit(MNISTDataModule(root=tmp_path, batch_size=8), LeNet5(in_channels=1), tmp_path)
    assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)


def test_fit_on_tiny_fashion_mnist(tmp_path):
    L.seed_everything(0)
    write_fake_mnist(tmp_path, folder="FashionMNIST", num_train=40, num_test=10)
    trainer = _fit(FashionMNISTDataModule(root=tmp_path, batch_size=8), LeNet5(in_channels=1), tmp_path)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


# --- CIFAR-10 ---------------------------------------------------------------------------------------------------


def test_cifar10_reads_the_batches(tmp_path):
    folder = write_fake_cifar10(tmp_path, num_train=50, num_test=10)
    dm = CIFAR10DataModule(root=tmp_path, batch_size=5, val_fraction=0.2)
    dm.setup()
    assert tuple(map(len, _sets(dm))) == (40, 10, 10)
    test_set = _sets(dm)[2]
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    with (folder / "test_batch").open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    # Each row holds the red, green and blue 32x32 planes in turn: channel c is row[1024 c : 1024 (c + 1)].
    first = torch.from_numpy(batch[b"data"][0])
    assert torch.equal(test_set.images[0].flatten(), first)
    assert test_set.labels.tolist() == batch[b"labels"]
    image, _ = test_set[0]
    expected = (first.view(3, 32, 32).float() / 255 - torch.tensor(dm.mean).view(3, 1, 1)) / torch.tensor(dm.std).view(
        3, 1, 1
    )
    assert torch.allclose(image, expected)


def test_cifar10_md5_checks_are_presence_checks(tmp_path):
    write_fake_cifar10(tmp_path)
    with pytest.raises(RuntimeError, match="corrupted"):  # torchvision's own class rejects any other copy
        torchvision.datasets.CIFAR10(str(tmp_path), train=True)
    dm = CIFAR10DataModule(root=tmp_path)
    dm.setup()
    assert sum(map(len, _sets(dm))) == 50 + 10


def test_cifar10_augmentation_is_for_training_images_only(tmp_path):
    write_fake_cifar10(tmp_path)
    plain = CIFAR10DataModule(root=tmp_path)
    plain.setup()
    plain_sets = _sets(plain)
    assert plain_sets[0].transform is None
    augmented = CIFAR10DataModule(root=tmp_path, augment=True)
    augmented.setup()
    train, val, test = _sets(augmented)
    assert train.transform is not None and val.transform is None and test.transform is None
    torch.manual_seed(0)
    views = torch.stack([train[0][0] for _ in range(8)])
    assert views.shape == (8, 3, 32, 32)
    assert not all(torch.equal(views[0], view) for view in views[1:])  # random crops and flips differ
    assert torch.equal(val[0][0], plain_sets[1][0][0])


def test_cifar10_missing_files_error_names_each_file(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    (folder / "batches.meta").unlink()
    with pytest.raises(DatasetFilesNotFoundError) as error:
        CIFAR10DataModule(root=tmp_path).setup()
    message = str(error.value)
    assert f"Missing: {folder / 'data_batch_3'}, {folder / 'batches.meta'}." in message
    assert "data_batch_1" not in message and "cifar-10-batches-py/` layout" in message


def test_fit_on_tiny_cifar10(tmp_path):
    L.seed_everything(0)
    write_fake_cifar10(tmp_path, num_train=40, num_test=10)
    dm = CIFAR10DataModule(root=tmp_path, batch_size=8, augment=True)
    trainer = _fit(dm, VGG("tiny", in_channels=3), tmp_path)
    assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)


# --- Arguments shared by the file-backed datamodules --------------------------------------------------------------


@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule, CIFAR10DataModule])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"root": ""}, r"`root` must be a non-empty path, got ''"),
        ({"root": None}, r"`root` must be a non-empty path, got None"),
        ({"download": "yes"}, r"`download` must be a bool, got 'yes'"),
        ({"val_fraction": 1.0}, r"`val_fraction` must be in the open interval \(0, 1\), got 1.0"),
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
        ({"num_classes": 100}, r"`num_classes` must be 10 for \w+DataModule \(fixed by the dataset\), got 100"),
        ({"input_shape": [1, 32, 32, 1]}, r"`input_shape` must be \[\d, \d\d, \d\d\] for \w+DataModule"),
    ],
)
def test_vision_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_declared_shape_must_match_the_dataset():
    assert MNISTDataModule(num_classes=10, input_shape=[1, 28, 28]).input_shape == (1, 28, 28)
    with pytest.raises(ValueError, match=r"`input_shape` must be \[3, 32, 32\] for CIFAR10DataModule .*\[1, 28, 28\]"):
        CIFAR10DataModule(input_shape=[1, 28, 28])
    with pytest.raises(ValueError, match=r"leave it out or set it to \[1, 8, 8\]"):
        DigitsDataModule(input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match=r"`augment` must be a bool, got 1"):
        CIFAR10DataModule(augment=1)  # type: ignore[arg-type]


def test_normalized_images_bad_arguments():
    images, labels = torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`images` must be a uint8 tensor of shape \(N, C, H, W\), got torch.float32"):
        NormalizedImages(images.float(), labels, [0.0], [1.0])
    with pytest.raises(ValueError, match=r"`labels` must have shape \(2,\), got \(3,\)"):
        NormalizedImages(images, torch.zeros(3), [0.0], [1.0])
    with pytest.raises(ValueError, match=r"`mean` and `std` must have one value per channel \(1\)"):
        NormalizedImages(images, labels, [0.0, 0.0], [1.0])


def test_loaders_need_setup():
    with pytest.raises(RuntimeError, match=r"SyntheticDataModule: call `setup\(\)` before asking for a dataloader"):
        SyntheticDataModule().train_dataloader()


# --- Hydra configs ---------------------------------------------------------------------------------------------

DATA_OPTIONS = ["digits", "synthetic", "mnist", "fashion_mnist", "cifar10"]
TEXT_DATA_OPTIONS = ["pysource"]  # tested in test_pysource.py


def _fake_root(root: Path) -> Path:
    write_fake_mnist(root, folder="MNIST")
    write_fake_mnist(root, folder="FashionMNIST")
    write_fake_cifar10(root)
    return root


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    return _fake_root(tmp_path_factory.mktemp("datasets"))


@pytest.mark.parametrize("option", DATA_OPTIONS)
def test_data_configs_compose_and_instantiate(option, fake_root):
    assert sorted(p.stem for p in (CONF / "data").glob("*.yaml")) == sorted(DATA_OPTIONS + TEXT_DATA_OPTIONS)
    file_backed = option not in ("digits", "synthetic")
    overrides = [f"data={option}"] + ([f"data.root={fake_root}", "data.num_workers=0"] if file_backed else [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dm = instantiate(cfg.data)
    assert dm.num_classes == cfg.data.num_classes
    assert dm.input_shape == tuple(cfg.data.input_shape)
    assert dm.batch_size == cfg.data.batch_size and dm.seed == cfg.seed
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == dm.input_shape and int(y.max()) < dm.num_classes


def test_file_backed_configs_default_to_the_environment_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LP_DATA_ROOT", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=cifar10"])
    assert cfg.data.root == str(tmp_path) and cfg.data.download is False
    with pytest.raises(DatasetFilesNotFoundError, match=str(tmp_path / "cifar-10-batches-py" / "data_batch_1")):
        instantiate(cfg.data).prepare_data()
