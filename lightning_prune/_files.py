"""Writing files so that a crash or a full disk never leaves a truncated one in place of a good one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch

_TMP_SUFFIX = ".partial"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` that either writes the whole file or leaves ``path`` as it was.

    The data goes to a hidden temporary file next to ``path`` (same directory, hence same file system), which is
    flushed and ``fsync``-ed, then renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows), and
    the directory entry is ``fsync``-ed. Temporary files left by processes killed while saving to the same
    ``path`` are removed.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "state.pt"
        >>> atomic_save({"step": 3}, target).name
        'state.pt'
        >>> torch.load(target)
        {'step': 3}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Opened like any new file (mode 0o666 less the umask), unlike mkstemp's private 0o600.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    for stale in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
    return path


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
