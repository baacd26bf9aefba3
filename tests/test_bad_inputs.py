"""Every bad input found so far gets a clear error or a warning: one table of cases, so the count only grows.

Each case names what it feeds in, the exception (or warning) expected and the message, matched in full enough
that a vaguer message fails. ``CASES`` are API calls, ``LIGHTNING_CASES`` need a ``Trainer`` run,
``JOB_CASES`` are configs of the Hydra job (``train(cfg)``, whose errors ``scripts/train.py`` prints on one
line: :func:`lightning_prune.app.errors.is_user_error`), and one subprocess checks that one-line output.
"""

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _checks import CONF, ROOT, tiny_trainer
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune._files as files
from lightning_prune import PruningCallback
from lightning_prune._files import ArtifactWriteError
from lightning_prune.app.errors import is_user_error
from lightning_prune.app.train import resolve_output_dir, train
from lightning_prune.callbacks.checkpointing import AtomicCheckpointIO
from lightning_prune.deploy import compact, load_compact, save_compact, save_sparse
from lightning_prune.deploy.archive import load_sparse_state_dict
from lightning_prune.deploy.export import export_program
from lightning_prune.deploy.onnx_export import export_onnx
from lightning_prune.structures.channel import prune_channels_

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


def nan_net() -> nn.Module:
    net = mlp()
    prune_channels_(net, torch.randn(2, 4), sparsity=0.5)
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")  # a kept channel: the outputs are NaN
    net[0].weight.data[net[0].weight.abs().sum(1) == 0] = 0.0
    return net


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _text(path: Path) -> Path:
    path.write_text("epoch: 3\n")
    return path


def _truncated_checkpoint(path: Path) -> Path:
    AtomicCheckpointIO().save_checkpoint({"state_dict": mlp().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:400])
    return path


def _truncated_compact(path: Path) -> Path:
    save_compact(mlp(), path)
    path.write_bytes(path.read_bytes()[:400])
    return path


def _flipped(path: Path, write: Callable[[nn.Module, Path], Any]) -> Path:
    net = mlp()
    write(net, path)
    data = bytearray(path.read_bytes())
    at = data.find(net[0].weight.detach().numpy().tobytes()[:16])
    assert at >= 0
    data[at + 3] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def _blocked(tmp: Path) -> Path:
    (tmp / "file").write_text("a file")
    return tmp / "file" / "out.pt"


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_os_write", full)


def _ckpt_io_load(path: Path) -> Any:
    return AtomicCheckpointIO().load_checkpoint(path)


X = torch.randn(2, 4)

# (id, call(tmp_path, monkeypatch), exception, message regex)
CASES: list[tuple[str, Callable[[Path, pytest.MonkeyPatch], Any], type[BaseException], str]] = [
    (
        "PruningCallback(ignore=None)",
        lambda t, m: PruningCallback(sparsity=0.5, ignore=None),
        MisconfigurationException,
        r"`ignore` must be a list of module-name patterns \(e\.g\. \['head'\], or \[\] for none\), got None",
    ),
    (
        "PruningCallback(finetune_lr_scale=inf)",
        lambda t, m: PruningCallback(sparsity=0.5, finetune_lr_scale=float("inf")),
        MisconfigurationException,
        r"`finetune_lr_scale` must be a finite number > 0 .*got inf",
    ),
    (
        "save_sparse(model, None)",
        lambda t, m: save_sparse(mlp(), None),
        TypeError,
        r"`path` must be a file path \(a str or pathlib\.Path\), got None",
    ),
    (
        "save_compact(model, None)",
        lambda t, m: save_compact(mlp(), None),
        TypeError,
        r"`path` must be a file path \(a str or pathlib\.Path\), got None",
    ),
    (
        "export_program(inputs of the wrong rank)",
        lambda t, m: export_program(mlp(), torch.randn(2, 3)),
        ValueError,
        r"`example_inputs` \(\(2, 3\) float32\) do not run through Sequential: RuntimeError: mat1 and mat2 shapes",
    ),
    (
        "export_onnx(int64 inputs)",
        lambda t, m: export_onnx(mlp(), torch.ones(2, 4, dtype=torch.long), t / "m.onnx"),
        ValueError,
        r"`example_inputs` \(\(2, 4\) int64\) do not run through Sequential: RuntimeError: .*dtype",
    ),
    (
        "export_onnx(opset_version=3)",
        lambda t, m: export_onnx(mlp(), X, t / "m.onnx", opset_version=3),
        ValueError,
        r"`opset_version` must be at least 18 \(the lowest the exporter writes; .*got 3",
    ),
    (
        "compact(rtol=-1)",
        lambda t, m: compact(mlp(), X, rtol=-1),
        ValueError,
        r"`rtol` must be a finite number >= 0 \(e\.g\. 1e-4\), got -1",
    ),
    (
        "compact(NaN weights)",
        lambda t, m: compact(nan_net(), X),
        RuntimeError,
        r"The original model's outputs on `example_inputs` are not finite \(NaN or inf\)",
    ),
    (
        "load_compact(truncated file)",
        lambda t, m: load_compact(mlp(), _truncated_compact(t / "c.pt")),
        ValueError,
        r"The compact model '.*c\.pt' is damaged or truncated \(400 bytes; torch\.load failed",
    ),
    (
        "load_compact(flipped bytes)",
        lambda t, m: load_compact(mlp(), _flipped(t / "c.pt", save_compact)),
        ValueError,
        r"'.*c\.pt' is damaged: its content does not match the digest written with it",
    ),
    (
        "load_sparse(flipped bytes)",
        lambda t, m: load_sparse_state_dict(_flipped(t / "s.pt", save_sparse)),
        ValueError,
        r"'.*s\.pt' is damaged: its content does not match the digest written with it",
    ),
    (
        "checkpoint: empty",
        lambda t, m: _ckpt_io_load(_empty(t / "a.ckpt")),
        ValueError,
        r"The checkpoint '.*a\.ckpt' is empty \(0 bytes\): it was not written completely",
    ),
    (
        "checkpoint: a text file",
        lambda t, m: _ckpt_io_load(_text(t / "a.ckpt")),
        ValueError,
        r"'.*a\.ckpt' is not a checkpoint written by torch\.save \(not a zip archive; 9 bytes\); check the path",
    ),
    (
        "checkpoint: truncated",
        lambda t, m: _ckpt_io_load(_truncated_checkpoint(t / "a.ckpt")),
        ValueError,
        r"The checkpoint '.*a\.ckpt' is damaged or truncated \(400 bytes; torch\.load failed",
    ),
    (
        "checkpoint: flipped bytes",
        lambda t, m: _ckpt_io_load(
            _flipped(t / "a.ckpt", lambda n, p: AtomicCheckpointIO().save_checkpoint({"state_dict": n.state_dict()}, p))
        ),
        ValueError,
        r"The checkpoint '.*a\.ckpt' is damaged: its content does not match the digest",
    ),
    (
        "save_sparse under a file",
        lambda t, m: save_sparse(mlp(), _blocked(t)),
        ArtifactWriteError,
        r"Could not write '.*file/out\.pt': its parent '.*file' is a file, not a folder; choose another path",
    ),
    (
        "AtomicCheckpointIO under a file",
        lambda t, m: AtomicCheckpointIO().save_checkpoint({"epoch": 1}, _blocked(t)),
        ArtifactWriteError,
        r"Could not write '.*file/out\.pt': its parent '.*file' is a file, not a folder",
    ),
    (
        "save_compact on a full disk",
        lambda t, m: (_disk_full(m), save_compact(mlp(), t / "c.pt")),
        ArtifactWriteError,
        r"Could not write '.*c\.pt': the disk is full \(no space left on the device\)",
    ),
    (
        "output_dir inside a regular file",
        lambda t, m: resolve_output_dir(_compose_bare([f"output_dir='{_blocked(t).parent}/run'"])),
        ValueError,
        r"output_dir='.*file/run': cannot hold the run's files: its parent '.*file' is a file, not a folder",
    ),
]


def _compose_bare(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize(("call", "error", "message"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_a_bad_input_gets_a_clear_error(tmp_path, monkeypatch, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path, monkeypatch)


def test_numpy_scalars_are_sparsities_like_python_floats():
    assert PruningCallback(sparsity=np.float32(0.5)).sparsity == 0.5
    assert PruningCallback(sparsity=np.float64(0.25)).sparsity == 0.25


# ---------------------------------------------------------------------------------------------- with a Trainer
class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = mlp().train()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)), 8)


def _fit(root: Path, callback: PruningCallback, max_epochs: int, model: pl.LightningModule | None = None, **kw):
    trainer = tiny_trainer(root, [callback], max_epochs, **kw)
    trainer.fit(model or Net(), data())
    return trainer


def _edited_target(tmp: Path) -> None:
    callback = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=0)
    trainer = tiny_trainer(tmp, [callback], 1, plugins=[AtomicCheckpointIO()])
    trainer.fit(Net(), data())
    trainer.save_checkpoint(tmp / "a.ckpt")
    checkpoint = torch.load(tmp / "a.ckpt", weights_only=True)

    def edit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "target" and isinstance(value, float):
                    node[key] = "half"
                else:
                    edit(value)

    edit(checkpoint["callbacks"])
    checkpoint.pop("lightning_prune_digest")  # as a hand edit of a plain Lightning checkpoint would leave it
    torch.save(checkpoint, tmp / "edited.ckpt")
    again = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=0)
    tiny_trainer(tmp, [again], 2, plugins=[AtomicCheckpointIO()]).fit(Net(), data(), ckpt_path=tmp / "edited.ckpt")


def _resume_flipped(tmp: Path) -> None:
    trainer = tiny_trainer(tmp, [], 1, plugins=[AtomicCheckpointIO()])
    model = Net()
    trainer.fit(model, data())
    trainer.save_checkpoint(tmp / "a.ckpt")
    data_bytes = bytearray((tmp / "a.ckpt").read_bytes())
    at = data_bytes.find(model.model[0].weight.detach().numpy().tobytes()[:16])
    assert at >= 0
    data_bytes[at + 2] ^= 0x04
    (tmp / "a.ckpt").write_bytes(bytes(data_bytes))
    tiny_trainer(tmp, [], 2, plugins=[AtomicCheckpointIO()]).fit(Net(), data(), ckpt_path=tmp / "a.ckpt")


LIGHTNING_CASES = [
    pytest.param(
        _resume_flipped,
        ValueError,
        r"The checkpoint '.*a\.ckpt' is damaged: its content does not match the digest written with it",
        id="Trainer.fit(ckpt_path=checkpoint with flipped bytes)",
    ),
    pytest.param(
        _edited_target,
        MisconfigurationException,
        r"PruningCallback cannot resume: the checkpoint's pruning state has the target 'half', not a sparsity in "
        r"\[0, 1\); the checkpoint was edited or damaged",
        id="checkpoint: saved target edited to a string",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), LIGHTNING_CASES)
def test_a_bad_input_to_a_fit_gets_a_clear_error(tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_start_epoch_after_the_last_epoch_warns_with_the_values_set(tmp_path):
    callback = PruningCallback(sparsity=0.5, schedule="linear", start_epoch=5)
    with pytest.warns(UserWarning, match=r"`start_epoch`=5, but the Trainer stops after epoch 2 \(`max_epochs`=3\)"):
        _fit(tmp_path, callback, 3)
    assert callback.achieved_sparsity == 0.0


def test_max_steps_before_the_schedule_ends_warns(tmp_path):
    callback = PruningCallback(sparsity=0.5, schedule="linear", start_epoch=0, end_epoch=3)
    with pytest.warns(
        UserWarning, match=r"training stopped after 2 steps \(`max_steps`=2\), before the schedule's last"
    ):
        _fit(tmp_path, callback, 5, max_steps=2)
    assert callback.achieved_sparsity < 0.5


def test_a_callback_reused_for_a_second_model_prunes_it_too_and_warns(tmp_path):
    callback = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=0)
    _fit(tmp_path, callback, 1)
    with pytest.warns(UserWarning, match=r"another model"):
        _fit(tmp_path, callback, 1, model=Net())
    assert callback.achieved_sparsity == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------------------------------------- the Hydra job
FAST = [
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "pruning.start_epoch=0",
    "pruning.end_epoch=1",
    "model.channels=[8,16]",
    "model.hidden=32",
]

JOB_CASES = [
    pytest.param(
        ["ckpt_path=/no/such/last.ckpt"],
        FileNotFoundError,
        r"ckpt_path='/no/such/last\.ckpt': no such checkpoint",
        id="missing ckpt_path",
    ),
    pytest.param(
        ["pruning.ignore=[nonexistent]"],
        MisconfigurationException,
        r"nonexistent",
        id="pruning.ignore=[nonexistent]",
    ),
    pytest.param(
        ["data=mnist", "data.root={tmp}/no-data"],
        FileNotFoundError,
        r"MNISTDataModule: dataset files not found under `root`='.*no-data'",
        id="missing MNIST root",
    ),
    pytest.param(
        ["data=cifar10", "model=resnet20", "data.root={tmp}"],
        FileNotFoundError,
        r"CIFAR10DataModule: dataset files not found under `root`=",
        id="empty CIFAR root",
    ),
]


@pytest.mark.parametrize(("overrides", "error", "message"), JOB_CASES)
def test_a_bad_job_config_gets_a_one_line_error(tmp_path, overrides, error, message):
    fast = [o for o in FAST if not (o.startswith("model.") and any(x.startswith("model=") for x in overrides))]
    cfg = _compose_bare([*fast, *[o.format(tmp=tmp_path) for o in overrides], f"output_dir='{tmp_path}/run'"])
    with pytest.raises(error, match=message) as caught:
        train(cfg)
    assert is_user_error(caught.value)  # scripts/train.py prints it alone, without the traceback


def test_the_script_prints_one_line_for_an_output_dir_inside_a_file(tmp_path):
    (tmp_path / "file").write_text("a file")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), f"output_dir={tmp_path}/file/run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        check=False,
        timeout=600,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"output_dir='{tmp_path}/file/run': cannot hold the run's files: its parent" in done.stderr
