"""Tiny datasets written in the real on-disk formats, to exercise the file-reading path without a download.

The files are byte-for-byte in the layout the originals use, only with few, random images: MNIST's idx
files (LeCun et al.) and CIFAR-10's python pickle batches (Krizhevsky). Point a datamodule's ``root`` at the
folder they were written to.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_prune._helpers import check_int
from lightning_prune.data.cifar import CIFAR10_FILES
from lightning_prune.data.mnist import IDX_FILES

__all__ = ["write_fake_cifar10", "write_fake_mnist", "write_idx"]

_IDX_UBYTE = 0x08  # the idx type code of unsigned bytes
_CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_idx(path: str | os.PathLike[str], data: torch.Tensor, compress: bool = False) -> Path:
    """Write a ``uint8`` tensor as an idx file: magic ``0x0000_08_<ndim>``, big-endian 32-bit sizes, raw bytes.

    The magic numbers of MNIST's image (3-D) and label (1-D) files are therefore 2051 and 2049.

    Args:
        path: The file to write.
        data: A ``uint8`` tensor of 1 to 3 dimensions.
        compress: Gzip the file, as the originals are distributed.

    Returns:
        ``path``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_idx(Path(tmp) / "labels", torch.tensor([3, 1], dtype=torch.uint8)).read_bytes()
        b'\\x00\\x00\\x08\\x01\\x00\\x00\\x00\\x02\\x03\\x01'
    """
    if data.dtype != torch.uint8 or not 1 <= data.ndim <= 3:
        raise ValueError(f"`data` must be a uint8 tensor of 1 to 3 dimensions, got {data.dtype} {tuple(data.shape)}.")
    header = struct.pack(f">I{data.ndim}I", _IDX_UBYTE << 8 | data.ndim, *data.shape)
    payload = header + data.contiguous().numpy().tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def _random_labelled(n: int, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Labels cycle through the ten classes (in random order) so every class appears once n >= 10.
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=generator)].to(torch.uint8)
    images = torch.randint(0, 256, (n, *shape), generator=generator, dtype=torch.uint8)
    return images, labels


def write_fake_mnist(
    root: str | os.PathLike[str],
    folder: str = "MNIST",
    num_train: int = 20,
    num_test: int = 10,
    seed: int = 0,
    compress: bool = False,
) -> Path:
    """Write random 28x28 images in MNIST's layout: ``<root>/<folder>/raw/`` and its four idx files.

    Args:
        root: The datamodule's ``root``.
        folder: ``"MNIST"`` or ``"FashionMNIST"`` (their layouts are the same).
        num_train: Training images.
        num_test: Test images.
        seed: Seed of the random pixels and labels.
        compress: Write ``.gz`` files, as they are distributed, instead of plain ones.

    Returns:
        The ``raw`` folder written to.

    Example:
        >>> import tempfile
        >>> from lightning_prune.data import MNISTDataModule
        >>> with tempfile.TemporaryDirectory() as root:
        ...     _ = write_fake_mnist(root, num_train=20, num_test=10)
        ...     dm = MNISTDataModule(root=root, batch_size=4)
        ...     dm.setup()
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (18, 2, 10)
    """
    check_int("num_train", num_train, 1)
    check_int("num_test", num_test, 1)
    raw = Path(root) / folder / "raw"
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = _random_labelled(num_train, (28, 28), generator)
    test_images, test_labels = _random_labelled(num_test, (28, 28), generator)
    suffix = ".gz" if compress else ""
    for name, data in zip(IDX_FILES, (train_images, train_labels, test_images, test_labels), strict=True):
        write_idx(raw / f"{name}{suffix}", data, compress=compress)
    return raw


class _Py2Str(str):
    """A string pickled as Python 2 pickled its native ``str``, as in the original CIFAR-10 batches."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its `dispatch` table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: _Py2Str) -> None:
        # SHORT_BINSTRING / BINSTRING: Python 3 loads it as `str` with encoding="latin1" (as torchvision does)
        # and as `bytes` with encoding="bytes" (as the CIFAR-10 page's recipe does, giving b"data").
        data = obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)  # type: ignore[attr-defined]
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    dispatch[_Py2Str] = save_py2_str  # type: ignore[assignment]  # typeshed types the table for Unpickler


def _pickle_py2(path: Path, obj: dict[_Py2Str, Any]) -> None:
    with path.open("wb") as file:
        _Py2Pickler(file, protocol=2).dump(obj)


def write_fake_cifar10(root: str | os.PathLike[str], num_train: int = 50, num_test: int = 10, seed: int = 0) -> Path:
    """Write random 32x32 colour images in CIFAR-10's python layout: ``<root>/cifar-10-batches-py/``.

    Like the originals, ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` are protocol-2 pickles of
    dicts with the (Python 2 string) keys ``data`` (``uint8`` array of shape ``(N, 3072)``, each row the red,
    green then blue 32x32 planes), ``labels`` (a list of ints), ``batch_label`` and ``filenames``;
    ``batches.meta`` holds ``label_names``, ``num_cases_per_batch`` and ``num_vis``. The training images are
    dealt over the five batches in turn.

    Args:
        root: The datamodule's ``root``.
        num_train: Training images (at least 5: one per batch).
        num_test: Test images.
        seed: Seed of the random pixels and labels.

    Returns:
        The ``cifar-10-batches-py`` folder written to.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     folder = write_fake_cifar10(root, num_train=5, num_test=2)
        ...     with open(folder / "data_batch_1", "rb") as f:
        ...         batch = pickle.load(f, encoding="bytes")
        >>> batch[b"data"].shape, batch[b"data"].dtype, len(batch[b"labels"])
        ((1, 3072), dtype('uint8'), 1)
    """
    check_int("num_train", num_train, 5)
    check_int("num_test", num_test, 1)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = _random_labelled(num_train, (3072,), generator)
    test_images, test_labels = _random_labelled(num_test, (3072,), generator)
    batches = [(train_images[i::5], train_labels[i::5]) for i in range(5)] + [(test_images, test_labels)]
    for index, (name, (images, labels)) in enumerate(zip(CIFAR10_FILES[:6], batches, strict=True)):
        label = f"training batch {index + 1} of 5" if name != "test_batch" else "testing batch 1 of 1"
        _pickle_py2(
            folder / name,
            {
                _Py2Str("batch_label"): _Py2Str(label),
                _Py2Str("labels"): [int(y) for y in labels],
                _Py2Str("data"): np.ascontiguousarray(images.numpy()),
                _Py2Str("filenames"): [_Py2Str(f"image_{name}_{i}.png") for i in range(len(labels))],
            },
        )
    meta = {
        _Py2Str("label_names"): [_Py2Str(name) for name in _CIFAR10_LABELS],
        _Py2Str("num_cases_per_batch"): max(len(labels) for _, labels in batches),
        _Py2Str("num_vis"): 3072,
    }
    _pickle_py2(folder / CIFAR10_FILES[6], meta)
    return folder
