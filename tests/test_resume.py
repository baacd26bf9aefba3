"""Interruption and loading: runs killed by SIGKILL at any point and resumed from their last checkpoint end exactly as
uninterrupted runs; checkpoints are written atomically; checkpoints of other configurations are refused clearly."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _checks import CONF, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import ChannelStructure, CubicSchedule, LinearSchedule, PruningCallback
from lightning_prune._files import atomic_save
from lightning_prune.callbacks.checkpointing import AtomicCheckpointIO, RandomStateCheckpoint
from lightning_prune.data import EpochShuffleSampler

JOB = Path(__file__).with_name("_resume_job.py")


def run_job(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(JOB), str(run_dir), *args], capture_output=True, text=True, env=env, timeout=300
    )


def finish(run_dir: Path, *args: str) -> dict:
    done = run_job(run_dir, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(run_dir / "final.pt", weights_only=True)


def kill(run_dir: Path, when: str, *args: str, checkpointed: bool = True) -> None:
    killed = run_job(run_dir, "--kill", when, *args)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    last = run_dir / "last.ckpt"
    assert last.exists() is checkpointed, sorted(p.name for p in run_dir.iterdir())
    if checkpointed:  # the newest checkpoint is whole whatever the moment of the kill: it loads
        state = torch.load(last, weights_only=True)
        assert "state_dict" in state and any(k.startswith("PruningCallback") for k in state["callbacks"])


def assert_same_run(expected: dict, got: dict) -> None:
    assert got["sparsity"] == expected["sparsity"]
    assert expected["masks"].keys() == got["masks"].keys()
    for name in expected["masks"]:
        assert torch.equal(expected["masks"][name], got["masks"][name]), f"mask of {name} differs"
    assert expected["model"].keys() == got["model"].keys()
    for name in expected["model"]:
        assert torch.equal(expected["model"][name], got["model"][name]), f"{name} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final state of an uninterrupted run, per structure (each computed once)."""
    runs: dict[str, dict] = {}

    def get(structure: str = "unstructured") -> dict:
        if structure not in runs:
            runs[structure] = finish(tmp_path_factory.mktemp(f"uninterrupted-{structure}"), "--structure", structure)
        return runs[structure]

    return get


def test_killed_three_times_and_resumed_ends_as_the_uninterrupted_run(reference, tmp_path):
    # Mid-epoch before the first checkpoint, right after a pruning step, and halfway through writing a checkpoint;
    # every run starts from the last checkpoint when there is one (Lightning's `ckpt_path="last"`). Channel pruning:
    # its masks span BatchNorm entries and their momentum too (single weights: the slow test below).
    channel = ("--structure", "channel")
    kill(tmp_path, "batch:0:3", *channel, checkpointed=False)
    kill(tmp_path, "after_pruning:2", "--resume", *channel)
    kill(tmp_path, "saving:3", "--resume", *channel)
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # the half-written file, never `last.ckpt`
    resumed = finish(tmp_path, "--resume", *channel)
    assert_same_run(reference("channel"), resumed)
    assert resumed["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # cleaned up by the next save


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["unstructured", "channel"])
@pytest.mark.parametrize(
    "when",
    ["epoch_start:3", "batch:2:3", "after_pruning:1", "after_pruning:4", "batch:5:1", "saving:2", "saving:6"],
    ids=[
        "between-epochs",
        "mid-epoch",
        "after-first-pruning",
        "after-last-pruning",
        "fine-tuning",
        "saving",
        "saving-last",
    ],
)
def test_a_kill_at_any_point_resumes_exactly(reference, tmp_path, structure, when):
    kill(tmp_path, when, "--structure", structure)
    assert_same_run(reference(structure), finish(tmp_path, "--resume", "--structure", structure))


# ---------------------------------------------------------------------------------------------- atomic checkpoints
def test_an_interrupted_save_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_save({"epoch": 1, "weights": torch.arange(10)}, target)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if the process were stopped in the middle of writing

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_atomic_save_replaces_and_keeps_the_usual_file_mode(tmp_path):
    target = tmp_path / "sub" / "model.pt"
    atomic_save({"a": 1}, target)
    atomic_save({"a": 2}, target)
    assert torch.load(target, weights_only=True) == {"a": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    # A file left by a process killed while writing is removed by the next save to the same path.
    (target.parent / ".model.pt.123.abcd.partial").write_bytes(b"junk")
    atomic_save({"a": 3}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]


class Net(pl.LightningModule):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 32), nn.ReLU())
            self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 3, (64,), generator=g))
    return DataLoader(dataset, batch_size=16, sampler=EpochShuffleSampler(dataset, seed=2))


def fit(root: Path, callbacks, max_epochs: int, model: Net, ckpt_path=None, **kwargs) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", True)  # the runs here write and resume checkpoints
    trainer = tiny_trainer(root, callbacks, max_epochs, **kwargs)
    trainer.fit(model, data(), ckpt_path=ckpt_path)
    return trainer


def test_trainer_writes_its_checkpoints_through_the_atomic_writer(tmp_path, monkeypatch):
    import lightning_prune.callbacks.checkpointing as checkpointing

    written = []

    def counting_save(obj, path):
        written.append(Path(path).name)
        return atomic_save(obj, path)

    monkeypatch.setattr(checkpointing, "atomic_save", counting_save)
    pruning = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = fit(tmp_path, [pruning, ckpt], 2, Net(), plugins=[AtomicCheckpointIO()])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert "last.ckpt" in written  # every checkpoint went through atomic_save
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1
    with pytest.raises(TypeError, match="storage_options"):
        trainer.strategy.checkpoint_io.save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})


@pytest.mark.parametrize("with_random_state", [True, False], ids=["random-state", "without"])
def test_random_states_make_a_resumed_dropout_run_exact(tmp_path, with_random_state):
    def callbacks():
        extra = [RandomStateCheckpoint()] if with_random_state else []
        return [PruningCallback(sparsity=0.7, schedule="linear", start_epoch=1, end_epoch=3), *extra]

    full = Net(dropout=0.5)
    pl.seed_everything(0, verbose=False)
    fit(tmp_path / "full", callbacks(), 5, full)
    pl.seed_everything(0, verbose=False)
    fit(tmp_path / "part", [*callbacks(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], 2, Net(0.5))
    resumed = Net(dropout=0.5)
    pl.seed_everything(0, verbose=False)  # a new process starts from the seed, not from where the run stopped
    fit(tmp_path / "resumed", callbacks(), 5, resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    same = all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    assert same is with_random_state


def test_random_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    callback = RandomStateCheckpoint()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    atomic_save(callback.state_dict(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    callback.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


# ---------------------------------------------------------------------------------------------- loading
def first_run(tmp_path: Path, pruning: PruningCallback, max_epochs: int = 2) -> Path:
    fit(tmp_path / "first", [pruning, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs, Net())
    return tmp_path / "ckpt" / "last.ckpt"


def test_an_unstructured_checkpoint_loads_into_a_fresh_model(tmp_path):
    pruning = PruningCallback(sparsity=0.75, schedule="one_shot", start_epoch=0)
    path = first_run(tmp_path, pruning)
    fresh = Net.load_from_checkpoint(path)  # strict: the model's own keys, no masks or reparametrisation
    named = dict(fresh.named_parameters())
    for name, mask in zip(pruning.masks.names, pruning.masks.masks):
        assert bool((named[name][~mask] == 0).all()), name
    zeros = sum(int((named[n] == 0).sum()) for n in pruning.masks.names)
    assert zeros == round(0.75 * pruning.masks.numel())


def test_a_checkpoint_without_pruning_state_is_resumed_with_a_clear_warning(tmp_path):
    path = first_run(tmp_path, PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=5), max_epochs=1)
    state = torch.load(path, weights_only=True)
    state["callbacks"] = {k: v for k, v in state["callbacks"].items() if not k.startswith("PruningCallback")}
    torch.save(state, tmp_path / "dense.ckpt")
    pruning = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=1)
    with pytest.warns(UserWarning, match="holds no pruning state .* masks start dense"):
        fit(tmp_path / "again", [pruning], 3, Net(), ckpt_path=tmp_path / "dense.ckpt")
    assert pruning.achieved_sparsity == pytest.approx(0.5, abs=1e-3)


def test_a_checkpoint_of_another_structure_configuration_is_refused(tmp_path):
    path = first_run(tmp_path, PruningCallback(sparsity=0.5, structure=ChannelStructure(round_to=2), start_epoch=0))
    other = PruningCallback(sparsity=0.5, structure=ChannelStructure(round_to=4), start_epoch=0)
    with pytest.raises(
        MisconfigurationException, match=r"made by ChannelStructure\(round_to=2.*prunes with .*round_to=4"
    ):
        fit(tmp_path / "again", [other], 3, Net(), ckpt_path=path)


def test_a_schedule_below_the_saved_masks_is_refused(tmp_path):
    path = first_run(tmp_path, PruningCallback(schedule=LinearSchedule(0.8, start_epoch=0, end_epoch=1)))
    lower = PruningCallback(schedule=LinearSchedule(0.4, start_epoch=0, end_epoch=1))
    with pytest.raises(
        MisconfigurationException, match=r"grown to a target of 0\.8.*asks for 0\.4 at epoch 2.*never revived"
    ):
        fit(tmp_path / "again", [lower], 4, Net(), ckpt_path=path)


def test_another_schedule_or_importance_continues_from_the_saved_masks_with_a_warning(tmp_path):
    path = first_run(tmp_path, PruningCallback(schedule=LinearSchedule(0.5, start_epoch=0, end_epoch=1)))
    longer = PruningCallback(schedule=CubicSchedule(0.8, start_epoch=0, end_epoch=3), importance="l2")
    with pytest.warns(
        UserWarning, match=r"another pruning configuration \(schedule LinearSchedule.*-> CubicSchedule.*importance"
    ):
        fit(tmp_path / "again", [longer], 4, Net(), ckpt_path=path)
    assert longer.achieved_sparsity == pytest.approx(0.8, abs=1e-3)


def test_a_checkpoint_of_the_previous_state_layout_still_resumes(tmp_path):
    pruning = PruningCallback(sparsity=0.6, schedule="one_shot", start_epoch=0)
    path = first_run(tmp_path, pruning)
    state = torch.load(path, weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("PruningCallback")]
    saved = state["callbacks"][key]
    state["callbacks"][key] = {k: saved[k] for k in ("masks", "target", "schedule", "lr_scaled")}  # version 1
    torch.save(state, tmp_path / "v1.ckpt")
    again = PruningCallback(sparsity=0.6, schedule="one_shot", start_epoch=0)
    fit(tmp_path / "again", [again], 3, Net(), ckpt_path=tmp_path / "v1.ckpt")
    for a, b in zip(pruning.masks.masks, again.masks.masks):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- the Hydra main job
# The main job, small: 4 epochs, pruning over epochs 1-2, with channels trimmed for speed.
MAIN_JOB = [
    "trainer.max_epochs=4",
    "trainer.enable_progress_bar=false",
    "model.channels=[8,16]",
    "model.hidden=32",
    "pruning.start_epoch=1",
    "pruning.end_epoch=2",
]


def train_main_job(overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from lightning_prune.app.train import train

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        train(compose(config_name="config", overrides=[*MAIN_JOB, *overrides]))


def test_the_main_job_stopped_and_resumed_with_ckpt_path_last_ends_as_an_uninterrupted_run(tmp_path):
    import json

    train_main_job([f"output_dir={tmp_path / 'full'}"])
    # Stopped after two epochs (as if killed then), then the same command with ckpt_path=last.
    steps = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] // 4
    train_main_job([f"output_dir={tmp_path / 'part'}", f"trainer.max_steps={2 * steps}"])
    assert torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * steps
    train_main_job([f"output_dir={tmp_path / 'part'}", "ckpt_path=last"])
    full, part = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True) for d in ("full", "part"))
    for key, value in full["state_dict"].items():
        assert torch.equal(value, part["state_dict"][key]), key
    metrics = {d: json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "part")}
    for key in ("dense_test_acc", "pruned_test_acc", "sparsity", "nonzero_params", "layer_sparsity"):
        assert metrics["full"][key] == metrics["part"][key], key


def test_ckpt_path_last_without_a_checkpoint_starts_afresh_and_a_missing_file_is_an_error(tmp_path):
    from omegaconf import OmegaConf

    from lightning_prune.app.train import resume_path

    assert resume_path(OmegaConf.create({"ckpt_path": "last"}), tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_path(OmegaConf.create({"ckpt_path": "last"}), tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='nowhere.ckpt': no such checkpoint.*ckpt_path=last"):
        resume_path(OmegaConf.create({"ckpt_path": "nowhere.ckpt"}), tmp_path)
