"""A LightningCLI user adds the PruningCallback from a YAML file."""

import textwrap

import torch
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


NULL_DEFAULTS = """
trainer:
  max_epochs: 3
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_prune.PruningCallback
      init_args: {sparsity: 0.5}
"""


def test_the_nulls_print_config_shows_mean_what_the_readme_says(tmp_path, monkeypatch):
    """``--print_config`` shows ``null`` for four defaults; the README says what each means, and a fit agrees."""
    (tmp_path / "tiny_cli_module.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "config.yaml").write_text(NULL_DEFAULTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from tiny_cli_module import TinyData, TinyModel

    cli = LightningCLI(
        TinyModel,
        TinyData,
        args=["fit", "--config", str(tmp_path / "config.yaml"), f"--trainer.default_root_dir={tmp_path}"],
        save_config_kwargs={"overwrite": True},
    )
    [shown] = [c for c in cli.config.fit.trainer.callbacks if c.class_path.endswith("PruningCallback")]
    assert {k: shown.init_args[k] for k in ("start_epoch", "end_epoch", "every_n_epochs", "scope")} == dict.fromkeys(
        ("start_epoch", "end_epoch", "every_n_epochs", "scope")
    )
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert (
        "`start_epoch: null` is 0, `end_epoch: null` the last epoch (`max_epochs - 1`), `every_n_epochs: null` is 1 "
        'and `scope: null` is `"global"` (or `"layer"` when `sparsity` maps layers to their own targets).'
    ) in readme
    [pruning] = [c for c in cli.trainer.callbacks if isinstance(c, PruningCallback)]
    schedule = pruning.schedule
    assert (schedule.start_epoch, schedule.end_epoch, schedule.every_n_epochs) == (0, 2, 1)
    assert pruning.scope == "global"
    assert PruningCallback(sparsity={"net.0.weight": 0.5}).scope == "layer"
