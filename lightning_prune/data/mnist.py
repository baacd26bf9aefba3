"""MNIST and Fashion-MNIST (28x28 grey-scale, 10 classes) from their idx files, through torchvision."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from typing_extensions import override

from lightning_prune.data.vision import VisionDataModule, require_torchvision

__all__ = ["IDX_FILES", "FashionMNISTDataModule", "MNISTDataModule"]

#: The four idx files of MNIST and Fashion-MNIST, as torchvision reads them (uncompressed) from ``<root>/<Name>/raw``.
IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _gunzip(source: Path, target: Path) -> None:
    # Through a temporary file in the same folder, so a concurrent reader never sees half a file.
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp, gzip.open(source, "rb") as compressed:
        shutil.copyfileobj(compressed, tmp)
    os.replace(tmp.name, target)


class _IdxDataModule(VisionDataModule):
    """A dataset in MNIST's layout: ``<root>/<folder>/raw/`` holds :data:`IDX_FILES`, plain or gzipped."""

    input_shape: tuple[int, ...] = (1, 28, 28)

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
        super().__init__(
            root=root,
            download=download,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            num_classes=num_classes,
            input_shape=input_shape,
        )
        # Record the resolved values, not a declared None: loggers merge them with the model's hparams.
        num_classes, input_shape = self.num_classes, list(self.input_shape)
        self.save_hyperparameters()

    @property
    def raw_folder(self) -> Path:
        """``<root>/<folder>/raw``, where torchvision looks for the idx files."""
        return self.root / self.folder / "raw"

    @override
    def expected_files(self) -> list[tuple[Path, ...]]:
        return [(self.raw_folder / name, self.raw_folder / f"{name}.gz") for name in IDX_FILES]

    @override
    def check_files(self) -> None:
        # torchvision reads the idx files uncompressed; unpack any that are present only as .gz.
        for plain, compressed in self.expected_files():
            if not plain.is_file() and compressed.is_file():
                _gunzip(compressed, plain)
        super().check_files()

    def _torchvision_class(self) -> type:
        datasets = require_torchvision("torchvision.datasets")
        return getattr(datasets, self.folder)

    @override
    def download_files(self) -> None:
        self._torchvision_class()(str(self.root), train=True, download=True)
        self._torchvision_class()(str(self.root), train=False, download=True)

    @override
    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = self._torchvision_class()(str(self.root), train=train, download=False)
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()


class MNISTDataModule(_IdxDataModule):
    """LeCun et al.'s MNIST handwritten digits: 60,000 training and 10,000 test images, 1x28x28.

    Reads ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or the same names with ``.gz``,
    unpacked on first use) with ``torchvision.datasets.MNIST``. Images are standardised with the usual
    constants (mean 0.1307, std 0.3081). See :class:`~lightning_prune.data.vision.VisionDataModule` for the
    split, the loaders and the arguments.

    Example:
        >>> dm = MNISTDataModule(root="/nonexistent")
        >>> dm.num_classes, dm.input_shape
        (10, (1, 28, 28))
        >>> dm.setup()  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        DatasetFilesNotFoundError: MNISTDataModule: dataset files not found under `root`='/nonexistent' ...
    """

    folder: ClassVar[str] = "MNIST"
    mean: ClassVar[tuple[float, ...]] = (0.1307,)
    std: ClassVar[tuple[float, ...]] = (0.3081,)


class FashionMNISTDataModule(_IdxDataModule):
    """Xiao et al.'s Fashion-MNIST: 60,000 training and 10,000 test images of clothing, 1x28x28, 10 classes.

    The same file layout as MNIST under ``<root>/FashionMNIST/raw/``, read with
    ``torchvision.datasets.FashionMNIST``; standardised with mean 0.2860 and std 0.3530. See
    :class:`MNISTDataModule`.

    Example:
        >>> FashionMNISTDataModule(root="/nonexistent").missing_files()[0]
        '/nonexistent/FashionMNIST/raw/train-images-idx3-ubyte (or train-images-idx3-ubyte.gz)'
    """

    folder: ClassVar[str] = "FashionMNIST"
    mean: ClassVar[tuple[float, ...]] = (0.2860,)
    std: ClassVar[tuple[float, ...]] = (0.3530,)
