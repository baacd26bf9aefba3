"""The plain-PyTorch :class:`~lightning_prune.pruner.Pruner` in a hand-written training loop (no Lightning): exact
zeros under every optimizer, schedules, per-layer targets matched once, rewinding, checkpoints that continue bit for
bit, reuse for a second model, the data-driven criteria, and every bad input."""

import io
import re

import pytest
import torch
import torch.nn.functional as F
from _checks import make_optimizer, seeded
from torch import Tensor, nn

import lightning_prune.pruner as pruner_module
import lightning_prune.structures.base as structures_base
from lightning_prune.criteria.base import Importance
from lightning_prune.criteria.gradient import TaylorImportance
from lightning_prune.pruner import NonFiniteWeightsError, Pruner
from lightning_prune.schedules import CubicSchedule, LinearSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

#: The masked weights of :func:`mlp` and their sizes; ``4.weight`` is the classifier.
SIZES = {"0.weight": 10 * 20, "2.weight": 20 * 15, "4.weight": 15 * 4}


def mlp(seed: int = 0) -> nn.Sequential:
    return seeded(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 15), nn.ReLU(), nn.Linear(15, 4)), seed)


def batches(epoch: int, steps: int = 4) -> list[tuple[Tensor, Tensor]]:
    """The same data for an epoch however often it is asked for (one generator per epoch)."""
    g = torch.Generator().manual_seed(1000 + epoch)
    return [(torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(steps)]


def zeros(model: nn.Module) -> dict[str, int]:
    """The exact zeros of each masked weight."""
    named = dict(model.named_parameters())
    return {name: int((named[name] == 0).sum()) for name in SIZES}


def assert_exact(pruner: Pruner, optimizer: torch.optim.Optimizer) -> int:
    """Pruned weights and their optimizer state are exactly zero; returns how many state tensors were checked."""
    checked = 0
    for name, p, m in zip(pruner.masks.names, pruner.masks.params, pruner.masks.masks):
        assert bool((p[~m] == 0).all()), f"a pruned weight of {name} moved"
        for key, value in optimizer.state[p].items():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert bool((value[~m] == 0).all()), f"optimizer state {key!r} of a pruned entry of {name} is not zero"
                checked += 1
    return checked


def train_epoch(model, optimizer, pruner=None, epoch: int = 0, accumulate: int = 1, on_step=None, on_backward=None):
    """One epoch of a plain loop (4 optimizer steps, each over ``accumulate`` batches); with a pruner whose criterion
    collects, ``observe()`` before each step."""
    for i, (x, y) in enumerate(batches(epoch, steps=4 * accumulate)):
        F.cross_entropy(model(x), y).div(accumulate).backward()
        if on_backward is not None:
            on_backward()
        if (i + 1) % accumulate:
            continue
        if pruner is not None and pruner.collecting:
            pruner.observe()
        optimizer.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step()


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    ("optimizer", "accumulate"),
    [("sgd", 1), ("adam", 1), ("adamw", 1), ("sgd", 3)],
    ids=["sgd-momentum-decay", "adam", "adamw-decay", "sgd-accumulate"],
)
def test_pruned_weights_and_their_optimizer_state_stay_exactly_zero_after_every_step(optimizer, accumulate):
    model = mlp()
    opt = make_optimizer(optimizer, model.parameters())
    pruner = Pruner(sparsity=0.8)
    pruner.bind(model)
    pruner.attach([opt])
    schedule = LinearSchedule(final_sparsity=0.8, start_epoch=1, end_epoch=3)
    checked, backwards = [], []

    def gradients_masked(*_) -> None:  # the accumulated gradients the step used: pruned entries masked in place
        for p, m in zip(pruner.masks.params, pruner.masks.masks):
            assert bool((p.grad[~m] == 0).all())
        backwards.append(1)

    def exact() -> None:
        checked.append(assert_exact(pruner, opt))

    opt.register_step_post_hook(gradients_masked)
    for epoch in range(6):
        pruner.prune(schedule.sparsity_at(epoch))
        train_epoch(model, opt, pruner, epoch, accumulate, on_step=exact)
    assert len(checked) == 6 * 4 and len(backwards) == 6 * 4
    per_param = 1 if optimizer == "sgd" else 2  # momentum; or Adam's two moments
    assert min(checked) == per_param * len(SIZES)  # every state tensor was there to check
    total = sum(SIZES.values())
    assert sum(zeros(model).values()) == round(0.8 * total)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_schedule_reaches_exactly_round_s_n_zeros_at_each_step_and_revives_nothing(scope):
    model = mlp()
    opt = make_optimizer("sgd", model.parameters())
    pruner = Pruner(sparsity=0.9, scope=scope)
    pruner.bind(model)
    pruner.attach([opt])
    schedule = CubicSchedule(final_sparsity=0.9, start_epoch=1, end_epoch=6)
    total = sum(SIZES.values())
    previous = [m.clone() for m in pruner.masks.masks]
    for epoch in range(8):
        target, reached = schedule.sparsity_at(epoch), pruner.target
        assert pruner.prune(target) == (target > reached)
        for before, after in zip(previous, pruner.masks.masks):
            assert not bool((after & ~before).any()), "a pruned entry was revived"
        previous = [m.clone() for m in pruner.masks.masks]
        train_epoch(model, opt, pruner, epoch)
        if scope == "global":
            assert sum(zeros(model).values()) == pruner.masks.num_pruned() == round(target * total)
        else:
            assert zeros(model) == {name: round(target * n) for name, n in SIZES.items()}
        assert pruner.achieved_sparsity == pruner.masks.num_pruned() / total
    assert pruner.target == 0.9
    # A lower (or equal) target changes nothing: sparsity is absolute and masks only grow.
    assert not pruner.prune(0.5) and not pruner.prune(0.9)
    assert all(torch.equal(a, b) for a, b in zip(previous, pruner.masks.masks))


class ShuffledScores(Importance):
    """Fresh random scores at every call: pruned entries (zero weights) would often score above kept ones."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, name: str, param: Tensor) -> Tensor:
        return torch.rand(param.shape, generator=self.generator)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_nothing_is_revived_when_the_scores_change_between_steps(scope):
    model = mlp()
    opt = make_optimizer("adam", model.parameters())
    pruner = Pruner(sparsity=0.8, importance=ShuffledScores(), scope=scope)
    pruner.bind(model)
    pruner.attach([opt])
    previous = [m.clone() for m in pruner.masks.masks]
    for epoch, target in enumerate([0.2, 0.4, 0.6, 0.8]):
        pruner.prune(target)
        for name, before, after in zip(pruner.masks.names, previous, pruner.masks.masks):
            assert not bool((after & ~before).any()), f"a pruned entry of {name} was revived"
        previous = [m.clone() for m in pruner.masks.masks]
        train_epoch(model, opt, pruner, epoch, on_step=lambda: assert_exact(pruner, opt))
    assert sum(zeros(model).values()) == round(0.8 * sum(SIZES.values()))


# ---------------------------------------------------------------------------------------------- per-layer targets
def test_per_layer_targets_are_matched_to_the_model_once_in_bind(monkeypatch):
    calls = []
    resolve = pruner_module.resolve_layer_targets

    def counting(names, targets):
        calls.append(list(names))
        return resolve(names, targets)

    # Both places that match patterns: the pruner's, and the structures' (a mapping handed down at each step).
    monkeypatch.setattr(pruner_module, "resolve_layer_targets", counting)
    monkeypatch.setattr(structures_base, "resolve_layer_targets", counting)
    model = mlp()
    opt = make_optimizer("sgd", model.parameters())
    pruner = Pruner(sparsity={"0": 0.6, "2": 0.3})
    assert calls == []  # nothing to match before a model is bound
    pruner.bind(model)
    assert calls == [list(SIZES)]
    pruner.attach([opt])
    for epoch, target in enumerate([0.2, 0.4, 0.6, 0.6]):
        pruner.prune(target)
        train_epoch(model, opt, pruner, epoch)
    pruner.bind(model)  # the same model again: nothing to match
    assert len(calls) == 1
    assert zeros(model) == {"0.weight": 120, "2.weight": 90, "4.weight": 0}


def test_per_layer_targets_scale_with_target_over_sparsity():
    model = mlp()
    pruner = Pruner(sparsity={"0": 0.6, "2": 0.3})
    assert pruner.sparsity == 0.6 and pruner.scope == "layer"
    pruner.bind(model)
    for target in (0.2, 0.4, 0.6):
        scale = target / 0.6
        assert pruner.targets_for(target) == pytest.approx([0.6 * scale, 0.3 * scale, 0.0])
        pruner.prune(target)
        assert zeros(model) == {
            "0.weight": round(0.6 * scale * SIZES["0.weight"]),
            "2.weight": round(0.3 * scale * SIZES["2.weight"]),
            "4.weight": 0,  # no pattern matches the classifier: it stays dense
        }
    assert zeros(model) == {"0.weight": 120, "2.weight": 90, "4.weight": 0}


def test_set_targets_before_and_after_binding_and_refused_after_the_first_step():
    expected = {"0.weight": 120, "2.weight": 90, "4.weight": 0}
    for bind_first in (True, False):
        model = mlp()
        pruner = Pruner(sparsity=0.6)
        if bind_first:
            pruner.bind(model)
        pruner.set_targets({"0": 0.6, "2": 0.3})
        assert pruner.scope == "layer" and pruner.sparsity == 0.6
        if not bind_first:
            pruner.bind(model)
        pruner.prune(0.6)
        assert zeros(model) == expected, bind_first
        with pytest.raises(
            ValueError,
            match=r"set_targets must be called before the first pruning step; the masks are already grown to a target "
            r"of 0\.6\.",
        ):
            pruner.set_targets({"0": 0.5})
        assert zeros(model) == expected
    bound = Pruner(sparsity=0.6)
    bound.bind(mlp())
    with pytest.raises(ValueError, match=r"Per-layer target pattern 'head' matches no layer\. The layers are: "):
        bound.set_targets({"head": 0.5})
    with pytest.raises(ValueError, match=r"Per-layer targets must be a non-empty mapping .*, got \{\}\."):
        bound.set_targets({})


# ---------------------------------------------------------------------------------------------- rewinding
def test_remember_rewinds_surviving_weights_after_every_pruning_step():
    model = mlp()
    opt = make_optimizer("sgd", model.parameters())
    pruner = Pruner(sparsity=0.7)
    pruner.bind(model)
    pruner.attach([opt])
    train_epoch(model, opt, pruner, epoch=0)
    pruner.remember()
    point = {k: v.clone() for k, v in model.state_dict().items()}
    for epoch, target in enumerate([0.4, 0.7], start=1):
        train_epoch(model, opt, pruner, epoch)
        assert not torch.equal(model[0].weight, point["0.weight"])  # training moved the weights
        pruner.prune(target)
        masks = dict(zip(pruner.masks.names, pruner.masks.masks))
        for name, value in model.state_dict().items():
            expected = point[name] * masks[name] if name in masks else point[name]
            assert torch.equal(value, expected), name  # survivors (and biases) back at the rewind point
        assert not opt.state  # a fresh optimizer's state, as a run restarted from the rewind point
    train_epoch(model, opt, pruner, epoch=3)
    assert_exact(pruner, opt)
    assert sum(zeros(model).values()) == round(0.7 * sum(SIZES.values()))


# ---------------------------------------------------------------------------------------------- checkpoints
def run_loop(model, opt, pruner, schedule, epochs) -> None:
    """A plain loop: prune at each epoch start; a collecting criterion observes the epoch before each growth."""
    for epoch in epochs:
        pruner.prune(schedule.sparsity_at(epoch))
        if epoch == 1:
            pruner.remember()
        if pruner.importance.collects != "nothing" and schedule.sparsity_at(epoch + 1) > pruner.target:
            pruner.start_collecting()
        train_epoch(model, opt, pruner, epoch)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_state_dict_round_trip_continues_a_plain_loop_bit_for_bit(importance):
    schedule = LinearSchedule(final_sparsity=0.8, start_epoch=1, end_epoch=5)

    def make(seed: int):
        model = mlp(seed)
        opt = make_optimizer("sgd", model.parameters())
        pruner = Pruner(sparsity=0.8, importance=TaylorImportance(batches=3) if importance == "taylor" else importance)
        pruner.bind(model)
        pruner.attach([opt])
        return model, opt, pruner

    model, opt, pruner = make(seed=0)
    run_loop(model, opt, pruner, schedule, range(7))

    first, first_opt, first_pruner = make(seed=0)
    run_loop(first, first_opt, first_pruner, schedule, range(3))  # stopped mid-schedule, statistics collected
    assert importance != "taylor" or first_pruner.importance.steps == 3
    buffer = io.BytesIO()  # through torch.save and a safe torch.load, as a checkpoint would go
    checkpoint = {"model": first.state_dict(), "opt": first_opt.state_dict(), "pruner": first_pruner.state_dict()}
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed, resumed_opt, resumed_pruner = make(seed=1)  # other weights until the checkpoint is loaded
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_pruner.load_state_dict(saved["pruner"])
    resumed_pruner.attach([resumed_opt])
    assert resumed_pruner.target == first_pruner.target > 0
    run_loop(resumed, resumed_opt, resumed_pruner, schedule, range(3, 7))

    for (name, expected), got in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(expected, got), name
    assert all(torch.equal(a, b) for a, b in zip(pruner.masks.masks, resumed_pruner.masks.masks))
    assert resumed_pruner.target == pruner.target == 0.8


# ---------------------------------------------------------------------------------------------- binding
def test_binding_to_a_second_model_restarts_with_a_warning_and_prunes_it():
    first, second = mlp(0), mlp(1)
    pruner = Pruner(sparsity=0.5)
    masks = pruner.bind(first)
    assert pruner.bind(first) is masks  # the same model again keeps its masks
    pruner.prune(0.5)
    pruner.remember()
    with pytest.warns(
        UserWarning,
        match=r"The pruner is bound to a new Sequential; it was pruning another model up to a target of 0\.5\. The "
        r"new model starts dense",
    ):
        pruner.bind(second)
    assert pruner.masks is not masks and pruner.is_bound_to(second) and not pruner.is_bound_to(first)
    assert pruner.target == 0.0 and pruner.achieved_sparsity == 0.0 and pruner.rewind_point is None
    assert pruner.prune(0.5)
    total = sum(SIZES.values())
    assert sum(zeros(second).values()) == round(0.5 * total)
    assert not masks.attached  # the first model's hooks are gone


# ---------------------------------------------------------------------------------------------- data-driven criteria
def test_taylor_collects_in_a_plain_loop_and_prunes_the_lowest_mean_of_abs_w_times_g():
    model = mlp()
    opt = make_optimizer("sgd", model.parameters())
    pruner = Pruner(sparsity=0.5, importance=TaylorImportance(batches=3))
    pruner.bind(model)
    pruner.attach([opt])
    assert not pruner.observe()  # outside a window nothing is recorded
    pruner.start_collecting()
    assert pruner.collecting
    reference = {name: torch.zeros(n) for name, n in SIZES.items()}
    named = dict(model.named_parameters())
    for step, (x, y) in enumerate(batches(0)):
        F.cross_entropy(model(x), y).backward()
        if step < 3:  # Molchanov et al. (2019): |w * dL/dw|, averaged over the steps
            for name in SIZES:
                reference[name] += (named[name].detach() * named[name].grad).abs().reshape(-1)
        assert pruner.observe() == (step < 3)  # the window holds `batches` steps
        opt.step()
        opt.zero_grad()
    assert pruner.importance.steps == 3
    assert pruner.prune(0.5)
    assert not pruner.collecting and pruner.importance.steps == 0  # closed, and freed once used
    scores = torch.cat([reference[name] / 3 for name in SIZES])
    pruned = torch.cat([~m.reshape(-1) for m in pruner.masks.masks])
    k = round(0.5 * scores.numel())
    assert int(pruned.sum()) == k
    lowest = scores.argsort(stable=True)[:k]  # ties to the earliest entry, as the exact selection breaks them
    assert torch.equal(pruned, torch.zeros_like(pruned).index_fill_(0, lowest, True))


def dead_channels() -> tuple[nn.Sequential, list[int]]:
    """Hidden channels 3 and 7 never fire (their ReLU input is always negative) but have the largest weights: the
    data-driven criteria prune them first, a weight norm last."""
    model = seeded(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    with torch.no_grad():
        for c in (3, 7):
            model[0].weight[c] *= 10
            model[0].bias[c] = -1e3
    return model, [3, 7]


@pytest.mark.parametrize("importance", ["taylor", "apoz"])
def test_channel_criteria_collect_in_a_plain_loop_and_prune_the_dead_channels(importance):
    model, dead = dead_channels()
    opt = make_optimizer("sgd", model.parameters())
    pruner = Pruner(sparsity=2 / 16, structure="channel", importance=importance)
    masks = pruner.bind(model, example_inputs=torch.randn(2, 8))
    pruner.attach([opt])
    pruner.start_collecting()
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        F.cross_entropy(model(x), y).backward()
        assert pruner.observe()
        opt.step()
        opt.zero_grad()
    assert pruner.importance.steps == 4
    pruner.prune(2 / 16)
    assert not pruner.collecting
    (group,) = masks.groups
    assert (~masks.kept(group)).nonzero().flatten().tolist() == dead
    assert bool((model[0].weight[dead] == 0).all()) and bool((model[2].weight[:, dead] == 0).all())

    norm = Pruner(sparsity=2 / 16, structure="channel")  # the weight norm keeps the largest rows
    norm_masks = norm.bind(dead_channels()[0], example_inputs=torch.randn(2, 8))
    norm.prune(2 / 16)
    assert not set((~norm_masks.kept(norm_masks.groups[0])).nonzero().flatten().tolist()) & set(dead)


# ---------------------------------------------------------------------------------------------- bad input
def test_using_an_unbound_pruner_says_to_bind_it():
    pruner = Pruner(sparsity=0.5)
    for call in (
        lambda: pruner.prune(0.5),
        pruner.remember,
        pruner.start_collecting,
        pruner.observe,
        pruner.summary,
        lambda: pruner.load_state_dict({"masks": {}, "target": 0.0}),
    ):
        with pytest.raises(ValueError, match=r"The pruner is not bound to a model yet: call `bind\(model\)` first\."):
            call()
    assert pruner.achieved_sparsity == 0.0 and pruner.layer_sparsity() == {} and pruner.non_finite() == []


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, "0.5", True, float("nan")])
def test_bad_sparsity(sparsity):
    got = re.escape(repr(sparsity))
    with pytest.raises(ValueError, match=rf"`sparsity` must be a number in \[0, 1\), got {got}\."):
        Pruner(sparsity=sparsity)


def test_bad_target():
    pruner = Pruner(sparsity=0.5)
    pruner.bind(mlp())
    with pytest.raises(ValueError, match=r"`target` must be a number in \[0, 1\), got 1\.0\."):
        pruner.prune(1.0)


@pytest.mark.parametrize(
    ("sparsity", "match"),
    [
        ({}, r"Per-layer targets must be a non-empty mapping of layer patterns to sparsities, got \{\}\."),
        ({"0": 1.0}, r"`sparsity\['0'\]` must be a number in \[0, 1\), got 1\.0\."),
        ({"0": "0.5"}, r"`sparsity\['0'\]` must be a number in \[0, 1\), got '0\.5'\."),
        ({"": 0.5}, r"Per-layer target patterns must be non-empty strings, got ''\."),
        ({1: 0.5}, r"Per-layer target patterns must be non-empty strings, got 1\."),
    ],
)
def test_bad_per_layer_targets(sparsity, match):
    with pytest.raises(ValueError, match=match):
        Pruner(sparsity=sparsity)


def test_per_layer_targets_that_match_nothing_fail_in_bind():
    pruner = Pruner(sparsity={"head": 0.5})
    with pytest.raises(ValueError, match=r"Per-layer target pattern 'head' matches no layer\. The layers are: "):
        pruner.bind(mlp())


def test_the_default_scope_follows_the_targets():
    assert Pruner(sparsity=0.5).scope == "global" and Pruner(sparsity={"0": 0.5}).scope == "layer"


@pytest.mark.parametrize("scope", ["local", "", "Global"])
def test_bad_scope(scope):
    with pytest.raises(ValueError, match=rf"`scope` must be one of \['global', 'layer'\], got {scope!r}\."):
        Pruner(sparsity=0.5, scope=scope)


def test_per_layer_targets_contradict_a_global_scope():
    with pytest.raises(
        ValueError,
        match=r"Per-layer targets \(`sparsity`=\{'0': 0\.5\}\) prune every layer to its own target, which contradicts "
        r"`scope`='global'\. Leave `scope` unset \(or 'layer'\)\.",
    ):
        Pruner(sparsity={"0": 0.5}, scope="global")


@pytest.mark.parametrize("ignore", [None, [1], ["head", None], [""], 3])
def test_bad_ignore(ignore):
    with pytest.raises(
        ValueError,
        match=r"`ignore` must be a list of module-name patterns \(e\.g\. \['head'\], or \[\] for none\), "
        rf"got {re.escape(repr(ignore))}\.",
    ):
        Pruner(sparsity=0.5, ignore=ignore)


def test_an_ignore_string_is_one_pattern_and_must_match_a_module():
    pruner = Pruner(sparsity=0.5, ignore="4")
    assert pruner.ignore == ("4",)
    pruner.bind(mlp())
    assert pruner.masks.names == ["0.weight", "2.weight"]
    with pytest.raises(
        ValueError,
        match=r"`ignore` pattern 'head' matches no module of Sequential\. Prunable modules are: \['0', '2', '4'\]\.",
    ):
        Pruner(sparsity=0.5, ignore=["head"]).bind(mlp())


class RowNorms(Importance):
    """A criterion that scores single weights only (no ``channel_scores``)."""

    def __call__(self, name: str, param: Tensor) -> Tensor:
        return param.detach().abs()


@pytest.mark.parametrize(
    ("structure", "importance", "match"),
    [
        ("unstructured", "apoz", r"structure='unstructured' scores single weights, but APoZImportance\(.*\) scores "),
        ("unstructured", "activation", r"structure='unstructured' scores single weights, but ActivationImportance"),
        ("channel", RowNorms(), r"structure='channel' scores channels by a norm of their weights or by a channel "),
    ],
)
def test_an_importance_the_structure_cannot_use_is_refused(structure, importance, match):
    with pytest.raises(ValueError, match=match):
        Pruner(sparsity=0.5, structure=structure, importance=importance)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_layer_and_leave_the_masks(bad):
    model = mlp()
    pruner = Pruner(sparsity=0.5)
    pruner.bind(model)
    with torch.no_grad():
        model[2].weight[1, 1] = bad
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite weights \(NaN or inf\) in \['2\.weight'\]") as info:
        pruner.prune(0.5)
    assert info.value.names == ["2.weight"] and pruner.non_finite() == ["2.weight"]
    assert pruner.target == 0.0 and all(bool(m.all()) for m in pruner.masks.masks)


def test_a_state_of_another_structure_is_refused():
    pruner = Pruner(sparsity=0.5)
    pruner.bind(mlp())
    state = pruner.state_dict()
    other = Pruner(sparsity=0.5, structure="channel")
    other.bind(mlp(), example_inputs=torch.randn(2, 10))
    with pytest.raises(
        ValueError,
        match=r"the saved masks were made by Unstructured\(\), this pruner prunes with ChannelStructure\(round_to=1, "
        r"max_layer_sparsity=0\.9\)\. Use the structure they were made with, or start afresh\.",
    ):
        other.load_state_dict(state)
