"""Random class-conditional images generated from a seed: fast data for smoke tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_prune._helpers import check_int, is_number
from lightning_prune.data.base import ClassificationDataModule, check_fraction, check_shape
from lightning_prune.data.splits import stratified_split

__all__ = ["SyntheticDataModule"]


class SyntheticDataModule(ClassificationDataModule[TensorDataset]):
    """Gaussian class prototypes plus Gaussian noise, drawn from ``seed`` with a ``torch.Generator``.

    Each class ``c`` has a prototype image ``p_c`` with standard-normal pixels; a sample of class ``c`` is
    ``p_c + noise * z`` with standard-normal ``z``. Labels cycle through the classes, so every class has
    ``num_samples // num_classes`` samples or one more. ``num_samples`` training samples are split,
    stratified by label, into training and validation sets; ``num_test_samples`` more, from the same
    prototypes, form the test set. The data depends only on the arguments, never on global random state.

    Args:
        num_samples: Samples in the training set, before the validation split.
        num_test_samples: Samples in the test set.
        input_shape: Shape of one image, e.g. ``(3, 32, 32)``.
        num_classes: Number of classes (at least 2).
        noise: Standard deviation of the noise around the prototypes; larger is harder.
        val_fraction: Fraction of the training samples held out for validation.
        batch_size: Samples per batch, for every loader.
        seed: Seed of the data, of the split and of the training loader's shuffling.
        num_workers: Worker processes per loader (0 loads in the main process).

    Example:
        >>> dm = SyntheticDataModule(num_samples=100, input_shape=(3, 8, 8), num_classes=4, batch_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), x.dtype, y.dtype, len(dm.val_set)
        ((16, 3, 8, 8), torch.float32, torch.int64, 20)
    """

    def __init__(
        self,
        num_samples: int = 2048,
        num_test_samples: int = 512,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        noise: float = 1.0,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.num_samples = check_int("num_samples", num_samples, 2)
        self.num_test_samples = check_int("num_test_samples", num_test_samples, 1)
        self.input_shape = check_shape("input_shape", input_shape)
        if not is_number(noise) or noise < 0:
            raise ValueError(f"`noise` must be a number >= 0, got {noise!r}.")
        self.noise = float(noise)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.save_hyperparameters()

    def generate(self) -> tuple[TensorDataset, TensorDataset]:
        """The training pool (``num_samples``) and the test set (``num_test_samples``), freshly generated.

        Returns:
            Two ``TensorDataset`` of ``float32`` images of shape ``input_shape`` and ``int64`` labels.
        """
        generator = torch.Generator().manual_seed(self.seed)
        prototypes = torch.randn(self.num_classes, *self.input_shape, generator=generator)

        def draw(n: int) -> TensorDataset:
            labels = torch.arange(n) % self.num_classes
            labels = labels[torch.randperm(n, generator=generator)]
            noise = torch.randn(n, *self.input_shape, generator=generator)
            return TensorDataset(prototypes[labels] + self.noise * noise, labels)

        pool = draw(self.num_samples)
        return pool, draw(self.num_test_samples)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pool, test = self.generate()
        images, labels = pool.tensors
        train, val = stratified_split(labels, self.val_fraction, self.seed)
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = test
