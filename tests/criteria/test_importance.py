"""Importance criteria and their statistics protocol in plain PyTorch: weight-only criteria, first-order Taylor and
Fisher (OBD) against hand-computed and autograd references, unstructured and channel pruning with them, checkpoints
of the statistics, and the errors."""

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _checks import seeded
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_prune import PruningCallback
from lightning_prune.app.validation import channel_importances
from lightning_prune.criteria import IMPORTANCES, build_importance
from lightning_prune.criteria.activation import ActivationImportance, APoZImportance
from lightning_prune.criteria.base import Importance, StatisticsImportance
from lightning_prune.criteria.gradient import FisherImportance, GradientImportance, TaylorImportance
from lightning_prune.criteria.magnitude import LpNormImportance, MagnitudeImportance
from lightning_prune.masks.channels import ChannelMaskSet
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.masks.params import prunable_parameters
from lightning_prune.structures.channel import ChannelStructure
from lightning_prune.structures.unstructured import Unstructured

pytestmark = pytest.mark.usefixtures("one_thread")

Contribution = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------- helpers
def batch(step: int, *shape: int, classes: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, *shape, generator=g), torch.randint(0, classes, (8,), generator=g)


def mlp() -> nn.Module:
    return seeded(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))


def conv_bn() -> nn.Module:
    """Conv -> BN -> ReLU -> Conv -> ReLU -> Flatten -> Linear on 2x4x4 inputs: two prunable channel groups."""
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    )
    return seeded(net)


def taylor_entry(w: Tensor, g: Tensor) -> Tensor:
    return (w * g).abs()


def fisher_entry(w: Tensor, g: Tensor) -> Tensor:
    return g * g


def train_with(
    net: nn.Module, masks: MaskSet, importance: Importance, steps: int, contribution: Contribution, *shape: int
) -> dict[str, Tensor]:
    """Train ``steps`` SGD steps, observing each right before the step, and return the reference mean of
    ``contribution(w_t, g_t)`` over the first ``importance.batches`` steps, with ``g_t`` computed independently by
    ``torch.autograd.grad`` on a separate forward pass."""
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    params = dict(net.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in masks.names}
    recorded = 0
    importance.start(net, masks)
    for step in range(steps):
        x, y = batch(step, *shape)
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), [params[n] for n in masks.names])
        if recorded < importance.batches:
            for n, g in zip(masks.names, grads):
                sums[n] += contribution(params[n].detach(), g)
            recorded += 1
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        assert importance.observe(masks) == (step < importance.batches)
        opt.step()
    importance.stop()
    return {n: s / recorded for n, s in sums.items()}


def expected_scores(criterion: str, means: dict[str, Tensor], net: nn.Module) -> dict[str, Tensor]:
    if criterion == "taylor":
        return means
    params = dict(net.named_parameters())
    return {n: 0.5 * m * params[n].detach().square() for n, m in means.items()}


CRITERIA = {"taylor": (TaylorImportance, taylor_entry), "fisher": (FisherImportance, fisher_entry)}


# ---------------------------------------------------------------------------------------------- weight-only
@pytest.mark.parametrize("importance", [MagnitudeImportance(), LpNormImportance(1), LpNormImportance(2)])
def test_weight_criteria_need_no_statistics(importance):
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    assert (importance.collects, importance.batches, importance.steps) == ("nothing", 0, 0)
    assert importance.ready and not importance.collecting
    importance.start(net, masks)
    net(torch.randn(2, 3)).sum().backward()
    assert importance.observe(masks) is False
    importance.stop()
    importance.reduce_(lambda t: pytest.fail("a weight-only criterion has nothing to reduce"))
    importance.reset()
    assert importance.state_dict() == {}
    importance.load_state_dict({})
    with pytest.raises(ValueError, match=r"collects no statistics, but the saved state holds .*'taylor'"):
        importance.load_state_dict(TaylorImportance().state_dict())


def test_importances_resolve_by_name():
    assert sorted(IMPORTANCES) == ["activation", "apoz", "fisher", "l1", "l2", "magnitude", "taylor"]
    built = {name: build_importance(name) for name in IMPORTANCES}
    assert isinstance(built["taylor"], TaylorImportance) and isinstance(built["fisher"], FisherImportance)
    assert isinstance(built["apoz"], APoZImportance) and isinstance(built["activation"], ActivationImportance)
    assert repr(built["taylor"]) == "TaylorImportance(batches=16)"
    assert repr(APoZImportance(4, training_only=False)) == "APoZImportance(batches=4, training_only=False)"
    collects = {name: imp.collects for name, imp in built.items()}
    assert collects == {
        "magnitude": "nothing",
        "l1": "nothing",
        "l2": "nothing",
        "taylor": "gradients",
        "fisher": "gradients",
        "apoz": "activations",
        "activation": "activations",
    }
    assert all(isinstance(built[n], StatisticsImportance) for n in ("taylor", "fisher", "apoz", "activation"))
    # channel pruning accepts every criterion; the config derives its list from ChannelStructure.check_importance
    assert channel_importances() == sorted(IMPORTANCES)


@pytest.mark.parametrize("cls", [TaylorImportance, FisherImportance, APoZImportance, ActivationImportance])
@pytest.mark.parametrize("batches", [0, -1, 1.5, True, "8"])
def test_bad_batches(cls, batches):
    with pytest.raises(ValueError, match=rf"`batches` must be an integer >= 1 .* got {batches!r}\. Hint"):
        cls(batches=batches)


# ---------------------------------------------------------------------------------------------- gradient criteria
def test_taylor_matches_a_hand_computed_linear_gradient():
    """One Linear layer, loss 1/2 * mean ||W x - y||^2: dL/dW = (W x - y) x^T / N, by hand."""
    layer = nn.Linear(3, 2, bias=False)
    w0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
    with torch.no_grad():
        layer.weight.copy_(w0)
    net = nn.Sequential(layer)
    masks = MaskSet(prunable_parameters(net))
    x = torch.tensor([[1.0, 2.0, -1.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    taylor = TaylorImportance(batches=2)
    taylor.start(net, masks)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    expected = torch.zeros(2, 3)
    w = w0.clone()
    for _ in range(2):
        grad = (x @ w.T - y).T @ x / len(x)  # by hand
        expected += (w * grad).abs()
        opt.zero_grad()
        (0.5 * (net(x) - y).square().sum(1).mean()).backward()
        assert taylor.observe(masks)
        opt.step()
        w = w - 0.1 * grad
    taylor.stop()
    torch.testing.assert_close(taylor("0.weight", layer.weight), expected / 2)
    torch.testing.assert_close(layer.weight.detach(), w)


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_gradient_criteria_match_autograd_and_stop_after_the_window(criterion):
    cls, contribution = CRITERIA[criterion]
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    importance = cls(batches=3)
    means = train_with(net, masks, importance, 5, contribution, 3)  # steps 4 and 5 are not recorded
    assert (importance.steps, importance.ready, importance.collecting, importance.skipped) == (3, True, False, 0)
    expected = expected_scores(criterion, means, net)
    for name, param in zip(masks.names, masks.params):
        torch.testing.assert_close(importance(name, param), expected[name])


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_unstructured_pruning_picks_the_lowest_scored_weights(criterion):
    cls, contribution = CRITERIA[criterion]
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    importance = cls(batches=2)
    expected = expected_scores(criterion, train_with(net, masks, importance, 2, contribution, 3), net)
    before = copy.deepcopy(net)  # pruning zeroes weights, which Fisher's saliency reads
    magnitude = MaskSet(prunable_parameters(copy.deepcopy(net)))
    Unstructured().prune_(magnitude, MagnitudeImportance(), 0.5)
    Unstructured().prune_(masks, importance, 0.5, scope="global")
    flat = torch.cat([expected[n].reshape(-1) for n in masks.names])
    k = round(0.5 * flat.numel())
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.sort(flat, stable=True).indices[:k]] = True
    got = ~torch.cat([m.reshape(-1) for m in masks.masks])
    assert torch.equal(got, pruned)
    assert not torch.equal(got, ~torch.cat([m.reshape(-1) for m in magnitude.masks]))  # not magnitude's choice
    assert all(bool((p[~m] == 0).all()) for p, m in zip(masks.params, masks.masks))
    # per layer: each tensor's lowest 40%, on a copy of the weights before the global pruning zeroed half of them
    layered = MaskSet(prunable_parameters(before))
    Unstructured().prune_(layered, importance, 0.4, scope="layer")
    for name, mask in zip(layered.names, layered.masks):
        scores = expected[name].reshape(-1)
        k = round(0.4 * scores.numel())
        assert set(torch.nonzero(~mask.reshape(-1)).flatten().tolist()) == set(
            torch.sort(scores, stable=True).indices[:k].tolist()
        )


def _expected_channel_scores(s: dict[str, Tensor]) -> dict[str, Tensor]:
    """By hand for ``conv_bn``: every entry a channel owns (producer rows and bias, BatchNorm gamma and beta,
    the consumer's input columns; after the flatten, channel c owns the linear columns 16c .. 16c + 15)."""
    group0 = torch.stack(
        [
            s["0.weight"][c].sum() + s["0.bias"][c] + s["1.weight"][c] + s["1.bias"][c] + s["3.weight"][:, c].sum()
            for c in range(4)
        ]
    )
    group3 = torch.stack(
        [s["3.weight"][c].sum() + s["3.bias"][c] + s["6.weight"][:, 16 * c : 16 * c + 16].sum() for c in range(3)]
    )
    return {"0": group0.double(), "3": group3.double()}


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_channel_scores_sum_every_entry_a_channel_owns(criterion):
    cls, contribution = CRITERIA[criterion]
    net = conv_bn()
    structure = ChannelStructure()
    masks = structure.bind(net, example_inputs=torch.randn(2, 2, 4, 4))
    assert sorted(g.name for g in masks.groups) == ["0", "3"]
    importance = cls(batches=2)
    entries = expected_scores(criterion, train_with(net, masks, importance, 2, contribution, 2, 4, 4), net)
    expected = _expected_channel_scores(entries)
    for group in masks.groups:
        torch.testing.assert_close(importance.channel_scores(masks, group), expected[group.name])
    structure.prune_(masks, importance, 0.5, scope="layer")  # 2 of 4 and 2 of 3 channels
    for group in masks.groups:
        lowest = torch.sort(expected[group.name]).indices[: round(0.5 * group.channels)]
        assert set(torch.nonzero(~masks.kept(group)).flatten().tolist()) == set(lowest.tolist())
    assert all(bool((p[~m] == 0).all()) for p, m in zip(masks.params, masks.masks))


def test_global_channel_pruning_with_taylor_compares_relative_scores():
    net = conv_bn()
    structure = ChannelStructure(max_layer_sparsity=0.75)
    masks = structure.bind(net, example_inputs=torch.randn(2, 2, 4, 4))
    taylor = TaylorImportance(batches=2)
    expected = _expected_channel_scores(train_with(net, masks, taylor, 2, taylor_entry, 2, 4, 4))
    structure.prune_(masks, taylor, 3 / 7, scope="global")
    relative = {name: s / s.mean() for name, s in expected.items()}
    candidates = sorted((float(s), name, c) for name, scores in relative.items() for c, s in enumerate(scores))
    # the 3 lowest relative scores overall, at most 3 of group 0 and 2 of group 3 (max_layer_sparsity 0.75)
    room, chosen = {"0": 3, "3": 2}, set()
    for _, name, c in candidates:
        if room[name] and len(chosen) < 3:
            room[name] -= 1
            chosen.add((name, c))
    got = {(g.name, c) for g in masks.groups for c in torch.nonzero(~masks.kept(g)).flatten().tolist()}
    assert got == chosen


def test_observe_records_only_inside_a_window_and_with_gradients():
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    taylor = TaylorImportance(batches=2)
    net(torch.randn(4, 3)).sum().backward()
    assert taylor.observe(masks) is False  # no window yet
    taylor.start(net, masks)
    assert taylor.collecting
    net.zero_grad(set_to_none=True)
    assert taylor.observe(masks) is False and taylor.steps == 0  # no gradient: nothing recorded
    net(torch.randn(4, 3)).sum().backward()
    assert taylor.observe(masks) and taylor.steps == 1 and not taylor.ready
    taylor.stop()
    assert taylor.observe(masks) is False and taylor.steps == 1  # the window is closed
    taylor.start(net, masks)  # a new window continues from the statistics kept
    assert taylor.observe(masks) and taylor.ready
    assert taylor.observe(masks) is False and taylor.steps == 2  # full


def test_a_parameter_without_gradient_in_a_step_contributes_zero_to_it():
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    fisher = FisherImportance(batches=2)
    fisher.start(net, masks)
    net(torch.randn(4, 3)).sum().backward()
    first = {n: p.grad.clone() for n, p in zip(masks.names, masks.params)}
    assert fisher.observe(masks)
    net[2].weight.grad = None  # e.g. a branch the second step's loss does not use
    assert fisher.observe(masks)
    w = net[2].weight.detach()
    torch.testing.assert_close(fisher("2.weight", net[2].weight), 0.5 * (first["2.weight"] ** 2 / 2) * w**2)
    w0 = net[0].weight.detach()
    torch.testing.assert_close(fisher("0.weight", net[0].weight), 0.5 * first["0.weight"] ** 2 * w0**2)


def test_reset_forgets_and_frees_the_statistics():
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    taylor = TaylorImportance(batches=1)
    taylor.start(net, masks)
    net(torch.randn(4, 3)).sum().backward()
    assert taylor.observe(masks)
    taylor.reset()
    assert (taylor.steps, taylor.ready, taylor.state_dict()["stats"]) == (0, False, {})
    with pytest.raises(ValueError, match="no gradient statistics yet"):
        taylor("0.weight", net[0].weight)
    assert taylor.observe(masks) and taylor.steps == 1  # the open window goes on afresh


def test_gradient_criteria_have_nothing_to_reduce():
    taylor = TaylorImportance()
    taylor.reduce_(lambda t: pytest.fail("DDP already averaged the gradients: no collective is needed"))


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_state_dict_round_trip_resumes_the_statistics(criterion, tmp_path):
    cls, contribution = CRITERIA[criterion]
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    reference = cls(batches=3)
    expected = expected_scores(criterion, train_with(net, masks, reference, 3, contribution, 3), net)

    # the same three steps, checkpointed after two, resumed into a new object
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    first = cls(batches=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    first.start(net, masks)
    resumed: Importance = first
    for step in range(3):
        if step == 2:
            torch.save(first.state_dict(), tmp_path / "stats.pt")
            state = torch.load(tmp_path / "stats.pt", weights_only=True)  # what a Lightning checkpoint holds
            assert state["steps"] == 2 and all(t.device.type == "cpu" for t in state["stats"].values())
            resumed = cls(batches=3)
            resumed.load_state_dict(state, masks)
            resumed.start(net, masks)
        x, y = batch(step, 3)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        assert resumed.observe(masks)
        opt.step()
    for name, param in zip(masks.names, masks.params):
        torch.testing.assert_close(resumed(name, param), expected[name])
    assert resumed.state_dict()["seen"] == sorted(masks.names)


def test_loading_statistics_that_do_not_fit_is_refused():
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    taylor = TaylorImportance(batches=1)
    taylor.start(net, masks)
    net(torch.randn(4, 3)).sum().backward()
    taylor.observe(masks)
    state = taylor.state_dict()
    with pytest.raises(ValueError, match=r"collected by 'taylor', not 'fisher'"):
        FisherImportance().load_state_dict(state)
    with pytest.raises(ValueError, match=r"layout version 99"):
        TaylorImportance().load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match=r"invalid step count -1"):
        TaylorImportance().load_state_dict({**state, "steps": -1})
    with pytest.raises(ValueError, match=r"must map parameter names to float tensors"):
        TaylorImportance().load_state_dict({**state, "stats": {"0.weight": [1.0]}})
    other = MaskSet(prunable_parameters(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), ignore=["2"]))
    with pytest.raises(ValueError, match=r"do not fit the masked parameters: missing \[\], unexpected \['2.weight'\]"):
        TaylorImportance().load_state_dict(state, other)
    wider = MaskSet(prunable_parameters(nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))))
    with pytest.raises(ValueError, match=r"statistics of '0.weight' have shape \(5, 3\), the parameter \(6, 3\)"):
        TaylorImportance().load_state_dict(state, wider)
    later = TaylorImportance()
    later.load_state_dict(state)  # without masks: checked when the window opens
    with pytest.raises(ValueError, match="do not fit the masked parameters"):
        later.start(nn.Sequential(), other)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls", [TaylorImportance, FisherImportance])
def test_scoring_before_any_step_says_what_to_change(cls):
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    importance = cls()
    before = [m.clone() for m in masks.masks]
    match = r"no gradient statistics yet.*start pruning at least one epoch after.*`start_epoch` >= 1.*'magnitude'"
    with pytest.raises(ValueError, match=match):
        Unstructured().prune_(masks, importance, 0.5)
    importance.start(net, masks)  # a window without any step is no better
    with pytest.raises(ValueError, match=match):
        Unstructured().prune_(masks, importance, 0.5)
    channels = ChannelStructure().bind(conv_bn(), example_inputs=torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match=match):
        ChannelStructure().prune_(channels, importance, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(masks.masks, before))
    assert channels.num_pruned() == 0


def test_pruning_at_epoch_zero_with_taylor_fails_with_the_remedy():
    """What PruningCallback turns into its error when it scores before any training step."""
    pruning = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=0, importance="taylor")
    net = mlp()
    masks = pruning.structure.bind(net)
    with pytest.raises(ValueError, match=r"start pruning at least one epoch after training starts"):
        pruning.structure.prune_(masks, pruning.importance, 0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_steps_with_non_finite_gradients_are_skipped_and_never_reach_a_mask(bad):
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    taylor = TaylorImportance(batches=2)
    taylor.start(net, masks)
    net(torch.randn(4, 3)).sum().backward()
    net[2].weight.grad[0, 1] = bad  # e.g. an fp16 loss-scale overflow, whose step GradScaler skips too
    assert taylor.observe(masks) is False
    assert (taylor.steps, taylor.skipped) == (0, 1)
    with pytest.raises(ValueError, match=r"NaN or infinite gradients \(first in '2.weight'\).*lower the learning rate"):
        Unstructured().prune_(masks, taylor, 0.5)
    assert masks.num_pruned() == 0
    net.zero_grad()
    net(torch.randn(4, 3)).sum().backward()
    assert taylor.observe(masks)  # a finite step is recorded; the skipped one left no trace
    assert all(bool(torch.isfinite(taylor(n, p)).all()) for n, p in zip(masks.names, masks.params))
    assert taylor.state_dict()["skipped"] == 1


def test_non_finite_statistics_name_the_layer():
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    fisher = FisherImportance(batches=1)
    fisher.start(net, masks)
    net(torch.randn(4, 3)).sum().backward()
    fisher.observe(masks)
    state = fisher.state_dict()
    state["stats"]["0.weight"][1, 2] = float("inf")  # an accumulated overflow
    overflowed = FisherImportance(batches=1)
    overflowed.load_state_dict(state, masks)
    with pytest.raises(ValueError, match=r"statistics of '0.weight' are not finite"):
        Unstructured().prune_(masks, overflowed, 0.5)
    assert masks.num_pruned() == 0


def test_a_parameter_that_never_gets_a_gradient_is_named():
    net = mlp()
    net[0].weight.requires_grad_(False)  # frozen
    masks = MaskSet(prunable_parameters(net))
    taylor = TaylorImportance(batches=1)
    taylor.start(net, masks)
    net(torch.randn(4, 3)).sum().backward()
    assert taylor.observe(masks)
    with pytest.raises(ValueError, match=r"'0.weight' received no gradient in the 1 step\(s\).*frozen.*`ignore`"):
        Unstructured().prune_(masks, taylor, 0.5)


def test_scoring_other_parameters_than_observed_is_refused():
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    taylor = TaylorImportance(batches=1)
    taylor.start(net, masks)
    net(torch.randn(4, 3)).sum().backward()
    taylor.observe(masks)
    with pytest.raises(ValueError, match=r"has no statistics for 'other.weight'"):
        taylor("other.weight", net[0].weight)
    with pytest.raises(ValueError, match=r"statistics of '0.weight' have shape \(5, 3\), the parameter \(2, 2\)"):
        taylor("0.weight", torch.zeros(2, 2))
    fresh = TaylorImportance()
    fresh.start(net, masks)
    with pytest.raises(TypeError, match="`masks` must be a MaskSet, got dict"):
        fresh.observe({})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`module` must be a torch\.nn\.Module, got str"):
        taylor.start("net", masks)  # type: ignore[arg-type]


def test_channel_criteria_refuse_single_weights():
    net = mlp()
    masks = MaskSet(prunable_parameters(net))
    for importance in (APoZImportance(), ActivationImportance()):
        with pytest.raises(ValueError, match=r"structure='unstructured' scores single weights, but .* whole channels"):
            Unstructured().check_importance(importance)
        with pytest.raises(ValueError, match=r"cannot score the single entries of '0.weight': use it with structure="):
            Unstructured().prune_(masks, importance, 0.5)
        with pytest.raises(TypeError, match=r"needs the ChannelMaskSet of structure='channel'.*got MaskSet"):
            importance.start(net, masks)
        with pytest.raises(MisconfigurationException, match="scores whole channels"):
            PruningCallback(importance=importance)
    for name in ("taylor", "fisher"):
        Unstructured().check_importance(build_importance(name))  # accepted
    for name in IMPORTANCES:
        ChannelStructure().check_importance(build_importance(name))  # all accepted for channels
    assert isinstance(PruningCallback(structure="channel", importance="apoz").importance, APoZImportance)


def test_channel_structure_checks_what_a_custom_channel_criterion_returns():
    class Constant(Importance):
        scores_channels = True

        def __init__(self, value: Tensor) -> None:
            self.value = value

        def __call__(self, name: str, param: Tensor) -> Tensor:
            return param.detach().abs()

        def channel_scores(self, masks: ChannelMaskSet, group) -> Tensor:
            return self.value[: group.channels]

    net = conv_bn()
    masks = ChannelStructure().bind(net, example_inputs=torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"returned channel scores of shape \(2,\) for group '(0|3)', which has"):
        ChannelStructure().prune_(masks, Constant(torch.ones(2)), 0.3, scope="layer")
    with pytest.raises(ValueError, match=r"NaN or infinite channel scores for group '(0|3)'"):
        ChannelStructure().prune_(masks, Constant(torch.full((4,), float("nan"))), 0.3, scope="layer")
    assert masks.num_pruned() == 0
    ChannelStructure().prune_(masks, Constant(torch.tensor([3.0, 1.0, 2.0, 0.5])), 0.5, scope="layer")
    kept = {g.name: masks.kept(g).tolist() for g in masks.groups}
    assert kept == {"0": [True, False, True, False], "3": [True, False, False]}


def test_gradient_criteria_are_their_own_kind():
    assert issubclass(TaylorImportance, GradientImportance) and issubclass(FisherImportance, GradientImportance)
    assert TaylorImportance.scores_channels and TaylorImportance.scores_entries and not TaylorImportance.pointwise


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_low_precision_weights_accumulate_in_float32(criterion):
    cls, contribution = CRITERIA[criterion]
    net = mlp().to(torch.bfloat16)
    masks = MaskSet(prunable_parameters(net))
    importance = cls(batches=1)
    importance.start(net, masks)
    x, y = batch(0, 3)
    F.cross_entropy(net(x.bfloat16()).float(), y).backward()
    assert importance.observe(masks)
    assert all(t.dtype == torch.float32 for t in importance.state_dict()["stats"].values())
    for name, param in zip(masks.names, masks.params):
        means = {name: contribution(param.detach().float(), param.grad.float())}
        want = expected_scores(criterion, means, net)[name].float()
        torch.testing.assert_close(importance(name, param).float(), want, rtol=2e-2, atol=1e-6)
