"""A LightningDataModule on scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_prune.data.base import ClassificationDataModule, check_declared, check_fraction

__all__ = ["DigitsDataModule"]

_MAX_PIXEL = 16.0  # `load_digits` pixels are integers in [0, 16].


class DigitsDataModule(ClassificationDataModule[TensorDataset]):
    """The 1,797 8x8 digits of UCI ML (``sklearn.datasets.load_digits``) as a LightningDataModule.

    The split into train, validation and test sets is stratified by label and fixed by ``seed``. Pixels
    are scaled to ``[0, 1]`` and, with ``standardize=True``, shifted and scaled with the mean and standard
    deviation of the training pixels. Images are ``float32`` tensors of shape ``(1, 8, 8)`` and labels
    ``int64``. The training loader shuffles with an :class:`EpochShuffleSampler`: each epoch's order is a
    function of ``seed`` and the epoch alone, so it ignores global random state and a run resumed from a
    checkpoint sees the same batches as one that never stopped.

    Args:
        batch_size: Samples per batch, for every loader.
        val_fraction: Fraction of all samples held out for validation.
        test_fraction: Fraction of all samples held out for testing.
        seed: Seed of the split and of the training loader's shuffling.
        num_workers: Worker processes per loader (0 loads in the main process).
        standardize: Standardise pixels with the training set's mean and standard deviation.
        num_classes: Optional; must be 10. Lets a config declare it for models to interpolate.
        input_shape: Optional; must be ``(1, 8, 8)``. Lets a config declare it for models to interpolate.

    Example:
        >>> dm = DigitsDataModule(batch_size=32, seed=0)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), x.dtype, y.dtype
        ((32, 1, 8, 8), torch.float32, torch.int64)
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
        check_declared("DigitsDataModule", "num_classes", num_classes, type(self).num_classes)
        check_declared("DigitsDataModule", "input_shape", input_shape, type(self).input_shape)
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
        digits = load_digits()
        images = torch.from_numpy(digits.data / _MAX_PIXEL).float().reshape(-1, *self.input_shape)
        labels = torch.from_numpy(digits.target).long()
        train, val, test = (torch.from_numpy(i) for i in self.split_indices())
        if self.standardize:
            self.mean = images[train].mean().item()
            self.std = images[train].std().item()
            images = (images - self.mean) / self.std
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])
