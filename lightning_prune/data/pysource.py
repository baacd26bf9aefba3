"""A byte-level language-modelling corpus every machine with Python already has: the standard library's sources.

The standard library's ``.py`` files (about 31 MB in 1,790 files for CPython 3.11, found with
``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded) are real code nobody here wrote. Read as bytes
they make a corpus with a vocabulary of 256 and no tokenizer, download or licence question; any directory of
text files can stand in for it (``root`` and ``pattern``).
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override

from lightning_prune._helpers import is_int
from lightning_prune.data.base import check_declared, check_fraction, check_int

__all__ = ["SPLITS", "ByteWindows", "PySourceDataModule", "RandomOffsetSampler", "assign_splits", "stdlib_root"]

Split = Literal["train", "val", "test"]
#: The three splits, in the order files are assigned to them.
SPLITS: tuple[Split, ...] = ("train", "val", "test")
VOCAB_SIZE = 256  # bytes
#: Written between two files when a split's files are concatenated: a document boundary the model can learn.
#: Python source never contains a NUL byte (the compiler rejects it).
SEPARATOR = 0
_EXCLUDED_DIRECTORIES = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``).

    Example:
        >>> (stdlib_root() / "os.py").is_file()
        True
    """
    return Path(sysconfig.get_paths()["stdlib"])


def _position(relative_path: str) -> float:
    """A number in [0, 1) fixed by the path alone: the first 8 bytes of its SHA-256, over 2**64."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(relative_paths: Iterable[str], val_fraction: float, test_fraction: float) -> dict[Split, list[str]]:
    """Assign each path to train, validation or test by a hash of the path itself.

    A path goes to validation when the SHA-256 of its UTF-8 bytes, read as a number in [0, 1), is below
    ``val_fraction``, to test when it is below ``val_fraction + test_fraction``, and to training otherwise.
    The assignment depends on nothing but the path: not on random state, not on the order or the number of
    the other paths, so adding a file never moves another one to a different split. Use paths relative to
    the corpus root, with ``/`` separators, so that the split is the same on every machine.

    Args:
        relative_paths: The files' paths relative to the corpus root.
        val_fraction: Expected fraction of the files held out for validation, in (0, 1).
        test_fraction: Expected fraction held out for testing, in (0, 1).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each list sorted.

    Example:
        >>> splits = assign_splits(["a.py", "b.py", "c.py", "d.py"], val_fraction=0.25, test_fraction=0.25)
        >>> sorted(p for paths in splits.values() for p in paths)
        ['a.py', 'b.py', 'c.py', 'd.py']
        >>> splits == assign_splits(["d.py", "c.py", "b.py", "a.py"], val_fraction=0.25, test_fraction=0.25)
        True
    """
    val_fraction = check_fraction("val_fraction", val_fraction)
    test_fraction = check_fraction("test_fraction", test_fraction)
    _check_fractions_leave_training(val_fraction, test_fraction)
    splits: dict[Split, list[str]] = {split: [] for split in SPLITS}
    for path in relative_paths:
        u = _position(path)
        split: Split = "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
        splits[split].append(path)
    return {split: sorted(paths) for split, paths in splits.items()}


def _check_fractions_leave_training(val_fraction: float, test_fraction: float) -> None:
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"`val_fraction` + `test_fraction` must be < 1 to leave training data, got "
            f"{val_fraction!r} + {test_fraction!r} = {val_fraction + test_fraction!r}."
        )


class ByteWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows of ``seq_len`` bytes of ``data`` and the ``seq_len`` bytes that follow each one (next-byte targets).

    Item ``i`` starts at ``starts[i]`` when ``starts`` is given (fixed evaluation windows), else at offset ``i``
    (every offset is a sample: a sampler picks which). Inputs and targets are ``int64`` tensors of shape
    ``(seq_len,)``; ``targets[t] == inputs[t + 1]`` for ``t < seq_len - 1``.

    Args:
        data: The split's bytes, a 1-D ``uint8`` tensor of at least ``seq_len + 1`` elements.
        seq_len: Tokens per window.
        starts: Optional 1-D integer tensor of window offsets, each at most ``len(data) - seq_len - 1``.

    Example:
        >>> windows = ByteWindows(torch.tensor(list(b"hello"), dtype=torch.uint8), seq_len=3)
        >>> len(windows), [bytes(t.tolist()) for t in windows[1]]
        (2, [b'ell', b'llo'])
    """

    def __init__(self, data: torch.Tensor, seq_len: int, starts: torch.Tensor | None = None) -> None:
        seq_len = check_int("seq_len", seq_len, 1)
        if data.ndim != 1 or data.dtype != torch.uint8 or data.numel() < seq_len + 1:
            raise ValueError(
                f"`data` must be a 1-D uint8 tensor of at least seq_len + 1 = {seq_len + 1} bytes, got shape "
                f"{tuple(data.shape)} and dtype {data.dtype}."
            )
        last = data.numel() - seq_len - 1
        if starts is not None and starts.numel() and (int(starts.min()) < 0 or int(starts.max()) > last):
            raise ValueError(f"`starts` must lie in [0, {last}] for {data.numel()} bytes and seq_len={seq_len}.")
        self.data = data
        self.seq_len = seq_len
        self.starts = starts

    def __len__(self) -> int:
        return self.starts.numel() if self.starts is not None else self.data.numel() - self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[index]) if self.starts is not None else index
        if not 0 <= start < self.data.numel() - self.seq_len:
            raise IndexError(f"window {index} is out of range for {len(self)} windows.")
        chunk = self.data[start : start + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


class RandomOffsetSampler(Sampler[int]):
    """``num_samples`` offsets drawn uniformly (with replacement) from ``range(num_offsets)``, anew each epoch.

    Like :class:`~lightning_prune.data.EpochShuffleSampler`, the draw is a pure function of ``seed + epoch``
    (Lightning calls :meth:`set_epoch` at every epoch's start): it ignores global random state, differs from
    epoch to epoch, and a run resumed from a checkpoint sees the same windows as one that never stopped.

    Example:
        >>> sampler = RandomOffsetSampler(num_offsets=1000, num_samples=4, seed=0)
        >>> sampler.set_epoch(1); a = list(sampler)
        >>> sampler.set_epoch(0); b = list(sampler); sampler.set_epoch(1)
        >>> a == list(sampler) and a != b and len(a) == 4
        True
    """

    def __init__(self, num_offsets: int, num_samples: int, seed: int = 0) -> None:
        self.num_offsets = check_int("num_offsets", num_offsets, 1)
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randint(self.num_offsets, (self.num_samples,), generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def _evaluation_starts(num_bytes: int, seq_len: int, cap: int | None) -> torch.Tensor:
    """Offsets of the non-overlapping windows of a split, thinned evenly to at most ``cap`` of them."""
    count = (num_bytes - 1) // seq_len
    index = torch.arange(count, dtype=torch.long)
    if cap is not None and count > cap:
        index = torch.arange(cap, dtype=torch.long) * count // cap
    return index * seq_len


class PySourceDataModule(L.LightningDataModule):
    """The standard library's Python sources (or any directory of text files) as byte-level sequences.

    Files are found under ``root`` with ``root.rglob(pattern)`` (``site-packages``, ``dist-packages`` and
    ``__pycache__`` folders excluded) and assigned to train, validation and test by a hash of their path
    relative to ``root`` (:func:`assign_splits`): deterministic, independent of random state and of the order
    files are listed. Each split's files are read as bytes and concatenated in path order, each followed by a
    NUL byte (:data:`SEPARATOR`). Tokens are bytes: the vocabulary is 256.

    Samples are ``(inputs, targets)``: ``seq_len`` bytes and the ``seq_len`` bytes that follow each one, both
    ``int64`` of shape ``(seq_len,)``. Training draws ``samples_per_epoch`` windows at random offsets per
    epoch from a :class:`RandomOffsetSampler` seeded with ``seed + epoch``; validation and test use the fixed,
    non-overlapping windows of their split, thinned evenly to at most ``max_eval_windows``.

    After ``setup()``, :attr:`python_version` (the interpreter's; it fixes the standard library's contents),
    :attr:`num_files`, :attr:`num_bytes` and :attr:`num_windows` describe the splits, and the same figures are
    in ``hparams`` (``train_files``, ``train_bytes``, ``val_windows``, ...) so that loggers record them.

    Args:
        root: The corpus directory; ``None`` (the default) is the standard library (:func:`stdlib_root`).
        pattern: Which files under ``root`` to read (a glob on file names, searched recursively).
        seq_len: Tokens per sample, at least 1.
        batch_size: Samples per batch, for every loader.
        val_fraction: Expected fraction of the files held out for validation, in (0, 1).
        test_fraction: Expected fraction of the files held out for testing, in (0, 1).
        samples_per_epoch: Training windows per epoch; ``None`` draws as many as fit in the training bytes
            without overlap (about one pass over them).
        max_eval_windows: At most this many validation windows and as many test windows (evenly spread over
            the split); ``None`` uses every window.
        seed: Seed of the training offsets (the split does not depend on it).
        num_workers: Worker processes per loader (0 loads in the main process).
        vocab_size: Optional; must be 256. Lets a config declare it for models to interpolate.

    Example:
        >>> dm = PySourceDataModule(seq_len=64, batch_size=8, max_eval_windows=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), x.dtype, bool((x[:, 1:] == y[:, :-1]).all())
        ((8, 64), torch.int64, True)
        >>> dm.num_windows["val"]
        16
    """

    vocab_size: int = VOCAB_SIZE

    def __init__(
        self,
        root: str | Path | None = None,
        pattern: str = "*.py",
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        samples_per_epoch: int | None = None,
        max_eval_windows: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if root is not None and not isinstance(root, (str, Path)):
            raise ValueError(f"`root` must be a directory path or None (the standard library), got {root!r}.")
        self.root = stdlib_root() if root is None else Path(root).expanduser()
        if not self.root.is_dir():
            raise ValueError(
                f"`root` must be an existing directory of text files, got {str(root)!r}, which "
                f"{'is not a directory' if self.root.exists() else 'does not exist'}. Set it to a folder of text "
                "files, or leave it out to use the Python standard library's sources."
            )
        if not isinstance(pattern, str) or not pattern or "/" in pattern or "\\" in pattern:
            raise ValueError(
                f"`pattern` must be a non-empty glob on file names, searched recursively, such as '*.py' or "
                f"'*.txt', got {pattern!r}."
            )
        self.pattern = pattern
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.test_fraction = check_fraction("test_fraction", test_fraction)
        _check_fractions_leave_training(self.val_fraction, self.test_fraction)
        self.samples_per_epoch = (
            None if samples_per_epoch is None else check_int("samples_per_epoch", samples_per_epoch, 1)
        )
        self.max_eval_windows = None if max_eval_windows is None else check_int("max_eval_windows", max_eval_windows, 1)
        if not is_int(seed):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.seed = int(seed)
        self.num_workers = check_int("num_workers", num_workers, 0)
        check_declared("PySourceDataModule", "vocab_size", vocab_size, VOCAB_SIZE)
        self.input_shape: tuple[int, ...] = (self.seq_len,)
        # Record resolved values (the root actually read, the fixed vocabulary), not a declared None.
        root, vocab_size = str(self.root), VOCAB_SIZE
        self.save_hyperparameters()
        self.python_version = platform.python_version()
        self.num_files: dict[str, int] = {}
        self.num_bytes: dict[str, int] = {}
        self.num_windows: dict[str, int] = {}
        self.data: dict[str, torch.Tensor] = {}

    def files(self) -> dict[Split, list[Path]]:
        """The files of each split, sorted by their path relative to ``root``.

        Raises:
            ValueError: ``root`` holds no file matching ``pattern``, or a split gets no file.
        """
        found = [
            path
            for path in self.root.rglob(self.pattern)
            if path.is_file() and not _EXCLUDED_DIRECTORIES.intersection(path.relative_to(self.root).parts[:-1])
        ]
        if not found:
            raise ValueError(
                f"`root`={str(self.root)!r} has no file matching `pattern`={self.pattern!r} (searched recursively, "
                f"site-packages excluded). Point `root` at a folder of such files or change `pattern`."
            )
        relative = {path.relative_to(self.root).as_posix(): path for path in found}
        splits = assign_splits(relative, self.val_fraction, self.test_fraction)
        for split, names in splits.items():
            if not names:
                hint = {"val": "raise `val_fraction`", "test": "raise `test_fraction`"}.get(
                    split, "lower `val_fraction` and `test_fraction`"
                )
                raise ValueError(
                    f"The {split} split of the {len(found)} files matching `pattern`={self.pattern!r} under "
                    f"`root`={str(self.root)!r} is empty (files are assigned by a hash of their path): add files "
                    f"or {hint}."
                )
        return {split: [relative[name] for name in names] for split, names in splits.items()}

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return
        for split, paths in self.files().items():
            chunks: list[bytes] = []
            for path in paths:
                chunks += [path.read_bytes(), bytes([SEPARATOR])]
            data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
            if data.numel() < self.seq_len + 1:
                raise ValueError(
                    f"The {split} split holds {data.numel()} bytes ({len(paths)} files), fewer than "
                    f"`seq_len` + 1 = {self.seq_len + 1}: lower `seq_len` or add files under `root`."
                )
            self.data[split] = data
            self.num_files[split] = len(paths)
            self.num_bytes[split] = data.numel()
        for split in ("val", "test"):
            self.num_windows[split] = len(self._evaluation_set(split))
        self.num_windows["train"] = self._train_samples()
        figures: dict[str, Any] = {"python_version": self.python_version}
        for split in SPLITS:
            figures.update(
                {
                    f"{split}_files": self.num_files[split],
                    f"{split}_bytes": self.num_bytes[split],
                    f"{split}_windows": self.num_windows[split],
                }
            )
        self.hparams.update(figures)

    def _train_samples(self) -> int:
        if self.samples_per_epoch is not None:
            return self.samples_per_epoch
        return max(1, (self.num_bytes["train"] - 1) // self.seq_len)

    def _evaluation_set(self, split: Split) -> ByteWindows:
        starts = _evaluation_starts(self.data[split].numel(), self.seq_len, self.max_eval_windows)
        return ByteWindows(self.data[split], self.seq_len, starts)

    def _require(self, split: Split) -> torch.Tensor:
        if split not in self.data:
            raise RuntimeError(f"{type(self).__name__}: call `setup()` before asking for a dataloader.")
        return self.data[split]

    def _loader(self, dataset: ByteWindows, sampler: Sampler[int] | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        dataset = ByteWindows(self._require("train"), self.seq_len)
        return self._loader(dataset, RandomOffsetSampler(len(dataset), self._train_samples(), seed=self.seed))

    @override
    def val_dataloader(self) -> DataLoader:
        self._require("val")
        return self._loader(self._evaluation_set("val"))

    @override
    def test_dataloader(self) -> DataLoader:
        self._require("test")
        return self._loader(self._evaluation_set("test"))
