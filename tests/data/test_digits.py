from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_prune.data import DigitsDataModule


def _labels(dataset) -> np.ndarray:
    return dataset.tensors[1].numpy()


def test_split_sizes_shapes_and_dtypes():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797
    assert sizes[2] == pytest.approx(0.2 * 1797, abs=1)
    assert sizes[1] == pytest.approx(0.15 * 1797, abs=1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, *dm.input_shape) == (32, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.num_classes == 10
    images = dm.train_set.tensors[0]
    assert images.min() == 0.0 and images.max() == 1.0


def test_split_is_disjoint_and_determined_by_seed():
    train, val, test = DigitsDataModule(seed=3).split_indices()
    assert len(np.intersect1d(train, val)) == len(np.intersect1d(train, test)) == 0
    assert len(np.intersect1d(val, test)) == 0
    assert len(train) + len(val) + len(test) == 1797
    again = DigitsDataModule(seed=3).split_indices()
    other = DigitsDataModule(seed=4).split_indices()
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not np.array_equal(test, other[2])


def test_split_is_stratified():
    dm = DigitsDataModule(seed=1)
    dm.setup()
    overall = np.bincount(load_digits().target, minlength=10) / 1797
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        frequencies = np.bincount(_labels(dataset), minlength=10) / len(dataset)
        # Stratification keeps every class within one sample of its overall share.
        assert np.all(np.abs(frequencies - overall) <= 1.0 / len(dataset) + 1e-9)


def test_train_loader_shuffles_reproducibly_without_global_seed():
    def first_labels(seed: int, global_seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):  # the global generator in another state for each call, restored
            torch.manual_seed(global_seed)
            dm = DigitsDataModule(seed=seed)
            dm.setup()
            return next(iter(dm.train_dataloader()))[1]

    # Same seed, different global states: the same order; different seeds, same global state: another order.
    assert torch.equal(first_labels(0, global_seed=1), first_labels(0, global_seed=2))
    assert not torch.equal(first_labels(0, global_seed=3), first_labels(1, global_seed=3))
    dm = DigitsDataModule(seed=0)
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)  # Lightning calls this at the start of every epoch
    epoch1 = next(iter(loader))[1]
    loader.sampler.set_epoch(2)
    epoch2 = next(iter(loader))[1]
    assert not torch.equal(epoch1, epoch2)  # each epoch reshuffles
    loader.sampler.set_epoch(1)
    assert torch.equal(next(iter(loader))[1], epoch1)  # a resumed run replays the same order
    val_labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert torch.equal(val_labels, dm.val_set.tensors[1])  # evaluation loaders keep the order


def test_standardize_uses_train_statistics():
    dm = DigitsDataModule(standardize=True)
    dm.setup()
    train_images = dm.train_set.tensors[0]
    assert train_images.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train_images.std().item() == pytest.approx(1.0, abs=1e-4)
    assert 0.0 < dm.mean < 1.0 and dm.std > 0.0
    assert dm.test_set.tensors[0].mean().item() != pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
        ({"val_fraction": 0.0}, r"`val_fraction` must be in the open interval \(0, 1\), got 0.0"),
        ({"test_fraction": 1.0}, r"`test_fraction` must be in the open interval \(0, 1\), got 1.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"`val_fraction` \+ `test_fraction` must be < 1"),
        ({"num_workers": -1}, r"`num_workers` must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_loader_before_setup_fails():
    with pytest.raises(RuntimeError, match=r"call `setup\(\)`"):
        DigitsDataModule().train_dataloader()


def test_default_images_are_the_originals():
    dm = DigitsDataModule()
    dm.setup()
    images = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0], dm.test_set.tensors[0]])
    originals = torch.from_numpy(load_digits().data / 16.0).float().reshape(-1, 1, 8, 8)
    indices = torch.from_numpy(np.concatenate(dm.split_indices()))
    assert torch.equal(images, originals[indices])


def test_image_size_and_channels_resize_and_repeat():
    dm = DigitsDataModule(batch_size=16, image_size=32, channels=3)
    assert dm.input_shape == (3, 32, 32)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # repeated, not three images
    images = dm.train_set.tensors[0]
    assert images.min() >= 0.0 and images.max() <= 1.0  # bilinear: weighted means of the [0, 1] pixels
    # Same samples in the same split as the 8x8 originals: averaging each 4x4 block gives them back, blurred.
    small = DigitsDataModule()
    small.setup()
    assert torch.equal(dm.train_set.tensors[1], small.train_set.tensors[1])
    pooled = torch.nn.functional.avg_pool2d(images[:, :1], 4).flatten(1)
    originals = small.train_set.tensors[0].flatten(1)
    assert (pooled - originals).abs().mean() < 0.1
    assert torch.corrcoef(torch.stack([pooled.flatten(), originals.flatten()]))[0, 1] > 0.95


def test_shrinking_is_antialiased_and_keeps_the_range():
    dm = DigitsDataModule(image_size=4)
    dm.setup()
    images = dm.test_set.tensors[0]
    assert images.shape[1:] == (1, 4, 4)
    original = DigitsDataModule()
    original.setup()
    # Antialiasing averages every source pixel, so the mean brightness survives the shrink.
    assert images.mean().item() == pytest.approx(original.test_set.tensors[0].mean().item(), abs=0.01)
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_standardize_after_resizing():
    dm = DigitsDataModule(image_size=16, channels=2, standardize=True)
    dm.setup()
    train_images = dm.train_set.tensors[0]
    assert train_images.shape[1:] == (2, 16, 16)
    assert train_images.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train_images.std().item() == pytest.approx(1.0, abs=1e-4)


def test_declared_input_shape_must_follow_image_size_and_channels():
    assert DigitsDataModule(image_size=32, input_shape=[1, 32, 32]).input_shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"`input_shape` must be \[1, 32, 32\] for DigitsDataModule with channels=1 "):
        DigitsDataModule(image_size=32, input_shape=[1, 8, 8])
    with pytest.raises(ValueError, match=r"`input_shape` must be \[1, 8, 8\] for DigitsDataModule"):
        DigitsDataModule(input_shape=[3, 8, 8])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, r"`image_size` must be an integer >= 1, got 0"),
        ({"image_size": 32.0}, r"`image_size` must be an integer >= 1, got 32.0"),
        ({"channels": 0}, r"`channels` must be an integer >= 1, got 0"),
        ({"channels": True}, r"`channels` must be an integer >= 1, got True"),
    ],
)
def test_bad_image_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_datamodules_record_resolved_num_classes_so_loggers_can_merge_hparams(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_prune.data import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule
    from lightning_prune.models import ImageClassifier, SmallCNN

    for datamodule in (MNISTDataModule(root=tmp_path), FashionMNISTDataModule(root=tmp_path)):
        assert datamodule.hparams_initial["num_classes"] == 10
        assert datamodule.hparams_initial["input_shape"] == [1, 28, 28]
    assert CIFAR10DataModule(root=tmp_path).hparams_initial["input_shape"] == [3, 32, 32]
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ImageClassifier(SmallCNN()), DigitsDataModule())  # raised "Error while merging hparams" before
    assert "num_classes: 10" in (Path(trainer.logger.log_dir) / "hparams.yaml").read_text()
