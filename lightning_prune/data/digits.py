"""A LightningDataModule on scikit-learn's bundled 8x8 handwritten digits (no download), optionally resized."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_prune._helpers import check_int
from lightning_prune.data.base import ClassificationDataModule, check_declared, check_fraction

__all__ = ["DigitsDataModule"]

_MAX_PIXEL = 16.0  # `load_digits` pixels are integers in [0, 16].
_SIDE = 8  # `load_digits` images are 8x8.


def _sklearn() -> tuple[Any, Any]:
    """scikit-learn's ``load_digits`` and ``train_test_split``, or an ``ImportError`` saying how to install it."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # pragma: no cover - scikit-learn is installed in the test environment
        raise ImportError(
            "The digits datamodule reads scikit-learn's bundled digits: `pip install 'lightning-prune[digits]'`."
        ) from error
    return load_digits, train_test_split


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a batch ``(N, C, H, W)`` to ``(N, C, size, size)``: bilinear, antialiased when shrinking.

    Pixels stay within the range of the input's (every output pixel is a weighted mean of input pixels); a
    batch already of that size is returned as it is.

    Example:
        >>> resize_images(torch.ones(2, 1, 8, 8), 32).shape
        torch.Size([2, 1, 32, 32])
    """
    if images.shape[-2:] == (size, size):
        return images
    shrink = size < min(images.shape[-2:])
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


class DigitsDataModule(ClassificationDataModule[TensorDataset]):
    """The 1,797 8x8 digits of UCI ML (``sklearn.datasets.load_digits``) as a LightningDataModule.

    The split into train, validation and test sets is stratified by label and fixed by ``seed``. Pixels
    are scaled to ``[0, 1]``, resized to ``image_size x image_size`` (bilinear, antialiased when shrinking;
    8 keeps the originals), repeated over ``channels`` identical channels and, with ``standardize=True``,
    shifted and scaled with the mean and standard deviation of the training pixels. Images are ``float32``
    tensors of shape ``(channels, image_size, image_size)``, ``(1, 8, 8)`` by default, and labels ``int64``.
    ``image_size=32`` feeds networks built for 32x32 inputs such as the CIFAR ResNets (``channels=3`` for
    ones that expect RGB). The training loader shuffles with an :class:`EpochShuffleSampler`: each epoch's order is a
    function of ``seed`` and the epoch alone, so it ignores global random state and a run resumed from a
    checkpoint sees the same batches as one that never stopped.

    Args:
        batch_size: Samples per batch, for every loader.
        val_fraction: Fraction of all samples held out for validation.
        test_fraction: Fraction of all samples held out for testing.
        seed: Seed of the split and of the training loader's shuffling.
        num_workers: Worker processes per loader (0 loads in the main process).
        standardize: Standardise pixels with the training set's mean and standard deviation.
        image_size: Side of the square images, in pixels (at least 1; 8 is the original size).
        channels: Number of identical channels each image is repeated over (at least 1).
        num_classes: Optional; must be 10. Lets a config declare it for models to interpolate.
        input_shape: Optional; must be ``(channels, image_size, image_size)``. Lets a config declare it for
            models to interpolate.

    Example:
        >>> dm = DigitsDataModule(batch_size=32, seed=0)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), x.dtype, y.dtype
        ((32, 1, 8, 8), torch.float32, torch.int64)
        >>> DigitsDataModule(image_size=32, channels=3).input_shape
        (3, 32, 32)
    """

    num_classes: int = 10
    input_shape: tuple[int, ...] = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        standardize: bool = False,
        image_size: int = 8,
        channels: int = 1,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        val_fraction = check_fraction("val_fraction", val_fraction)
        test_fraction = check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must be < 1 to leave training data, got "
                f"{val_fraction!r} + {test_fraction!r} = {val_fraction + test_fraction!r}."
            )
        self.image_size = check_int("image_size", image_size, 1)
        self.channels = check_int("channels", channels, 1)
        self.input_shape = (self.channels, self.image_size, self.image_size)
        check_declared("DigitsDataModule", "num_classes", num_classes, type(self).num_classes)
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            raise ValueError(
                f"`input_shape` must be {list(self.input_shape)} for DigitsDataModule with channels={channels} and "
                f"image_size={image_size}, got {input_shape!r}. It is accepted only so that configs can declare it "
                f"for models to interpolate: leave it out or set it to {list(self.input_shape)} (`channels` and "
                "`image_size` set the shape)."
            )
        # Record the resolved values, not a declared None: loggers merge them with the model's hparams.
        num_classes, input_shape = self.num_classes, list(self.input_shape)
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.standardize = standardize
        self.mean = 0.0
        self.std = 1.0

    def split_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices into ``load_digits()`` of the train, validation and test samples.

        Returns:
            Three disjoint, sorted index arrays covering every sample.
        """
        load_digits, train_test_split = _sklearn()
        labels = load_digits().target
        indices = np.arange(len(labels))
        rest, test = train_test_split(indices, test_size=self.test_fraction, stratify=labels, random_state=self.seed)
        train, val = train_test_split(
            rest,
            test_size=self.val_fraction / (1.0 - self.test_fraction),
            stratify=labels[rest],
            random_state=self.seed,
        )
        return np.sort(train), np.sort(val), np.sort(test)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        load_digits, _ = _sklearn()
        digits = load_digits()
        images = torch.from_numpy(digits.data / _MAX_PIXEL).float().reshape(-1, 1, _SIDE, _SIDE)
        images = resize_images(images, self.image_size).expand(-1, self.channels, -1, -1).contiguous()
        labels = torch.from_numpy(digits.target).long()
        train, val, test = (torch.from_numpy(i) for i in self.split_indices())
        if self.standardize:
            self.mean = images[train].mean().item()
            self.std = images[train].std().item()
            images = (images - self.mean) / self.std
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])
