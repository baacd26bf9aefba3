"""Writing files so that a crash or a full disk never leaves a truncated one in place of a good one, and reading
them back so that damaged bytes stop with a message instead of returning other weights.

* :func:`atomic_write` (and :func:`atomic_save`, :func:`atomic_write_text`, :func:`atomic_write_files`): the
  data goes to a temporary file in the target's own folder, is ``fsync``-ed and renamed over the target with
  ``os.replace``. A failure leaves the old file as it was and raises :class:`ArtifactWriteError` naming the path
  and the reason (disk full, read-only file system, a parent that is a file, no permission).
* :func:`tensor_digest`: a SHA-256 of a nested structure's tensors and plain values, stored inside the artifact
  (under :data:`DIGEST_KEY`) by the writers and compared by the readers (:func:`verify_digest`).
* :func:`load_torch_file`: ``torch.load(weights_only=True)`` that turns a missing, empty, truncated or foreign
  file into a ``ValueError`` naming the file, instead of torch's raw zip or unpickling error.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TMP_SUFFIX = ".partial"

#: Key under which artifacts written by lightning_prune keep the digest of everything else they hold.
DIGEST_KEY = "digest"

_REASONS = {
    errno.ENOSPC: "the disk is full (no space left on the device); free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded; free space or write elsewhere",
    errno.EROFS: "the file system is read-only; write to a writable folder",
    errno.EACCES: "permission denied; write to a folder you can write to",
    errno.EPERM: "permission denied; write to a folder you can write to",
    errno.ENOTDIR: "a parent of the path is a file, not a folder; choose another path",
    errno.EEXIST: "a parent of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder; give a file name",
}


class ArtifactWriteError(OSError):
    """A file could not be written; the previous file at that path, if any, is untouched.

    An ``OSError`` with the original ``errno``, whose message names the path and the reason.

    Example:
        >>> err = ArtifactWriteError(28, "/data/model.pt", "the disk is full")
        >>> err.errno, str(err)
        (28, "Could not write '/data/model.pt': the disk is full. Any previous file there is unchanged.")
    """

    def __init__(self, code: int | None, path: str | Path, reason: str) -> None:
        super().__init__(code, reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"Could not write {self.path!r}: {self.reason}. Any previous file there is unchanged."


def _write_error(path: Path, err: OSError) -> ArtifactWriteError:
    code = err.errno
    if code in (errno.EEXIST, errno.ENOTDIR) or (code is None and isinstance(err, (FileExistsError,))):
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None and blocking != path:
            return ArtifactWriteError(
                code, path, f"its parent {str(blocking)!r} is a file, not a folder; choose another path"
            )
    if code == errno.EISDIR or (path.is_dir() and code in (errno.EEXIST, errno.EACCES, errno.EPERM, None)):
        return ArtifactWriteError(code, path, "the path is a folder; give a file name")
    reason = _REASONS.get(code or -1, err.strerror or str(err))
    return ArtifactWriteError(code, path, reason)


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: itself, or one in its cause chain, or one torch's C++ writer reported in
    its message (``RuntimeError: [enforce fail at inline_container.cc] ... No space left on device``)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    for code in _REASONS:
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return None


def prepare_folder(path: Path) -> None:
    """Create ``path``'s folder, or raise :class:`ArtifactWriteError` naming why it cannot hold the file."""
    if path.is_dir():
        raise ArtifactWriteError(errno.EISDIR, path, "the path is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(path, err) from err


def _finish(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_directory(path.parent)
    for stale in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


# The one call that puts bytes on disk, so that a test can make it fail as a full disk does.
_os_write = os.write


def atomic_write(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` so that ``path`` is replaced only once the new file is whole and on disk.

    The data goes to a hidden temporary file next to ``path`` (same folder, hence same file system), which is
    ``fsync``-ed, then renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows), and the folder
    entry is ``fsync``-ed. Temporary files left by processes killed while writing the same ``path`` are removed.

    Args:
        path: The file to write; its folder is created.
        data: The file's bytes.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ArtifactWriteError: The file could not be written (disk full, read-only, a parent is a file, ...);
            ``path`` is as it was.

    Example:
        >>> import tempfile
        >>> atomic_write(Path(tempfile.mkdtemp()) / "hello.bin", b"hello").read_bytes()
        b'hello'
    """
    path = Path(path)
    prepare_folder(path)
    # Opened like any new file (mode 0o666 less the umask), unlike mkstemp's private 0o600.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
    try:
        with open(tmp, "xb", buffering=0) as f:
            view = memoryview(data).cast("B")
            while view:
                view = view[_os_write(f.fileno(), view[: 1 << 24]) :]
            os.fsync(f.fileno())
        _finish(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` that either writes the whole file or leaves ``path`` as it was.

    ``obj`` is serialised in memory first (torch's own file writer reports a full disk as an unreadable
    ``RuntimeError``), then written by :func:`atomic_write`.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "state.pt"
        >>> atomic_save({"step": 3}, target).name
        'state.pt'
        >>> torch.load(target)
        {'step': 3}
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getbuffer())


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`).

    Example:
        >>> import tempfile
        >>> atomic_write_text(Path(tempfile.mkdtemp()) / "a.txt", "é").read_text(encoding="utf-8")
        'é'
    """
    return atomic_write(path, text.encode("utf-8"))


def atomic_write_files(path: str | Path, write: Callable[[Path], None]) -> Path:
    """For writers that need a file name (and may write files beside it, such as ONNX's ``<path>.data``).

    ``write`` gets ``path``'s name inside a hidden temporary folder next to ``path``; every file it writes
    there is ``fsync``-ed and moved beside ``path`` with ``os.replace``, ``path`` itself last. Files of the same
    names beside ``path`` that the new write did not produce are left alone.

    Raises:
        ArtifactWriteError: As :func:`atomic_write`; on failure no file beside ``path`` was replaced.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "model.txt"
        >>> atomic_write_files(target, lambda p: p.write_text("weights")).read_text()
        'weights'
    """
    path = Path(path)
    prepare_folder(path)
    staging = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
    try:
        staging.mkdir()
        write(staging / path.name)
        if not (staging / path.name).is_file():
            raise RuntimeError(f"The writer of {str(path)!r} wrote no file.")
        written = sorted(staging.iterdir(), key=lambda p: p.name == path.name)  # path itself last
        for file in written:
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        for file in written:
            os.replace(file, path.parent / file.name)
        _fsync_directory(path.parent)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        cause = _os_error(err) if isinstance(err, Exception) else None
        if cause is not None:
            raise _write_error(path, cause) from err
        raise
    shutil.rmtree(staging, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
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


# ---------------------------------------------------------------------------------------------- digests
def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_sparse:
            t = t.to_dense()
        if t.device.type == "meta":
            h.update(f"T{t.dtype}{tuple(t.shape)}meta;".encode())
            return
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        flat = t.cpu().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape};".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        h.update(f"D{len(value)}{{".encode())
        for key, item in value.items():
            h.update(f"{key!r}:".encode())
            _feed(h, item)
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}[".encode())
        for item in value:
            _feed(h, item)
        h.update(b"]")
    elif value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:  # objects of other types contribute their type only: their repr may hold addresses
        h.update(f"O{type(value).__qualname__};".encode())


def tensor_digest(obj: Any, *, skip: str | None = DIGEST_KEY) -> str:
    """SHA-256 of ``obj``'s tensors (dtype, shape, bytes) and plain values, walking dicts, lists and tuples.

    Args:
        obj: A tensor or a nested structure of dicts, lists, tuples, tensors, arrays and plain values; objects
            of other types contribute their type's name only.
        skip: A top-level key of a dict ``obj`` left out (the digest itself, when stored inside ``obj``).

    Returns:
        ``"sha256:<hex>"``.

    Example:
        >>> a = tensor_digest({"w": torch.zeros(2)})
        >>> a == tensor_digest({"w": torch.zeros(2)}), a == tensor_digest({"w": torch.tensor([0.0, 1.0])})
        (True, False)
    """
    h = hashlib.sha256()
    if isinstance(obj, Mapping) and skip is not None:
        obj = {k: v for k, v in obj.items() if k != skip}
    _feed(h, obj)
    return "sha256:" + h.hexdigest()


def with_digest(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` with its :func:`tensor_digest` under :data:`DIGEST_KEY` (a shallow copy).

    Example:
        >>> sorted(with_digest({"w": torch.ones(1)}))
        ['digest', 'w']
    """
    out = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    out[DIGEST_KEY] = tensor_digest(out)
    return out


def verify_digest(obj: Mapping[str, Any], what: str) -> None:
    """Raise unless ``obj``'s stored digest matches its content; accept objects written without one.

    Args:
        obj: What a reader loaded.
        what: The file (or object) named in the message.

    Raises:
        ValueError: The content differs from what was written.

    Example:
        >>> state = with_digest({"w": torch.ones(2)})
        >>> verify_digest(state, "state.pt")
        >>> state["w"][0] = 5.0
        >>> verify_digest(state, "state.pt")
        Traceback (most recent call last):
        ...
        ValueError: 'state.pt' is damaged: its content does not match the digest written with it ...
    """
    stored = obj.get(DIGEST_KEY)
    if stored is None:
        return
    actual = tensor_digest(obj)
    if stored != actual:
        raise ValueError(
            f"{what!r} is damaged: its content does not match the digest written with it (stored {stored}, "
            f"computed {actual}). Restore it from a backup or write it again."
        )


# ---------------------------------------------------------------------------------------------- reading
def load_torch_file(path: str | Path, what: str = "file", *, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what is wrong with it.

    Args:
        path: The file.
        what: What the file should be, for messages (``"sparse archive"``, ``"checkpoint"``, ...).
        map_location: As ``torch.load``'s.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a folder, empty, truncated, not written by ``torch.save``, or holds objects
            other than tensors and plain values.

    Example:
        >>> import tempfile
        >>> empty = Path(tempfile.mkdtemp()) / "empty.pt"
        >>> _ = empty.write_bytes(b"")
        >>> load_torch_file(empty, "checkpoint")
        Traceback (most recent call last):
        ...
        ValueError: The checkpoint ... is empty (0 bytes): it was not written completely. ...
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No {what} at {str(path)!r}: the file does not exist.")
    if path.is_dir():
        raise ValueError(f"The {what} path {str(path)!r} is a folder; give the file.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"The {what} {str(path)!r} is empty (0 bytes): it was not written completely. Use another copy."
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":  # torch.save writes a zip archive
        raise ValueError(
            f"The {what} {str(path)!r} is not a file written by torch.save (it is not a zip archive; {size} "
            f"bytes). Check the path."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
            raise ValueError(
                f"The {what} {str(path)!r} holds Python objects other than tensors and plain values, which "
                "lightning_prune does not load (loading them could run code from the file). Re-save it with "
                "tensors, numbers, strings, lists and dicts only."
            ) from err
        raise ValueError(
            f"The {what} {str(path)!r} is damaged or truncated ({size} bytes; torch.load failed: {first}). "
            "Use another copy or write it again."
        ) from err


def check_path(path: object, name: str = "path") -> Path:
    """``path`` as a ``Path``, or a ``TypeError`` naming the argument ``name``.

    Example:
        >>> check_path(None)
        Traceback (most recent call last):
        ...
        TypeError: `path` must be a file path (a str or pathlib.Path), got None.
    """
    if isinstance(path, (str, os.PathLike)) and str(path):
        return Path(path)
    raise TypeError(f"`{name}` must be a file path (a str or pathlib.Path), got {path!r}.")


# ---------------------------------------------------------------------------------------------- sidecar digests
#: Suffix of the file beside an artifact whose format has no room for a digest (``model.onnx.sha256``).
SIDECAR_SUFFIX = ".sha256"


def file_digest(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes.

    Example:
        >>> import tempfile
        >>> target = atomic_write_text(Path(tempfile.mkdtemp()) / "a.txt", "")
        >>> file_digest(target)[:15]
        'sha256:e3b0c442'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    """Where :func:`write_sidecar` keeps the digests of ``path`` (``<path>.sha256``)."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | Path, files: list[Path] | None = None) -> Path:
    """Write ``<path>.sha256`` (atomically) with one ``<digest>  <name>`` line for ``path`` and ``files``.

    For formats with no room for a digest inside (``.pt2`` programs, ONNX files); :func:`verify_sidecar`
    checks it.

    Example:
        >>> import tempfile
        >>> target = atomic_write_text(Path(tempfile.mkdtemp()) / "m.onnx", "graph")
        >>> verify_sidecar(target) is None, write_sidecar(target).name, verify_sidecar(target)
        (True, 'm.onnx.sha256', True)
    """
    path = Path(path)
    names = [path, *(files or [])]
    text = "".join(f"{file_digest(p)}  {p.name}\n" for p in names)
    return atomic_write_text(sidecar_path(path), text)


def verify_sidecar(path: str | Path) -> bool | None:
    """Check ``path`` (and the files listed with it) against ``<path>.sha256``.

    Returns:
        True when they match, None when there is no sidecar file (written before digests, or by another tool).

    Raises:
        ValueError: A file differs from its digest or is missing; the message names it.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    for line in sidecar.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        if not name:
            raise ValueError(f"The digest file {str(sidecar)!r} is damaged (line {line!r}); write the export again.")
        file = path.parent / name
        if not file.is_file():
            raise ValueError(f"{str(file)!r}, listed in {str(sidecar)!r}, is missing; write the export again.")
        actual = file_digest(file)
        if actual != digest:
            raise ValueError(
                f"{str(file)!r} is damaged: its bytes do not match the digest in {str(sidecar)!r} (stored {digest}, "
                f"computed {actual}). Write the export again."
            )
    return True


# ---------------------------------------------------------------------------------------------- JSON records
def _json_digest(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def atomic_write_json(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as indented JSON, with its digest under :data:`DIGEST_KEY`, atomically.

    Example:
        >>> import tempfile
        >>> path = atomic_write_json(Path(tempfile.mkdtemp()) / "metrics.json", {"status": "ok"})
        >>> data = json.loads(path.read_text())
        >>> verify_json_digest(data, path)
        >>> data["status"] = "edited"
        >>> verify_json_digest(data, path)
        Traceback (most recent call last):
        ...
        ValueError: '...metrics.json' is damaged or was edited: its content does not match the digest ...
    """
    body = {k: v for k, v in record.items() if k != DIGEST_KEY}
    return atomic_write_text(path, json.dumps({**body, DIGEST_KEY: _json_digest(body)}, indent=2) + "\n")


def verify_json_digest(record: Mapping[str, Any], path: str | Path) -> None:
    """Raise unless a record read from ``path`` matches the digest :func:`atomic_write_json` wrote (records
    without a digest pass).

    Raises:
        ValueError: The record differs from what was written.
    """
    stored = record.get(DIGEST_KEY)
    if stored is None:
        return
    if stored != _json_digest(record):
        raise ValueError(
            f"{str(path)!r} is damaged or was edited: its content does not match the digest written with it. "
            "Run the job again (or delete the `digest` key to accept the file as it is)."
        )
