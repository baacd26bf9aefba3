"""A LightningCLI user adds the PruningCallback from a YAML file."""

import inspect
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from _checks import ROOT
from lightning.pytorch.cli import LightningCLI

from lightning_prune import PruningCallback

MODULE = """
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyModel(L.LightningModule):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(L.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 8, generator=g)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
"""

CONFIG = """
trainer:
  max_epochs: 2
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_prune.PruningCallback
      init_args:
        sparsity: 0.75
        schedule: linear
        start_epoch: 0
        end_epoch: 1
        ignore: [net.2]
model:
  hidden: 16
"""


def test_lightning_cli_adds_the_pruning_callback_from_yaml(tmp_path, monkeypatch):
    (tmp_path / "tiny_cli_module.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "config.yaml").write_text(CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from tiny_cli_module import TinyData, TinyModel

    cli = LightningCLI(
        TinyModel,
        TinyData,
        args=["fit", "--config", str(tmp_path / "config.yaml"), f"--trainer.default_root_dir={tmp_path}"],
        save_config_kwargs={"overwrite": True},
    )
    [pruning] = [c for c in cli.trainer.callbacks if isinstance(c, PruningCallback)]
    assert cli.trainer.current_epoch == 2
    assert pruning.schedule.end_epoch == 1 and pruning.ignore == ("net.2",)
    assert pruning.achieved_sparsity == 0.75
    first = cli.model.net[0].weight
    assert int((first == 0).sum()) == round(0.75 * first.numel())
    assert torch.count_nonzero(cli.model.net[2].weight) == cli.model.net[2].weight.numel()  # ignored


SCRIPT = ROOT / "scripts" / "lightning_cli.py"


def _readme_yaml(first_line: str) -> str:
    """The README's YAML block that starts with ``first_line``."""
    blocks = (ROOT / "README.md").read_text().split("```yaml\n")[1:]
    [block] = [b.split("```", 1)[0] for b in blocks if b.startswith(first_line)]
    return block


def test_the_script_fits_the_readme_config_as_a_user_runs_it(tmp_path):
    (tmp_path / "config.yaml").write_text(_readme_yaml("# config.yaml"))
    quick = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks.init_args.start_epoch=0",  # the README's callback, pruning in the one epoch
        "--trainer.callbacks.init_args.end_epoch=0",
    ]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "fit", "--config", "config.yaml", *quick],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "PruningCallback: cubic to 0.9 at epoch 0; first non-zero target 0.9000 at epoch 0." in run.stderr
    [path] = (tmp_path / "checkpoints").glob("*.ckpt")
    weights = torch.load(path, weights_only=False)["state_dict"]
    prunable = [w for k, w in weights.items() if k.endswith(".weight") and w.dim() > 1 and ".head." not in k]
    dense = [w for k, w in weights.items() if k.endswith(".weight") and ".head." in k]
    assert len(prunable) == 3 and len(dense) == 1  # SmallCNN: two convolutions, the hidden Linear, the head
    total = sum(w.numel() for w in prunable)
    assert sum(int((w == 0).sum()) for w in prunable) == round(0.9 * total)  # global 90% over the prunable ones
    assert all(int(torch.count_nonzero(w)) == w.numel() for w in dense)  # ignore: [head]


def test_print_config_shows_the_defaults_the_readme_documents(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.yaml").write_text(_readme_yaml("# config.yaml"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "fit", "--config", "config.yaml", "--print_config"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    # The README quotes the callback's part of the output, word for word.
    shown = textwrap.dedent(_readme_yaml("  - class_path: lightning_prune.PruningCallback"))
    assert textwrap.indent(shown, "  ") in printed
    [callback] = yaml.safe_load(printed)["trainer"]["callbacks"]
    given = {"sparsity": 0.9, "schedule": "cubic", "start_epoch": 10, "end_epoch": 20, "ignore": ["head"]}
    defaults = {k: p.default for k, p in inspect.signature(PruningCallback).parameters.items()}
    assert callback["init_args"] == {**defaults, **given}
    assert {k: callback["init_args"][k] for k in ("every_n_epochs", "scope", "end_epoch")} == {
        "every_n_epochs": 1,
        "scope": "global",
        "end_epoch": 20,
    }
    # The defaults the usage example in the README names.
    readme = (ROOT / "README.md").read_text()
    assert "    every_n_epochs=1,  # the default\n" in readme
    assert '    scope="global",  # the default;' in readme
    assert defaults["every_n_epochs"] == 1 and defaults["scope"] == "global" and defaults["start_epoch"] == 0
