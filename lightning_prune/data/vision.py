"""The shared machinery of the torchvision-backed datamodules: file checks, normalised images and the split."""

from __future__ import annotations

import importlib
import os
from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import torch
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_prune.data.base import ClassificationDataModule, check_declared, check_fraction
from lightning_prune.data.splits import stratified_split

__all__ = ["DatasetFilesNotFoundError", "NormalizedImages", "VisionDataModule", "require_torchvision"]

Transform = Callable[[torch.Tensor], torch.Tensor]


class DatasetFilesNotFoundError(FileNotFoundError):
    """The files of a dataset are not under the datamodule's ``root`` and downloading is off."""


def require_torchvision(module: str = "torchvision") -> ModuleType:
    """The torchvision module ``module`` (e.g. ``"torchvision.datasets"``), or an ``ImportError`` saying how to
    install torchvision."""
    try:
        return importlib.import_module(module)
    except ImportError as error:  # pragma: no cover - torchvision is installed in the test environment
        raise ImportError(
            "The MNIST, Fashion-MNIST and CIFAR-10 datamodules need torchvision: "
            "`pip install 'lightning-prune[vision]'`."
        ) from error


class NormalizedImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``uint8`` images held in memory, optionally transformed, then scaled to [0, 1] and standardised.

    Keeping the whole set as one ``uint8`` tensor costs a quarter of the memory of ``float32`` and skips
    the PIL round trip of torchvision's ``__getitem__``.

    Args:
        images: ``uint8`` tensor of shape ``(N, C, H, W)``.
        labels: ``int64`` tensor of shape ``(N,)``.
        mean: Per-channel mean of the [0, 1]-scaled pixels.
        std: Per-channel standard deviation of the [0, 1]-scaled pixels.
        transform: Applied to each ``uint8`` ``(C, H, W)`` image before scaling, e.g. random crops.

    Example:
        >>> images = torch.full((2, 1, 2, 2), 255, dtype=torch.uint8)
        >>> data = NormalizedImages(images, torch.tensor([0, 1]), mean=[0.5], std=[0.5])
        >>> data[1][0].flatten().tolist(), int(data[1][1])
        ([1.0, 1.0, 1.0, 1.0], 1)
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        transform: Transform | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"`images` must be a uint8 tensor of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}."
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"`labels` must have shape ({len(images)},), got {tuple(labels.shape)}.")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(
                f"`mean` and `std` must have one value per channel ({images.shape[1]}), got {mean!r} and {std!r}."
            )
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return (image.float() / 255.0 - self.mean) / self.std, self.labels[index]


class VisionDataModule(ClassificationDataModule[NormalizedImages]):
    """Base of the datamodules that read a torchvision dataset's files from ``root``.

    ``prepare_data()`` downloads the files when ``download=True``; ``setup()`` checks that they are there
    (raising :class:`DatasetFilesNotFoundError`, which names each missing file, before torchvision is asked),
    parses them with the torchvision class, splits the official training set into training and validation
    sets (stratified by label, fixed by ``seed``) and takes the official test set as the test set. Images are
    standardised with the dataset's usual per-channel constants (:attr:`mean`, :attr:`std`).

    Subclasses set the class attributes and implement :meth:`expected_files`, :meth:`download_files` and
    :meth:`load`.

    Args:
        root: Folder holding the dataset's files (see :meth:`expected_files`).
        download: Download missing files in ``prepare_data()``; needs internet access.
        batch_size: Samples per batch, for every loader.
        val_fraction: Fraction of the official training set held out for validation.
        seed: Seed of the split and of the training loader's shuffling.
        num_workers: Worker processes per loader (0 loads in the main process).
        num_classes: Optional; must equal the dataset's. Lets a config declare it for models to interpolate.
        input_shape: Optional; must equal the dataset's. Lets a config declare it for models to interpolate.
    """

    num_classes: int = 10
    input_shape: tuple[int, ...]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    #: The folder under ``root`` that :meth:`expected_files` lists, for messages.
    folder: ClassVar[str]

    def __init__(
        self,
        root: str | os.PathLike[str] = "data",
        download: bool = False,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ValueError(f"`root` must be a non-empty path, got {root!r}.")
        if not isinstance(download, bool):
            raise ValueError(f"`download` must be a bool, got {download!r}.")
        owner = type(self).__name__
        check_declared(owner, "num_classes", num_classes, type(self).num_classes)
        check_declared(owner, "input_shape", input_shape, type(self).input_shape)
        self.root = Path(root).expanduser()
        self.download = download
        self.val_fraction = check_fraction("val_fraction", val_fraction)

    @abstractmethod
    def expected_files(self) -> list[tuple[Path, ...]]:
        """The files the dataset needs: for each, the paths any one of which will do (the first is preferred)."""

    @abstractmethod
    def download_files(self) -> None:
        """Fetch the dataset's files into :attr:`root` (called only when ``download=True``)."""

    @abstractmethod
    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The official training (``train=True``) or test split as ``uint8`` images ``(N, C, H, W)`` and labels."""

    def train_transform(self) -> Transform | None:
        """The augmentation applied to training images (``uint8`` tensors); None for none."""
        return None

    def missing_files(self) -> list[str]:
        """Descriptions of the expected files of which no version is present, e.g. ``'<root>/x (or x.gz)'``."""
        missing = []
        for options in self.expected_files():
            if not any(path.is_file() for path in options):
                alternatives = "".join(f" (or {path.name})" for path in options[1:])
                missing.append(f"{options[0]}{alternatives}")
        return missing

    def check_files(self) -> None:
        """Raise :class:`DatasetFilesNotFoundError` naming every missing file and how to get it.

        Raises:
            DatasetFilesNotFoundError: If any expected file is absent.
        """
        missing = self.missing_files()
        if not missing:
            return
        raise DatasetFilesNotFoundError(
            f"{type(self).__name__}: dataset files not found under `root`={str(self.root)!r} (resolved: "
            f"{self.root.resolve()}). Missing: {', '.join(missing)}. To fetch them, run once with `download=True` "
            f"(config: `data.download=true`) on a machine with internet access, or copy the files there "
            f"(keeping the `{self.folder}/` layout). `root` is `data.root` in the config, by default the "
            f"LP_DATA_ROOT environment variable or ./data."
        )

    @override
    def prepare_data(self) -> None:
        if self.download:
            self.download_files()
        self.check_files()

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.check_files()
        images, labels = self.load(train=True)
        train, val = stratified_split(labels, self.val_fraction, self.seed)
        self.train_set = NormalizedImages(images[train], labels[train], self.mean, self.std, self.train_transform())
        self.val_set = NormalizedImages(images[val], labels[val], self.mean, self.std)
        self.test_set = NormalizedImages(*self.load(train=False), self.mean, self.std)
