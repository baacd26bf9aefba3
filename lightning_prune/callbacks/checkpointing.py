"""Checkpoints that survive being killed, and resumed runs that repeat the uninterrupted one exactly.

Two Lightning pieces, both independent of pruning:

* :class:`AtomicCheckpointIO`, a ``CheckpointIO`` plugin: each checkpoint is written to a temporary file in its
  own directory, flushed to disk (``fsync``) and renamed over the target in one step (``os.replace``), so a
  process killed while saving leaves the previous checkpoint whole and never a truncated newest file.
  Lightning's own writer stages the file in the system's temporary directory and moves it afterwards, which
  is a copy, not a rename, when that directory is on another file system, and it does not ``fsync``.
* :class:`RandomStateCheckpoint`, a callback that stores the random number generators' states (Python,
  NumPy, torch, CUDA) of every rank in each checkpoint and restores them on resume, so dropout and data
  augmentation draw after a resume what they would have drawn without the interruption. Together with a data
  order that depends only on the seed and the epoch (:class:`~lightning_prune.data.EpochShuffleSampler`) and
  deterministic kernels, a run resumed from an end-of-epoch checkpoint ends with bit-identical weights.

Example:
    >>> from lightning.pytorch import Trainer
    >>> trainer = Trainer(
    ...     plugins=[AtomicCheckpointIO()], callbacks=[RandomStateCheckpoint()], logger=False, max_epochs=1
    ... )
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_prune._files import atomic_save, tensor_digest
from lightning_prune.masks.distributed import world_size


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic, verified writes to local paths (see :func:`atomic_save`).

    Each checkpoint carries a SHA-256 digest of its tensors and values (key ``lightning_prune_digest``), which
    loading checks: flipped bytes stop with a ``ValueError`` naming the file instead of resuming from other
    weights. Empty, truncated and foreign files get a message naming the file too; a write that fails (disk full,
    read-only file system, a parent that is a file) raises an ``OSError`` naming the path and leaves the
    previous checkpoint whole. Remote paths (``s3://``, ...) are read and written by Lightning's own code.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(plugins=[AtomicCheckpointIO()], logger=False)
        >>> type(trainer.strategy.checkpoint_io).__name__
        'AtomicCheckpointIO'
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported for "
                f"`{type(self).__name__}`. Please implement your custom `CheckpointIO` to define how you'd like to "
                "use `storage_options`."
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_save({**checkpoint, CHECKPOINT_DIGEST_KEY: tensor_digest(checkpoint, skip=None)}, path)

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        _check_checkpoint_file(Path(path))
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (FileNotFoundError, pickle.UnpicklingError):
            raise  # a missing file, or objects that only `weights_only=False` loads: Lightning's own message
        except Exception as err:
            raise ValueError(
                f"The checkpoint {str(path)!r} is damaged or truncated ({Path(path).stat().st_size} bytes; "
                f"torch.load failed: {_first_line(err)}). Resume from another checkpoint."
            ) from err
        if not isinstance(checkpoint, dict):
            raise ValueError(
                f"{str(path)!r} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict); check the "
                "path."
            )
        stored = checkpoint.pop(CHECKPOINT_DIGEST_KEY, None)
        if stored is not None and stored != tensor_digest(checkpoint, skip=None):
            raise ValueError(
                f"The checkpoint {str(path)!r} is damaged: its content does not match the digest written with it. "
                "Resume from another checkpoint."
            )
        return checkpoint


#: Top-level key of the digest :class:`AtomicCheckpointIO` writes into each checkpoint (removed on load).
CHECKPOINT_DIGEST_KEY = "lightning_prune_digest"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _check_checkpoint_file(path: Path) -> None:
    """Messages for what torch reports as ``EOFError`` or ``UnpicklingError``: an empty or a non-zip file."""
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.is_dir():
        raise ValueError(f"The checkpoint path {str(path)!r} is a folder; give the .ckpt file.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"The checkpoint {str(path)!r} is empty (0 bytes): it was not written completely. Resume from another "
            "checkpoint."
        )
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            raise ValueError(
                f"{str(path)!r} is not a checkpoint written by torch.save (not a zip archive; {size} bytes); check "
                "the path."
            )


def _random_states() -> dict[str, Any]:
    """The generators' states as tensors, lists and numbers only, so checkpoints load with ``weights_only=True``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [
            str(kind),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_random_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStateCheckpoint(Callback):
    """Save every rank's random number generator states in each checkpoint and restore them on resume.

    A resumed run otherwise starts from the generators as ``seed_everything`` left them at start-up, so dropout
    masks and random augmentations after a resume differ from those of an uninterrupted run, and so do the
    weights. Under DDP each rank's states are gathered when the checkpoint is written (checkpoints are written
    collectively in Lightning: ``trainer.save_checkpoint`` runs on every rank) and each rank gets its own back;
    a run resumed on another number of ranks gets rank 0's states on every rank, with a warning.

    The states are restored when the checkpoint is loaded, before the training dataloader's iterator is
    created, which is where the uninterrupted run stood when the checkpoint was written at the end of an epoch.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[RandomStateCheckpoint()], logger=False, max_epochs=1)
    """

    @override
    def state_dict(self) -> dict[str, Any]:
        states = _random_states()
        if world_size() > 1:
            gathered: list[Any] = [None] * world_size()
            dist.all_gather_object(gathered, states)
            return {"ranks": gathered}
        return {"ranks": [states]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        if not ranks:
            return
        rank = dist.get_rank() if world_size() > 1 else 0
        if len(ranks) != world_size():
            rank_zero_warn(
                f"RandomStateCheckpoint: the checkpoint holds random states of {len(ranks)} rank(s), this run has "
                f"{world_size()}; every rank resumes with rank 0's states."
            )
            rank = 0
        _set_random_states(ranks[rank])
