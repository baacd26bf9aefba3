"""Every artifact writer is atomic and every reader checks the digest written with the file: a full disk, a
read-only file system or a parent that is a file leaves the previous file loadable and names the path and the
reason; flipped bytes, truncated, empty and foreign files are refused with a message naming the file."""

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_prune._files as files
from lightning_prune._files import ArtifactWriteError, atomic_write_text, load_torch_file, verify_sidecar
from lightning_prune.callbacks.checkpointing import CHECKPOINT_DIGEST_KEY, AtomicCheckpointIO
from lightning_prune.deploy import load_compact, load_program, save_compact, save_sparse
from lightning_prune.deploy.archive import load_sparse_state_dict
from lightning_prune.deploy.export import export_program
from lightning_prune.deploy.onnx_export import export_onnx, onnx_runner

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.linspace(-1, 1, 8).reshape(2, 4)


def net(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _fresh() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


# Each writer: (write(model, path), read(path) -> a tensor that depends on the saved weights, file name).
Writer = tuple[Callable[[nn.Module, Path], Any], Callable[[Path], torch.Tensor], str]
WRITERS: dict[str, Writer] = {
    "save_sparse": (
        lambda m, p: save_sparse(m, p),
        lambda p: load_sparse_state_dict(p)["0.weight"],
        "net.sparse.pt",
    ),
    "save_compact": (
        lambda m, p: save_compact(m, p),
        lambda p: load_compact(_fresh(), p)(X),
        "net.compact.pt",
    ),
    "export_program": (
        lambda m, p: export_program(m, X, p, check=False),
        lambda p: load_program(p).module()(X),
        "net.pt2",
    ),
    "export_onnx": (
        lambda m, p: export_onnx(m, X, p, check=False),
        lambda p: onnx_runner(p, threads=1)(X)[0],
        "net.onnx",
    ),
    "AtomicCheckpointIO": (
        lambda m, p: AtomicCheckpointIO().save_checkpoint({"state_dict": m.state_dict(), "epoch": 3}, p),
        lambda p: AtomicCheckpointIO().load_checkpoint(p)["state_dict"]["0.weight"],
        "last.ckpt",
    ),
}


def _disk_full_after(limit: int) -> Callable[[int, Any], int]:
    """A stand-in for ``os.write`` on a disk with ``limit`` bytes free: writes what fits, then ENOSPC."""
    written = [0]

    def write(fd: int, data: Any) -> int:
        room = limit - written[0]
        if room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = files.os.write(fd, bytes(data[:room]))
        written[0] += n
        return n

    return write


def _fail_writes(monkeypatch, name: str, code: int) -> None:
    """Make the writer ``name`` hit the OS error ``code`` after writing part of the file."""
    if code == errno.ENOSPC:
        monkeypatch.setattr(files, "_os_write", _disk_full_after(100))
    else:

        def refuse(fd: int, data: Any) -> int:
            raise OSError(code, "Read-only file system")

        monkeypatch.setattr(files, "_os_write", refuse)
    if name == "export_onnx":  # the ONNX writer writes its file itself, into the staging folder

        def partial_save(self, destination, **kwargs):
            if code == errno.ENOSPC:
                Path(destination).write_bytes(b"\x08\x09 partial")
            raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Read-only file system")

        monkeypatch.setattr(torch.onnx.ONNXProgram, "save", partial_save)


SLOW_ONNX = pytest.param("export_onnx", marks=pytest.mark.slow)  # an ONNX export takes several seconds


@pytest.mark.parametrize(
    ("name", "code", "reason"),
    [(name, errno.ENOSPC, "the disk is full") for name in WRITERS]
    + [(name, errno.EROFS, "the file system is read-only") for name in WRITERS if name != "export_onnx"]
    + [pytest.param("export_onnx", errno.EROFS, "the file system is read-only", marks=pytest.mark.slow)],
)
def test_a_failed_write_names_the_path_and_reason_and_leaves_the_old_file_loadable(
    tmp_path, monkeypatch, name, code, reason
):
    write, read, file_name = WRITERS[name]
    path = tmp_path / file_name
    write(net(0), path)
    before = read(path)
    old_bytes = path.read_bytes()
    _fail_writes(monkeypatch, name, code)
    with pytest.raises(ArtifactWriteError, match=rf"Could not write '{path}': {reason}") as caught:
        write(net(1), path)
    assert caught.value.errno == code
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert torch.equal(read(path), before)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # no temporary file left


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_parent_that_is_a_file_is_named(tmp_path, name):
    write, _, file_name = WRITERS[name]
    (tmp_path / "plain").write_text("a file, not a folder")
    with pytest.raises(ArtifactWriteError, match=rf"Could not write '.*': its parent '{tmp_path}/plain' is a file"):
        write(net(0), tmp_path / "plain" / "sub" / file_name)
    assert (tmp_path / "plain").read_text() == "a file, not a folder"


def test_a_folder_in_place_of_the_file_is_named(tmp_path):
    (tmp_path / "model.pt").mkdir()
    with pytest.raises(ArtifactWriteError, match=r"model\.pt': the path is a folder; give a file name"):
        save_sparse(net(0), tmp_path / "model.pt")


def _flip_weight_byte(path: Path, weight: torch.Tensor) -> None:
    """Change one byte inside the stored bytes of ``weight`` (torch.save stores tensors uncompressed)."""
    data = bytearray(path.read_bytes())
    needle = weight.detach().contiguous().numpy().tobytes()[:16]
    at = data.find(needle)
    assert at >= 0, "the weight's bytes are not in the file"
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["save_sparse", "save_compact", "AtomicCheckpointIO"])
def test_flipped_weight_bytes_are_refused_naming_the_file(tmp_path, name):
    write, read, file_name = WRITERS[name]
    path = tmp_path / file_name
    model = net(0)
    write(model, path)
    weight = model[0].weight
    if name == "save_sparse":  # the archive keeps the nonzero values in its byte blob: dense weights stay dense
        weight = weight.flatten()
    _flip_weight_byte(path, weight)
    with pytest.raises(ValueError, match=rf"'{path}' is damaged: its content does not match the digest"):
        read(path)


@pytest.mark.parametrize("name", ["export_program", SLOW_ONNX])
def test_flipped_export_bytes_are_refused_by_the_sidecar_digest(tmp_path, name):
    write, read, file_name = WRITERS[name]
    path = tmp_path / file_name
    model = net(0)
    write(model, path)
    assert verify_sidecar(path) is True
    _flip_weight_byte(path, model[0].weight)
    with pytest.raises(
        ValueError, match=rf"'{path}' is damaged: its bytes do not match the digest in '{path}\.sha256'"
    ):
        read(path)


def test_files_written_without_a_digest_still_load(tmp_path):
    model = net(0)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "plain.ckpt")
    loaded = AtomicCheckpointIO().load_checkpoint(tmp_path / "plain.ckpt")
    assert torch.equal(loaded["state_dict"]["0.weight"], model[0].weight)


def test_the_checkpoint_digest_is_removed_on_load(tmp_path):
    AtomicCheckpointIO().save_checkpoint({"epoch": 3}, tmp_path / "a.ckpt")
    assert CHECKPOINT_DIGEST_KEY in torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "a.ckpt") == {"epoch": 3}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"The checkpoint '.*a\.ckpt' is empty \(0 bytes\): it was not written completely"),
        (b"epoch: 3\nweights: none\n", r"'.*a\.ckpt' is not a checkpoint written by torch\.save \(not a zip archive"),
        (None, r"The checkpoint '.*a\.ckpt' is damaged or truncated \(\d+ bytes; torch\.load failed"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_damaged_checkpoints_get_a_message_naming_the_file(tmp_path, content, message):
    path = tmp_path / "a.ckpt"
    if content is None:
        AtomicCheckpointIO().save_checkpoint({"state_dict": net(0).state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        AtomicCheckpointIO().load_checkpoint(path)


def test_a_truncated_compact_file_is_named(tmp_path):
    path = save_compact(net(0), tmp_path / "c.pt")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"The compact model '.*c\.pt' is damaged or truncated \(300 bytes"):
        load_compact(_fresh(), path)


def test_load_torch_file_refuses_objects_other_than_tensors_without_unsafe_advice(tmp_path):
    torch.save({"f": Path("x")}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match=r"holds Python objects other than tensors and plain values") as caught:
        load_torch_file(tmp_path / "obj.pt", "compact model")
    assert "weights_only=False" not in str(caught.value)


def test_atomic_text_replaces_the_file_whole(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "metrics.json", '{"status": "ok"}\n')
    monkeypatch.setattr(files, "_os_write", _disk_full_after(3))
    with pytest.raises(ArtifactWriteError, match=r"metrics\.json': the disk is full"):
        atomic_write_text(path, '{"status": "ok", "more": 1}\n')
    assert path.read_text() == '{"status": "ok"}\n'
