"""The interface every datamodule here shares: argument checks, a seeded training order and the loaders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import lightning as L
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_prune._helpers import check_int, is_int, is_number
from lightning_prune.data.samplers import EpochShuffleSampler

__all__ = ["ClassificationDataModule"]

DatasetT = TypeVar("DatasetT", bound=Dataset)


def check_fraction(name: str, value: Any) -> float:
    """``value`` if it is a number in the open interval (0, 1), else a ``ValueError`` naming ``name``."""
    if not is_number(value) or not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be in the open interval (0, 1), got {value!r}.")
    return float(value)


def check_shape(name: str, value: Any) -> tuple[int, ...]:
    """``value`` as a tuple of integers ``>= 1`` (any sequence, e.g. an OmegaConf list), else a ``ValueError``."""
    shape = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if not shape or any(not is_int(v) or v < 1 for v in shape):
        raise ValueError(f"`{name}` must be a non-empty sequence of integers >= 1, e.g. [1, 28, 28], got {value!r}.")
    return shape


def check_declared(owner: str, name: str, value: Any, actual: Any) -> None:
    """Accept ``value`` if it is None or equals the dataset's fixed ``actual`` (compared as tuples for sequences).

    Fixed datasets take ``num_classes`` and ``input_shape`` only so that a config can declare them next to the
    datamodule, where model configs interpolate them; a value that disagrees with the data is a config mistake.
    """
    if value is None:
        return
    given = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
    if given != actual:
        shown = list(actual) if isinstance(actual, tuple) else actual
        raise ValueError(
            f"`{name}` must be {shown!r} for {owner} (fixed by the dataset), got {value!r}. It is accepted only "
            f"so that configs can declare it for models to interpolate: leave it out or set it to {shown!r}."
        )


class ClassificationDataModule(L.LightningDataModule, Generic[DatasetT]):
    """A LightningDataModule of ``(image, label)`` samples with train, validation and test sets.

    Subclasses fill :attr:`train_set`, :attr:`val_set` and :attr:`test_set` (of the dataset type they
    parametrise the class with) in ``setup()`` and set :attr:`num_classes` and :attr:`input_shape`. The
    training loader shuffles with an :class:`~lightning_prune.data.EpochShuffleSampler`, so each epoch's
    order is a function of ``seed`` and the epoch alone; the evaluation loaders keep the dataset order.

    Args:
        batch_size: Samples per batch, for every loader.
        seed: Seed of the train/validation split and of the training loader's shuffling.
        num_workers: Worker processes per loader (0 loads in the main process).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> dm = ClassificationDataModule[TensorDataset](batch_size=2)
        >>> dm.train_set = TensorDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
        >>> len(dm.train_dataloader())
        2
    """

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)
        if not is_int(seed):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.seed = seed
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.train_set: DatasetT | None = None
        self.val_set: DatasetT | None = None
        self.test_set: DatasetT | None = None

    def _loader(self, dataset: DatasetT | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call `setup()` before asking for a dataloader.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(dataset, seed=self.seed) if shuffle else None,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
