"""CIFAR-10 (32x32 colour, 10 classes) from its python pickle batches, through torchvision."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from typing_extensions import override

from lightning_prune.data.vision import Transform, VisionDataModule, require_torchvision

__all__ = ["CIFAR10_FILES", "CIFAR10DataModule"]

#: The files of ``<root>/cifar-10-batches-py/``: five training batches, the test batch and the label names.
CIFAR10_FILES: tuple[str, ...] = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)


@functools.cache
def presence_checked_cifar10() -> type:
    """``torchvision.datasets.CIFAR10`` with its MD5 checks reduced to presence checks.

    torchvision compares each file's MD5 with the official one before loading it (``_check_integrity`` and
    ``_load_meta``), which rules out every copy but the original, e.g. small files in the same format for
    tests. :class:`CIFAR10DataModule` checks that the files are present itself, with a message that names
    them; with no MD5 (``None``) torchvision's ``check_integrity`` checks presence alone, as it does for
    MNIST. The download still verifies the archive's MD5 (``tgz_md5`` is kept).

    Returns:
        A subclass of ``torchvision.datasets.CIFAR10``, created once.
    """
    base = require_torchvision("torchvision.datasets").CIFAR10

    class PresenceCheckedCIFAR10(base):  # type: ignore[misc, valid-type]
        train_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in base.train_list]
        test_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in base.test_list]
        meta: ClassVar[dict[str, str | None]] = {**base.meta, "md5": None}

    return PresenceCheckedCIFAR10


class CIFAR10DataModule(VisionDataModule):
    """Krizhevsky's CIFAR-10: 50,000 training and 10,000 test colour images, 3x32x32, 10 classes.

    Reads ``<root>/cifar-10-batches-py/`` (:data:`CIFAR10_FILES`, the "CIFAR-10 python version") with
    ``torchvision.datasets.CIFAR10``, checking that the files are present rather than their MD5 (see
    :func:`presence_checked_cifar10`). Images are standardised with the training set's per-channel mean
    (0.4914, 0.4822, 0.4465) and standard deviation (0.2470, 0.2435, 0.2616). With ``augment=True`` training
    images are randomly cropped from a 4-pixel zero padding and flipped horizontally (He et al., 2016), drawn
    from torch's global generator, which ``lightning.seed_everything(seed, workers=True)`` seeds per worker.
    See :class:`~lightning_prune.data.vision.VisionDataModule` for the split, the loaders and the other
    arguments.

    Args:
        augment: Random crop and horizontal flip of training images; validation and test images are never
            augmented.

    Example:
        >>> dm = CIFAR10DataModule(root="/nonexistent", augment=True)
        >>> dm.num_classes, dm.input_shape, dm.missing_files()[0]
        (10, (3, 32, 32), '/nonexistent/cifar-10-batches-py/data_batch_1')
    """

    input_shape: tuple[int, ...] = (3, 32, 32)
    folder: ClassVar[str] = "cifar-10-batches-py"
    mean: ClassVar[tuple[float, ...]] = (0.4914, 0.4822, 0.4465)
    std: ClassVar[tuple[float, ...]] = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        root: str | os.PathLike[str] = "data",
        download: bool = False,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = False,
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
        if not isinstance(augment, bool):
            raise ValueError(f"`augment` must be a bool, got {augment!r}.")
        self.augment = augment
        # Record the resolved values, not a declared None: loggers merge them with the model's hparams.
        num_classes, input_shape = self.num_classes, list(self.input_shape)
        self.save_hyperparameters()

    @override
    def expected_files(self) -> list[tuple[Path, ...]]:
        return [(self.root / self.folder / name,) for name in CIFAR10_FILES]

    @override
    def download_files(self) -> None:
        require_torchvision("torchvision.datasets").CIFAR10(str(self.root), train=True, download=True)

    @override
    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = presence_checked_cifar10()(str(self.root), train=train, download=False)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # torchvision holds NHWC
        return images, torch.tensor(dataset.targets, dtype=torch.long)

    @override
    def train_transform(self) -> Transform | None:
        if not self.augment:
            return None
        v2 = require_torchvision("torchvision.transforms.v2")
        return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
