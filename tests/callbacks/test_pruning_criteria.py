"""``PruningCallback`` with the data-driven criteria, per-layer targets, block and N:M patterns, and rewinding, in
real ``Trainer`` runs."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _checks import images, tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_prune import (
    FisherImportance,
    MaskInvariantChecker,
    PruningCallback,
    SensitivityCallback,
    TaylorImportance,
)
from lightning_prune.structures.block import BlockStructure
from lightning_prune.structures.nm import NMStructure


class Net(pl.LightningModule):
    """Conv + BN, a flatten into a hidden layer and a head (8 and 16 prunable channels)."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.optimizer = optimizer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.features = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
            )
            self.body = nn.Sequential(nn.Linear(32, 16), nn.ReLU())
            self.head = nn.Linear(16, 4)
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.features(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=3e-3)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def fit(tmp_path: Path, callbacks, max_epochs: int, model: Net | None = None, ckpt_path=None, val=False, **kwargs):
    model = model or Net()
    val_data = images(32, sampler="epoch", sampler_seed=1) if val else None
    trainer = tiny_trainer(tmp_path, callbacks, max_epochs, **kwargs)
    trainer.fit(model, images(sampler="epoch", sampler_seed=1), val_data, ckpt_path=ckpt_path)
    return model


class Observed(Callback):
    """Records, right after the PruningCallback's epoch start, how many statistics steps served the pruning."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.steps: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == trainer.num_training_batches:
            self.steps[trainer.current_epoch] = self.pruning.importance.steps


# ---------------------------------------------------------------------------------------------- criteria
@pytest.mark.parametrize(
    ("importance", "structure"),
    [
        ("taylor", "unstructured"),
        ("fisher", "unstructured"),
        ("taylor", "channel"),
        ("fisher", "channel"),
        ("apoz", "channel"),
        ("activation", "channel"),
    ],
)
def test_data_driven_criteria_collect_before_each_pruning_epoch(tmp_path, importance, structure):
    pruning = PruningCallback(
        sparsity=0.5,
        schedule="linear",
        start_epoch=1,
        end_epoch=3,
        importance=importance,
        structure=structure,
        importance_batches=4,
        compact=False,
    )
    observed = Observed(pruning)
    fit(tmp_path, [pruning, observed, MaskInvariantChecker()], max_epochs=5)
    # 6 batches per epoch: the last 4 steps of epochs 1 and 2 feed the pruning steps of epochs 2 and 3.
    assert observed.steps[1] == observed.steps[2] == 4
    assert observed.steps[0] == 0 and observed.steps[3] == 0  # epoch 1's linear target is 0: nothing to collect
    assert not pruning.importance.collecting
    assert pruning.achieved_sparsity == pytest.approx(0.5, abs=0.05)


def test_taylor_prunes_other_weights_than_magnitude(tmp_path):
    masks = {}
    for importance in ("magnitude", "taylor"):
        pruning = PruningCallback(sparsity=0.6, schedule="one_shot", start_epoch=1, importance=importance)
        fit(tmp_path / importance, [pruning], max_epochs=2)
        masks[importance] = pruning.masks.masks
    assert any(not torch.equal(a, b) for a, b in zip(masks["taylor"], masks["magnitude"]))


def test_a_criterion_that_needs_training_cannot_prune_at_epoch_zero(tmp_path):
    pruning = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=0, importance="fisher")
    with pytest.raises(MisconfigurationException, match=r"first pruning step is at epoch 0.*`start_epoch`"):
        fit(tmp_path, [pruning], max_epochs=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"importance": "magnitude", "importance_batches": 8}, r"`importance_batches` applies to the criteria"),
        ({"importance": TaylorImportance(), "importance_batches": 8}, r"set it on TaylorImportance\(batches=16\)"),
        ({"importance": "taylor", "importance_batches": 0}, r"`batches` must be an integer >= 1"),
        (
            {"importance": "apoz"},
            r"structure='unstructured' scores single weights, but APoZImportance\(batches=16\) scores whole channels"
            r".*Use structure='channel' with it",
        ),
        (
            {"structure": "block", "block_shape": (0, 4)},
            r"`block_shape` must be two positive integers \(rows, columns\) such as \(4, 4\).*got \(0, 4\)\.",
        ),
        ({"structure": "channel", "block_shape": (4, 4)}, r"`block_shape` applies to structure='block' only"),
        ({"sparsity": {"head": 1.0}}, r"`sparsity\['head'\]` must be a number in \[0, 1\), got 1\.0"),
        ({"sparsity": {}}, r"non-empty mapping"),
        ({"rewind_epoch": 5, "start_epoch": 2}, r"`rewind_epoch`=5 is after the first pruning step \(epoch 2\)"),
        ({"rewind_epoch": -1}, r"`rewind_epoch` must be an integer >= 0"),
        ({"structure": "5:4"}, r"`n` must satisfy 1 <= n < m \(n zeros in every group of m weights\), got 5:4\."),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        PruningCallback(**kwargs)


def test_statistics_survive_a_checkpoint_between_collection_and_pruning(tmp_path):
    def callback():
        return PruningCallback(
            sparsity=0.5, schedule="one_shot", start_epoch=2, importance="taylor", importance_batches=3
        )

    full = fit(tmp_path / "full", [callback()], max_epochs=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "part", [callback(), ckpt], max_epochs=2, enable_checkpointing=True)  # ends with the statistics
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("PruningCallback")]
    assert state["importance_state"]["steps"] == 3
    resumed_cb = callback()
    resumed = fit(tmp_path / "resumed", [resumed_cb], max_epochs=4, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- per-layer targets
def test_per_layer_targets_reach_each_layer_exactly(tmp_path):
    targets = {"features.0": 0.25, "body.*": 0.8, "head": 0.5}
    pruning = PruningCallback(sparsity=targets, schedule="cubic", start_epoch=0, end_epoch=2)
    fit(tmp_path, [pruning, MaskInvariantChecker()], max_epochs=3)
    assert pruning.scope == "layer"
    assert pruning.layer_sparsity() == {
        "features.0.weight": round(0.25 * 72) / 72,
        "body.0.weight": round(0.8 * 512) / 512,
        "head.weight": 0.5,
    }


def test_layers_no_pattern_matches_stay_dense_and_unknown_patterns_fail(tmp_path):
    pruning = PruningCallback(sparsity={"body.0": 0.7}, schedule="one_shot", start_epoch=0)
    fit(tmp_path, [pruning], max_epochs=1)
    assert pruning.layer_sparsity()["features.0.weight"] == 0.0 == pruning.layer_sparsity()["head.weight"]
    with pytest.raises(MisconfigurationException, match=r"'classifier'.*matches no"):
        fit(tmp_path, [PruningCallback(sparsity={"classifier": 0.5}, schedule="one_shot")], max_epochs=1)


def test_set_targets_replaces_the_sparsity_before_the_first_step_only(tmp_path):
    pruning = PruningCallback(sparsity=0.9, schedule="linear", start_epoch=1, end_epoch=3)

    class Handover(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                pruning.set_targets({"body.0.weight": 0.6, "head.weight": 0.3})

    fit(tmp_path, [Handover(), pruning], max_epochs=4)
    assert pruning.layer_sparsity() == {
        "features.0.weight": 0.0,
        "body.0.weight": round(0.6 * 512) / 512,
        "head.weight": round(0.3 * 64) / 64,
    }
    with pytest.raises(MisconfigurationException, match="before the first pruning step"):
        pruning.set_targets({"head.weight": 0.1})


@pytest.mark.parametrize("sensitivity_first", [True, False])
def test_sensitivity_callback_hands_its_allocation_to_a_real_pruning_callback(tmp_path, sensitivity_first):
    pruning = PruningCallback(sparsity=0.7, schedule="one_shot", start_epoch=2)
    sensitivity = SensitivityCallback(ratios=[0.3, 0.6, 0.9], pruning=pruning)
    callbacks = [sensitivity, pruning] if sensitivity_first else [pruning, sensitivity]  # the order does not matter
    fit(tmp_path, [*callbacks, MaskInvariantChecker()], max_epochs=3, val=True)
    assert sensitivity.targets and pruning.layer_targets == sensitivity.targets
    layers = pruning.layer_sparsity()
    for name, target in sensitivity.targets.items():
        assert layers[name] == pytest.approx(target, abs=1 / 64)
    assert pruning.achieved_sparsity == pytest.approx(0.7, abs=0.01)


# ---------------------------------------------------------------------------------------------- patterns by name
def test_n_m_and_block_structures_by_name(tmp_path):
    nm = PruningCallback(structure="2:4", schedule="one_shot", start_epoch=0, ignore=["features"])
    assert isinstance(nm.structure, NMStructure) and nm.sparsity == 0.5  # n / m when `sparsity` is not given
    fit(tmp_path / "nm", [nm, MaskInvariantChecker()], max_epochs=1)
    assert nm.structure.complete_groups(nm.masks) == {"body.0.weight": 1.0, "head.weight": 1.0}
    blocks = PruningCallback(sparsity=0.5, structure="block", block_shape=(4, 8), schedule="one_shot")
    assert isinstance(blocks.structure, BlockStructure) and blocks.structure.block_shape == (4, 8)
    fit(tmp_path / "block", [blocks, MaskInvariantChecker()], max_epochs=1)
    assert blocks.achieved_sparsity == 0.5
    # The input channels of the first convolution cannot form groups of 4: a clear error at train start.
    with pytest.raises(MisconfigurationException, match=r"'features.0.weight'.*not a multiple of 4.*`ignore`"):
        fit(tmp_path / "bad", [PruningCallback(structure="2:4", schedule="one_shot")], max_epochs=1)


# ---------------------------------------------------------------------------------------------- rewinding
class AfterPruning(Callback):
    """Records the model's weights and optimizer state right after each epoch's pruning step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, Tensor]] = {}
        self.optimizer_state: dict[int, int] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.optimizer_state[trainer.current_epoch] = len(trainer.optimizers[0].state)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_rewinding_restarts_surviving_weights_from_the_rewind_epoch(tmp_path, optimizer):
    pruning = PruningCallback(
        sparsity=0.8, schedule="iterative", start_epoch=2, end_epoch=6, every_n_epochs=2, rewind_epoch=1
    )
    after = AfterPruning()
    fit(tmp_path, [pruning, after, MaskInvariantChecker()], max_epochs=7, model=Net(optimizer))
    rewound = after.weights[1]  # the start of epoch 1, before training in it
    masks = dict(zip(pruning.masks.names, pruning.masks.masks))
    for epoch in (2, 4, 6):  # the pruning epochs: every kept entry is back at its epoch-1 value
        assert after.optimizer_state[epoch] == 0  # momentum / moments cleared
        for name, value in after.weights[epoch].items():
            expected = rewound[name]
            if name in masks:
                kept = masks[name] if epoch == 6 else (value != 0)
                assert torch.equal(value[kept], expected[kept]), (epoch, name)
            elif value.is_floating_point():
                assert torch.equal(value, expected), (epoch, name)
    for epoch in (3, 5):  # and training moves them again in between
        assert not torch.equal(after.weights[epoch]["body.0.weight"], after.weights[epoch - 1]["body.0.weight"])
    assert pruning.achieved_sparsity == pytest.approx(0.8, abs=1e-3)


def test_a_resumed_rewinding_run_matches_and_needs_its_stored_weights(tmp_path):
    def callback(rewind=1):
        return PruningCallback(
            sparsity=0.7, schedule="iterative", start_epoch=2, end_epoch=4, every_n_epochs=2, rewind_epoch=rewind
        )

    full = fit(tmp_path / "full", [callback()], max_epochs=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "part", [callback(), ckpt], max_epochs=3, enable_checkpointing=True)
    resumed = fit(tmp_path / "resumed", [callback()], max_epochs=5, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # A checkpoint written without rewinding cannot be continued with it: the weights of epoch 1 were never stored.
    fit(
        tmp_path / "plain",
        [callback(None), ModelCheckpoint(dirpath=tmp_path / "plain_ckpt", save_last=True)],
        max_epochs=3,
        enable_checkpointing=True,
    )
    with pytest.raises(MisconfigurationException, match="cannot rewind to epoch 1, whose weights were not stored"):
        fit(tmp_path / "again", [callback()], max_epochs=5, ckpt_path=tmp_path / "plain_ckpt" / "last.ckpt")


def test_fisher_object_with_its_own_window(tmp_path):
    fisher = FisherImportance(batches=2)
    pruning = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=1, importance=fisher)
    observed = Observed(pruning)
    fit(tmp_path, [pruning, observed], max_epochs=2)
    assert observed.steps[0] == 2 and pruning.achieved_sparsity == pytest.approx(0.5)


def test_a_run_with_a_sensitivity_allocation_resumes_from_its_checkpoint(tmp_path):
    def callbacks():
        return [
            SensitivityCallback(ratios=[0.3, 0.6, 0.9]),
            PruningCallback(sparsity=0.7, schedule="cubic", start_epoch=1, end_epoch=3),
        ]

    full = fit(tmp_path / "full", callbacks(), max_epochs=5, val=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "part", [*callbacks(), ckpt], max_epochs=3, val=True, enable_checkpointing=True)
    resumed_callbacks = callbacks()
    resumed = fit(
        tmp_path / "resumed", resumed_callbacks, max_epochs=5, val=True, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert resumed_callbacks[1].layer_targets  # the allocation came back from the checkpoint, not a new analysis
    assert resumed_callbacks[0].table is None
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_layer_pruned_entirely_is_named_in_a_warning(tmp_path):
    class Tiny(Callback):  # the head's weights become the smallest of all: a global threshold takes all of them
        def on_train_epoch_start(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.head.weight.mul_(1e-6)

    pruning = PruningCallback(sparsity=0.2, schedule="one_shot", start_epoch=0)
    with pytest.warns(UserWarning, match=r"Every weight of \[.head.weight.\] is pruned"):
        fit(tmp_path, [Tiny(), pruning], max_epochs=1)
