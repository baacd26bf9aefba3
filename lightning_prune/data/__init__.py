"""Datamodules for the reference experiments.

``DigitsDataModule`` and ``SyntheticDataModule`` need nothing on disk; ``MNISTDataModule``,
``FashionMNISTDataModule`` and ``CIFAR10DataModule`` read the official files from ``root`` through torchvision
(``pip install 'lightning-prune[vision]'``) and download them only when asked to (``download=True``).
``PySourceDataModule`` serves the Python standard library's own sources (or any folder of text files) as bytes,
for language models.
"""

from lightning_prune.data.base import ClassificationDataModule
from lightning_prune.data.cifar import CIFAR10DataModule
from lightning_prune.data.digits import DigitsDataModule
from lightning_prune.data.mnist import FashionMNISTDataModule, MNISTDataModule
from lightning_prune.data.pysource import PySourceDataModule
from lightning_prune.data.samplers import EpochShuffleSampler
from lightning_prune.data.splits import stratified_split
from lightning_prune.data.synthetic import SyntheticDataModule
from lightning_prune.data.vision import DatasetFilesNotFoundError, NormalizedImages, VisionDataModule

__all__ = [
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "DatasetFilesNotFoundError",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "NormalizedImages",
    "PySourceDataModule",
    "SyntheticDataModule",
    "VisionDataModule",
    "stratified_split",
]
