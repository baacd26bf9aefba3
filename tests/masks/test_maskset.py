import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_prune.criteria import build_importance
from lightning_prune.criteria.base import Importance
from lightning_prune.criteria.magnitude import MagnitudeImportance
from lightning_prune.masks.maskset import MaskSet, non_finite_parameters
from lightning_prune.masks.params import prunable_parameters
from lightning_prune.structures import build_structure
from lightning_prune.structures.unstructured import Unstructured


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(4 * 6 * 6, 32), nn.ReLU()),
        nn.Linear(32, 5),
    )


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


def test_prunable_parameters_and_ignore_patterns():
    net = make_net()
    assert list(prunable_parameters(net)) == ["0.weight", "4.0.weight", "5.weight"]
    assert list(prunable_parameters(net, ignore=["5"])) == ["0.weight", "4.0.weight"]
    assert list(prunable_parameters(net, ignore=["4"])) == ["0.weight", "5.weight"], "children of a match"
    assert list(prunable_parameters(net, ignore=["4.*", "0"])) == ["5.weight"]
    wrapped = nn.ModuleDict({"model": net})
    assert list(prunable_parameters(wrapped, ignore=["5"])) == ["model.0.weight", "model.4.0.weight"]


def test_shared_weights_are_masked_once():
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = a.weight
    assert list(prunable_parameters(nn.Sequential(a, b))) == ["0.weight"]


def test_bad_ignore_and_nothing_to_prune():
    with pytest.raises(ValueError, match=r"`ignore` pattern 'classifier' matches no module of Sequential"):
        prunable_parameters(make_net(), ignore=["classifier"])
    with pytest.raises(ValueError, match="nothing left to prune"):
        prunable_parameters(make_net(), ignore=["*"])
    with pytest.raises(ValueError, match="nothing left to prune"):
        prunable_parameters(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="non-empty strings"):
        prunable_parameters(make_net(), ignore=[""])


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.9, 0.999])
def test_exact_count_per_scope(scope, sparsity):
    net = make_net()
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), sparsity, scope)
    if scope == "global":
        assert masks.num_pruned() == round(sparsity * masks.numel())
    else:
        for m in masks.masks:
            assert int((~m).sum()) == round(sparsity * m.numel())
    for p, m in zip(masks.params, masks.masks):
        assert bool((p[~m] == 0).all())


def test_global_threshold_prunes_the_smallest_magnitudes():
    net = make_net()
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.5)
    flat = torch.cat([p.detach().abs().reshape(-1) for p in masks.params])
    k = masks.num_pruned()
    # every pruned weight was at most every kept weight (original magnitudes)
    net2 = make_net()
    orig = torch.cat([p.detach().abs().reshape(-1) for p in prunable_parameters(net2).values()])
    pruned = ~torch.cat([m.reshape(-1) for m in masks.masks])
    assert orig[pruned].max() <= orig[~pruned].min()
    assert k == round(0.5 * flat.numel())


def test_masks_only_grow_and_lower_targets_change_nothing():
    net = make_net()
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.5)
    first = [m.clone() for m in masks.masks]
    with torch.no_grad():  # make pruned entries look important: they must still not come back
        for p in masks.params:
            p.add_(10.0)
    Unstructured().prune_(masks, MagnitudeImportance(), 0.3)
    assert all(torch.equal(a, b) for a, b in zip(first, masks.masks))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.7)
    assert all(not (m & ~a).any() for a, m in zip(first, masks.masks))
    assert masks.num_pruned() == round(0.7 * masks.numel())


class Negated(Importance):
    """Not pointwise: full score tensors, here preferring to prune the largest weights."""

    def __call__(self, name, param):
        return -param.detach().abs()


def test_non_pointwise_importance_and_bad_scores():
    net = make_net()
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, Negated(), 0.5)
    orig = torch.cat([p.detach().abs().reshape(-1) for p in prunable_parameters(make_net()).values()])
    pruned = ~torch.cat([m.reshape(-1) for m in masks.masks])
    assert orig[pruned].min() >= orig[~pruned].max()

    class WrongShape(Importance):
        def __call__(self, name, param):
            return param.detach().reshape(-1)

    with pytest.raises(ValueError, match="returned scores of shape"):
        Unstructured().prune_(MaskSet(prunable_parameters(make_net())), WrongShape(), 0.5)


def test_non_finite_weights_give_a_clear_error():
    net = make_net()
    with torch.no_grad():
        net[5].weight[0, 0] = float("nan")
    masks = MaskSet(prunable_parameters(net))
    with pytest.raises(ValueError, match=r"'5\.weight' contain NaN or infinite"):
        Unstructured().prune_(masks, MagnitudeImportance(), 0.5)
    assert masks.num_pruned() == 0


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("accumulate", [1, 3])
def test_pruned_weights_stay_exactly_zero_for_50_steps(name, accumulate):
    net = make_net()
    opt = OPTIMIZERS[name](net.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)
    for _ in range(3):  # build up momentum / moments before pruning
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.8)
    masks.attach([opt])
    for step in range(50 * accumulate):
        nn.functional.cross_entropy(net(x), y).div(accumulate).backward()
        if (step + 1) % accumulate == 0:
            opt.step()
            for p, m in zip(masks.params, masks.masks):  # masked in place by the step pre-hook
                assert bool((p.grad[~m] == 0).all()), "gradient reached a pruned weight"
            opt.zero_grad()
            for p, m in zip(masks.params, masks.masks):
                assert bool((p[~m] == 0).all())
                for state in opt.state[p].values():
                    if torch.is_tensor(state) and state.shape == p.shape:
                        assert bool((state[~m] == 0).all())
    assert masks.num_pruned() == round(0.8 * masks.numel())
    # surviving weights did train
    assert any(bool((p[m] != 0).any()) for p, m in zip(masks.params, masks.masks))
    masks.detach()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    assert any(bool((p.grad[~m] != 0).any()) for p, m in zip(masks.params, masks.masks)), "hooks not removed"


def test_state_dict_round_trip_and_mismatch():
    net = make_net()
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.6)
    state = masks.state_dict()
    assert all(v.dtype == torch.bool and v.device.type == "cpu" for v in state.values())
    fresh = make_net(seed=1)
    restored = MaskSet(prunable_parameters(fresh))
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(masks.masks, restored.masks))
    assert all(bool((p[~m] == 0).all()) for p, m in zip(restored.params, restored.masks))
    with pytest.raises(ValueError, match=r"missing \['5.weight'\]"):
        MaskSet(prunable_parameters(make_net())).load_state_dict({k: v for k, v in state.items() if k != "5.weight"})
    bad = dict(state)
    bad["5.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="has shape"):
        MaskSet(prunable_parameters(make_net())).load_state_dict(bad)


def test_registries_reject_unknown_names():
    with pytest.raises(ValueError, match="Unknown importance 'taylorr'"):
        build_importance("taylorr")
    with pytest.raises(ValueError, match="Unknown structure 'channels'"):
        build_structure("channels")
    with pytest.raises(ValueError, match="Unknown scope 'local'"):
        Unstructured().prune_(MaskSet(prunable_parameters(make_net())), MagnitudeImportance(), 0.5, "local")
    with pytest.raises(ValueError, match=r"`sparsity` must be a number in \[0, 1\), got 1.5"):
        Unstructured().prune_(MaskSet(prunable_parameters(make_net())), MagnitudeImportance(), 1.5)


def test_channels_last_weights_are_masked_by_logical_index():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)).to(memory_format=torch.channels_last)
    assert not net[0].weight.is_contiguous()
    original = [p.detach().clone() for p in prunable_parameters(net).values()]
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.5, "layer")
    for w, m, p in zip(original, masks.masks, masks.params):
        pruned = ~m
        assert int(pruned.sum()) == round(0.5 * m.numel())
        assert w.abs()[pruned].max() <= w.abs()[~pruned].min()
        assert bool((p[pruned] == 0).all()) and torch.equal(p[~pruned], w[~pruned])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_non_finite_parameters_finds_every_nan_and_infinity(dtype, value, where):
    net = nn.Sequential(nn.Linear(64, 33), nn.Linear(33, 1000), nn.Linear(1000, 3)).to(dtype)
    masks = MaskSet(prunable_parameters(net))
    assert non_finite_parameters(masks) == []
    flat = net[1].weight.view(-1)
    index = {"first": 0, "middle": flat.numel() // 2, "last": flat.numel() - 1}[where]
    with torch.no_grad():
        flat[index] = value
    assert non_finite_parameters(masks) == ["1.weight"]


def test_non_finite_parameters_of_an_empty_parameter_is_empty():
    masks = MaskSet({"empty": nn.Parameter(torch.empty(0, 4)), "w": nn.Parameter(torch.ones(2, 2))})
    assert non_finite_parameters(masks) == []


_NON_FINITE_MEMORY = """
import resource, torch
from torch import nn
from lightning_prune.masks.maskset import MaskSet, non_finite_parameters
torch.set_num_threads(1)
masks = MaskSet({f"w{i}": nn.Parameter(torch.ones(4096, 4096)) for i in range(4)})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert non_finite_parameters(masks) == []
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_non_finite_parameters_allocates_nothing_full_size():
    # 64M weights in 4 tensors: a bool copy per tensor (torch.isfinite) raised the peak by about 180 MB.
    done = subprocess.run(
        [sys.executable, "-c", _NON_FINITE_MEMORY], capture_output=True, text=True, check=True, timeout=300
    )
    rise_mb = float(done.stdout.strip().splitlines()[-1])
    assert rise_mb < 16, f"non_finite_parameters raised the peak resident size by {rise_mb:.0f} MB"
