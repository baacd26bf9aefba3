"""Property-based tests (hypothesis): for random small models, sparsities, schedules, optimizers and gradient
accumulation, the pruning invariants hold after every optimizer step and every pruning step:

* pruned entries, and their optimizer state, are exactly zero;
* masks only grow (no pruned entry is ever revived);
* the achieved sparsity is exactly the scheduled one: ``round(s * N)`` entries (per layer with ``scope="layer"``),
  or ``round(s * C)`` channels for channel pruning;
* non-finite weights or gradients stop training with a clear error and leave the masks as they were.

The Trainer properties run a real ``lightning.pytorch.Trainer`` per example; the default suite runs a few dozen
examples, the ``slow`` variants several hundred.
"""

import math
import re

import lightning.pytorch as pl
import pytest
import torch
from _checks import tiny_trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import (
    CubicSchedule,
    ExponentialSchedule,
    IterativeSchedule,
    LinearSchedule,
    MagnitudeImportance,
    MaskSet,
    OneShotSchedule,
    PruningCallback,
    Unstructured,
    prunable_parameters,
)

TRAINER_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
#: How many Trainer examples ran and how many invariant checks they made (printed at the end of the module).
CHECKS = {"steps": 0, "examples": 0}


@pytest.fixture(scope="module", autouse=True)
def report_checks():
    yield
    print(f"\nproperty tests: {CHECKS['examples']} Trainer examples, {CHECKS['steps']} invariant checks")


# ---------------------------------------------------------------------------------------------- random pieces
@st.composite
def models(draw, conv: bool | None = None) -> nn.Module:
    """A random small MLP or CNN on 1x6x6 inputs with 3 classes, seeded from the draw."""
    seed = draw(st.integers(0, 2**16))
    use_conv = draw(st.booleans()) if conv is None else conv
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        if use_conv:
            channels = 1
            for _ in range(draw(st.integers(1, 2))):
                out = draw(st.integers(2, 6))
                kernel = draw(st.sampled_from([1, 3]))
                layers += [nn.Conv2d(channels, out, kernel, padding=kernel // 2)]
                if draw(st.booleans()):
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU())
                channels = out
            layers += [nn.Flatten()]
            width = channels * 36
        else:
            layers += [nn.Flatten()]
            width = 36
        for _ in range(draw(st.integers(0, 2))):
            out = draw(st.integers(3, 20))
            layers += [nn.Linear(width, out), nn.ReLU()]
            width = out
        layers.append(nn.Linear(width, 3))
        return nn.Sequential(*layers)


@st.composite
def schedules(draw, max_sparsity: float = 0.95):
    final = draw(st.floats(0.0, max_sparsity, allow_nan=False))
    start = draw(st.integers(0, 2))
    length = draw(st.integers(0, 3))
    every = draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["one_shot", "linear", "cubic", "exponential", "iterative"]))
    if kind == "one_shot":
        return OneShotSchedule(final_sparsity=final, start_epoch=start)
    if kind == "iterative":
        steps = draw(st.lists(st.floats(0.0, max_sparsity, allow_nan=False), min_size=1, max_size=4))
        return IterativeSchedule(sparsities=tuple(sorted(steps)), start_epoch=start, every_n_epochs=every)
    cls = {"linear": LinearSchedule, "cubic": CubicSchedule, "exponential": ExponentialSchedule}[kind]
    return cls(final_sparsity=final, start_epoch=start, end_epoch=start + length, every_n_epochs=every)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-decay": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, optimizer: str) -> None:
        super().__init__()
        self.net = net
        self.optimizer = optimizer
        self.example_input_array = torch.zeros(2, 1, 6, 6)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer](self.parameters())


def data(seed: int, n: int = 24, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)),
        batch_size=batch_size,
    )


def scheduled_count(structure_name: str, masks, schedule, epoch: int, scope: str) -> list[tuple[int, int]]:
    """(expected, achieved) numbers of pruned entries (or channels) per selection unit."""
    target = schedule.sparsity_at(epoch)
    if structure_name == "channel":
        if scope == "layer":
            # Each group keeps at least a tenth of its channels (the default `max_layer_sparsity` of 0.9), and one.
            keep = [
                max(g.channels - round(target * g.channels), 1, math.ceil(0.1 * g.channels - 1e-9))
                for g in masks.groups
            ]
            return [(g.channels - k, int((~masks.kept(g)).sum())) for g, k in zip(masks.groups, keep)]
        return [(round(target * masks.num_channels()), masks.num_pruned_channels())]
    if scope == "layer":
        return [(round(target * m.numel()), m.numel() - int(m.sum())) for m in masks.masks]
    return [(round(target * masks.numel()), masks.num_pruned())]


class InvariantChecker(pl.Callback):
    """Checks every invariant after every optimizer step and right after every pruning step."""

    def __init__(self, pruning: PruningCallback, structure: str, scope: str) -> None:
        self.pruning = pruning
        self.structure = structure
        self.scope = scope
        self.previous: list[torch.Tensor] | None = None
        self.checks = 0

    def _check(self, trainer: pl.Trainer) -> None:
        masks = self.pruning.masks
        if masks is None:
            return
        optimizer = trainer.optimizers[0]
        for name, p, m in zip(masks.names, masks.params, masks.masks):
            assert bool((p.detach()[~m] == 0).all()), f"a pruned entry of {name} is not zero"
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert bool((value[~m] == 0).all()), f"optimizer state of a pruned entry of {name} is not zero"
        if self.previous is not None:
            for before, now in zip(self.previous, masks.masks):
                assert not bool((now & ~before).any()), "a pruned entry was revived"
        self.previous = [m.clone() for m in masks.masks]
        for expected, achieved in scheduled_count(
            self.structure, masks, self.pruning.schedule, trainer.current_epoch, self.scope
        ):
            assert achieved == expected, f"{achieved} pruned, the schedule asks for {expected}"
        self.checks += 1

    def on_train_epoch_start(self, trainer, pl_module):  # after the PruningCallback (list order)
        self._check(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._check(trainer)


def run_trainer(net, schedule, optimizer, accumulate, scope, structure="unstructured", seed=0, extra=(), check=True):
    pruning = PruningCallback(schedule=schedule, scope=scope, structure=structure, compact=False)
    checker = InvariantChecker(pruning, structure, scope)
    callbacks = [pruning, *([checker] if check else []), *extra]
    trainer = tiny_trainer(None, callbacks, (schedule.end_epoch or 0) + 2, accumulate_grad_batches=accumulate)
    trainer.fit(Module(net, optimizer), data(seed))
    return pruning, checker


def trainer_property(net, schedule, optimizer, accumulate, scope, seed):
    torch.set_num_threads(1)
    pruning, checker = run_trainer(net, schedule, optimizer, accumulate, scope, seed=seed)
    epochs = (schedule.end_epoch or 0) + 2
    assert checker.checks >= epochs  # one per epoch start, and one per optimizer step
    masks = pruning.masks
    expected = [round(schedule.final_sparsity * m.numel()) for m in masks.masks] if scope == "layer" else None
    if expected is not None:
        assert [m.numel() - int(m.sum()) for m in masks.masks] == expected
    else:
        assert masks.num_pruned() == round(schedule.final_sparsity * masks.numel())
    CHECKS["steps"] += checker.checks
    CHECKS["examples"] += 1


trainer_cases = {
    "net": models(),
    "schedule": schedules(),
    "optimizer": st.sampled_from(sorted(OPTIMIZERS)),
    "accumulate": st.integers(1, 3),
    "scope": st.sampled_from(["global", "layer"]),
    "seed": st.integers(0, 100),
}


@settings(max_examples=20, **TRAINER_SETTINGS)
@given(**trainer_cases)
def test_invariants_hold_after_every_step_of_a_trainer_run(net, schedule, optimizer, accumulate, scope, seed):
    trainer_property(net, schedule, optimizer, accumulate, scope, seed)


@pytest.mark.slow
@settings(max_examples=300, **TRAINER_SETTINGS)
@given(**trainer_cases)
def test_invariants_hold_after_every_step_of_a_trainer_run_many_examples(
    net, schedule, optimizer, accumulate, scope, seed
):
    trainer_property(net, schedule, optimizer, accumulate, scope, seed)


def channel_property(net, schedule, optimizer, accumulate, scope, seed) -> bool:
    """Run one example; True when it trained and the invariants held, False for a documented refusal."""
    torch.set_num_threads(1)
    try:
        _, checker = run_trainer(net, schedule, optimizer, accumulate, scope, "channel", seed)
    except MisconfigurationException as err:
        # Only the documented refusals: nothing prunable (every group reaches the output), or a target beyond the
        # per-layer cap of 90% of a layer's channels.
        assert re.search(r"no channel group to prune|Cannot prune", str(err)), err
        return False
    CHECKS["steps"] += checker.checks
    CHECKS["examples"] += 1
    return True


channel_cases = {**trainer_cases, "net": models(conv=True), "schedule": schedules(max_sparsity=0.85)}


def check_channel_examples(max_examples: int) -> None:
    """Run the channel property on ``max_examples`` draws and require that most of them trained: a property whose
    examples are all refused checks nothing."""
    outcomes: list[bool] = []

    @settings(max_examples=max_examples, **TRAINER_SETTINGS)
    @given(**channel_cases)
    def run(net, schedule, optimizer, accumulate, scope, seed):
        outcomes.append(channel_property(net, schedule, optimizer, accumulate, scope, seed))

    run()
    assert sum(outcomes) >= len(outcomes) // 2 >= 1, f"{sum(outcomes)} of {len(outcomes)} examples trained"


def test_channel_invariants_hold_after_every_step():
    check_channel_examples(10)


@pytest.mark.slow
def test_channel_invariants_hold_after_every_step_many_examples():
    check_channel_examples(150)


# ---------------------------------------------------------------------------------------------- plain PyTorch
@settings(max_examples=150, deadline=None)
@given(
    net=models(),
    targets=st.lists(st.floats(0.0, 0.99, allow_nan=False), min_size=1, max_size=5),
    optimizer=st.sampled_from(sorted(OPTIMIZERS)),
    accumulate=st.integers(1, 3),
    scope=st.sampled_from(["global", "layer"]),
)
def test_masks_grow_exactly_in_a_plain_loop(net, targets, optimizer, accumulate, scope):
    """The MaskSet alone, in a hand-written loop with gradient accumulation, any sequence of targets."""
    masks = MaskSet(prunable_parameters(net))
    opt = OPTIMIZERS[optimizer](net.parameters())
    x, y = torch.randn(12, 1, 6, 6), torch.randint(0, 3, (12,))
    reached = 0.0
    previous = [m.clone() for m in masks.masks]
    for target in targets:
        Unstructured().prune_(masks, MagnitudeImportance(), target, scope)
        masks.attach([opt])
        reached = max(reached, target)
        for _ in range(2):
            for i in range(accumulate):
                nn.functional.cross_entropy(net(x[i::accumulate]), y[i::accumulate]).backward()
            opt.step()
            opt.zero_grad()
            for p, m in zip(masks.params, masks.masks):
                assert bool((p.detach()[~m] == 0).all())
        for before, now in zip(previous, masks.masks):
            assert not bool((now & ~before).any())
        previous = [m.clone() for m in masks.masks]
        if scope == "global":
            assert masks.num_pruned() == round(reached * masks.numel())
        else:
            assert [m.numel() - int(m.sum()) for m in masks.masks] == [round(reached * m.numel()) for m in masks.masks]
    masks.detach()


# ---------------------------------------------------------------------------------------------- non-finite values
class Corrupt(pl.Callback):
    """Puts a NaN or an infinity into one weight, or into its gradient before the optimizer step, at one batch."""

    def __init__(self, where: str, value: float, at_step: int, layer: int, index: int) -> None:
        self.where, self.value, self.at_step, self.layer, self.index = where, value, at_step, layer, index
        self.masks_before: list[torch.Tensor] | None = None
        self.pruning: PruningCallback | None = None
        self.done = False

    def _target(self, trainer) -> torch.Tensor:
        pruning = next(c for c in trainer.callbacks if isinstance(c, PruningCallback))
        self.pruning = pruning
        params = list(prunable_parameters(trainer.lightning_module).values())
        return params[self.layer % len(params)]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.where == "gradient" and trainer.global_step == self.at_step and not self.done:
            p = self._target(trainer)
            self._remember()
            p.grad.view(-1)[self.index % p.numel()] = self.value
            self.done = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "weight" and trainer.global_step == self.at_step + 1 and not self.done:
            p = self._target(trainer)
            self._remember()
            with torch.no_grad():
                p.view(-1)[self.index % p.numel()] = self.value
            self.done = True

    def _remember(self) -> None:
        masks = self.pruning.masks if self.pruning is not None else None
        self.masks_before = None if masks is None else [m.clone() for m in masks.masks]


@settings(max_examples=12, **TRAINER_SETTINGS)
@given(
    net=models(),
    where=st.sampled_from(["weight", "gradient"]),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
    at_step=st.integers(0, 10),
    layer=st.integers(0, 5),
    index=st.integers(0, 10_000),
)
def test_non_finite_values_stop_training_with_a_clear_error(net, where, value, at_step, layer, index):
    torch.set_num_threads(1)
    corrupt = Corrupt(where, value, at_step, layer, index)
    schedule = LinearSchedule(final_sparsity=0.6, start_epoch=1, end_epoch=3)
    with pytest.raises(MisconfigurationException, match=r"non-finite weights \(NaN or inf\) in \['.*weight'\]"):
        run_trainer(net, schedule, "sgd", 1, "global", extra=[corrupt], check=False)
    assert corrupt.done
    masks = corrupt.pruning.masks
    if corrupt.masks_before is not None:  # the masks are those from before the corruption: none was computed from it
        for before, now in zip(corrupt.masks_before, masks.masks):
            assert torch.equal(before, now)
