"""``MaskInvariantChecker`` passes on correct runs and catches each kind of broken promise."""

import csv

import lightning.pytorch as pl
import pytest
import torch
from _checks import CONF, tiny_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import InvariantViolation, MaskInvariantChecker, PruningCallback


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
            self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(callbacks, max_epochs: int = 4, **kwargs) -> pl.Trainer:
    g = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 2, (32,), generator=g)), batch_size=8
    )
    trainer = tiny_trainer(None, callbacks, max_epochs, **kwargs)
    trainer.fit(Net(), data)
    return trainer


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_correct_run_passes_every_check(scope):
    checker = MaskInvariantChecker()
    fit(
        [PruningCallback(sparsity=0.7, schedule="linear", start_epoch=0, end_epoch=2, scope=scope), checker],
        accumulate_grad_batches=2,
    )
    assert checker.checks == 4 + 4 * 4  # one per epoch start and one per batch


class Sabotage(pl.Callback):
    """Breaks one promise at the end of epoch 1's second batch."""

    def __init__(self, how: str) -> None:
        self.how = how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch != 1 or batch_idx != 1:
            return
        pruning = next(c for c in trainer.callbacks if isinstance(c, PruningCallback))
        masks = pruning.masks
        pruned = (~masks.masks[0]).nonzero()[0].tolist()
        with torch.no_grad():
            if self.how == "weight":
                masks.params[0][tuple(pruned)] = 1.0
            elif self.how == "momentum":
                trainer.optimizers[0].state[masks.params[0]]["momentum_buffer"][tuple(pruned)] = 1.0
            elif self.how == "revive":
                masks.masks[0][tuple(pruned)] = True
            elif self.how == "count":
                kept = masks.masks[0].nonzero()[0].tolist()
                masks.masks[0][tuple(kept)] = False
                masks.params[0][tuple(kept)] = 0.0
                trainer.optimizers[0].state[masks.params[0]]["momentum_buffer"][tuple(kept)] = 0.0


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("weight", r"epoch 1, step \d+ \(optimizer step\): a pruned entry of body.0.weight is not zero"),
        ("momentum", r"optimizer state 'momentum_buffer' of a pruned entry of body.0.weight is not zero"),
        ("revive", r"a pruned entry of body.0.weight was revived"),
        ("count", r"of 160 entries are pruned, the schedule's target 0.5 asks for 80"),
    ],
)
def test_each_broken_promise_is_caught(how, match):
    # The sabotage runs before the checker (list order), right after the batch's optimizer step.
    pruning = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=0)
    with pytest.raises(InvariantViolation, match=match):
        fit([pruning, Sabotage(how), MaskInvariantChecker()])


@pytest.mark.parametrize("checker_first", [True, False])
def test_the_checker_sees_every_pruning_step_wherever_it_is_in_the_list(checker_first):
    pruning = PruningCallback(sparsity=0.7, schedule="linear", start_epoch=0, end_epoch=2)
    checker = MaskInvariantChecker(pruning=pruning)
    fit([checker, pruning] if checker_first else [pruning, checker])
    assert checker.checks == 4 + 4 * 4  # one right after each epoch's pruning step and one per batch


def test_the_checker_is_told_which_pruning_callback_to_check():
    first, second = PruningCallback(sparsity=0.5), PruningCallback(sparsity=0.5, scope="layer")
    with pytest.raises(MisconfigurationException, match=r"found 2: pass the one to use as `pruning=`"):
        fit([MaskInvariantChecker(), first, second], max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"its `pruning` callback is not among the Trainer's"):
        fit([MaskInvariantChecker(pruning=first)], max_epochs=1)
    with pytest.raises(TypeError, match=r"`pruning` must be a PruningCallback, got str"):
        MaskInvariantChecker(pruning="magnitude")  # type: ignore[arg-type]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`check_ranks_every_n_steps` must be >= 0, got -1"):
        MaskInvariantChecker(check_ranks_every_n_steps=-1)
    with pytest.raises(TypeError, match="must be an integer"):
        MaskInvariantChecker(check_ranks_every_n_steps=1.5)  # type: ignore[arg-type]


def test_the_main_job_with_the_invariants_callbacks_group(tmp_path):
    from hydra import compose, initialize_config_dir

    from lightning_prune.app.train import train

    overrides = ["callbacks=invariants", "trainer.max_epochs=3", "pruning.start_epoch=0", "pruning.end_epoch=1"]
    overrides += ["model.channels=[8,16]", "model.hidden=32", "trainer.enable_progress_bar=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        train(compose(config_name="config", overrides=[*overrides, f"output_dir={tmp_path}"]))
    with open(next(tmp_path.glob("csv/version_0/metrics.csv"))) as f:
        checks = [float(r["invariants/checks"]) for r in csv.DictReader(f) if r.get("invariants/checks")]
    assert checks == sorted(checks) and checks[-1] > 3 * 10  # every batch of every epoch was checked
