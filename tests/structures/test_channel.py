"""Channel pruning in plain PyTorch: coupled groups, channel masks, selection, compaction and compact save/load."""

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.criteria.base import Importance
from lightning_prune.criteria.magnitude import LpNormImportance
from lightning_prune.deploy.compact import compact, compact_state, load_compact, save_compact
from lightning_prune.masks.channels import ChannelMaskSet
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.models import MLP, VGG, SmallCNN, resnet20, resnet56, torchvision_model
from lightning_prune.structures.channel import ChannelStructure, prune_channels_
from lightning_prune.structures.tracing import channel_groups

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- helpers
def build(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``factory()`` with a seeded initialisation, leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


@torch.no_grad()
def randomise_batchnorm_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm: random running statistics, gamma and beta (so a pruned channel's BN is not a no-op)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.3 * torch.randn(n, generator=g))
    return model


def inputs(*shape: int, seed: int = 2) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, example: Any) -> Tensor:
    """The model's output in eval mode, without gradients (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example, dict):
                return model(**example)
            if isinstance(example, tuple):
                return model(*example)
            return model(example)
    finally:
        model.train(was_training)


def relative_error(expected: Tensor, got: Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max())


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def out_width(module: nn.Module) -> int:
    return module.out_channels if hasattr(module, "out_channels") else module.out_features


def expected_shapes(model: nn.Module, masks: ChannelMaskSet) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape once the pruned channels' positions are removed."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    for g in masks.groups:
        dropped = ~masks.kept(g)
        for s in g.slices:
            shapes[s.param][s.dim] -= int(dropped[s.root].sum())
    return {n: tuple(s) for n, s in shapes.items()}


def assert_compact_matches_masks(model: nn.Module, small: nn.Module, masks: ChannelMaskSet) -> None:
    modules = dict(small.named_modules())
    for g in masks.groups:
        assert out_width(modules[g.name]) == int(masks.kept(g).sum()), g.name
    got = {n: tuple(p.shape) for n, p in small.named_parameters()}
    assert got == expected_shapes(model, masks)


def zero_rows(weight: Tensor, dim: int = 0) -> set[int]:
    """Positions along ``dim`` whose every entry is exactly zero."""
    rows = weight.detach().movedim(dim, 0).reshape(weight.shape[dim], -1)
    return set(torch.nonzero((rows == 0).all(1)).flatten().tolist())


def assert_pruned_channels_zero(model: nn.Module, masks: ChannelMaskSet) -> None:
    """Each pruned channel is zero in every slice of its group; each kept channel is not zero everywhere."""
    params = dict(model.named_parameters())
    for g in masks.groups:
        kept = masks.kept(g)
        alive = torch.zeros(g.channels, dtype=torch.bool)
        for s in g.slices:
            rows = s.rows(params[s.param].detach())
            pruned = ~kept[s.root]
            assert bool((rows[pruned] == 0).all()), f"{s.param} has non-zero entries of pruned channels of {g.name}"
            alive.index_put_((s.root,), (rows != 0).any(1), accumulate=True)
        assert torch.equal(alive, kept), g.name


# ---------------------------------------------------------------------------------------------- general-case models
class Concat(nn.Module):
    """Two conv branches concatenated, a shared BatchNorm, dropout and a flatten into the head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 1)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(torch.flatten(self.drop(F.relu(self.c(y))), 1))


class DepthwiseSeparable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn1 = nn.BatchNorm2d(12)
        self.pw = nn.Conv2d(12, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        return self.head(x.mean((2, 3)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + self.c2(F.relu(self.c1(x)))
        return self.head(x.mean((2, 3)))


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn2 = nn.BatchNorm2d(6)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.bn2(self.up(F.relu(self.bn(self.down(x)))))))


class Sequence1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 10, 3, padding=1)
        self.bn = nn.BatchNorm1d(10)
        self.c2 = nn.Conv1d(10, 12, 3)
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).amax(-1))


class TwoInputs(nn.Module):
    """A forward with two tensors and a keyword argument; the two input layers are coupled by the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 12)
        self.b = nn.Linear(3, 12)
        self.fc = nn.Linear(12, 10)
        self.head = nn.Linear(10, 2)

    def forward(self, x: Tensor, y: Tensor, scale: float = 1.0) -> Tensor:
        return self.head(F.relu(self.fc(F.relu(self.a(x) + self.b(y))))) * scale


class Grouped(nn.Module):
    """GroupNorm and a grouped convolution with fewer outputs than inputs, whose channels cannot be masked one by
    one (one with as many outputs as inputs is pruned: test_channel_grouped.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.g = nn.Conv2d(12, 6, 3, padding=1, groups=3)
        self.c3 = nn.Conv2d(6, 10, 1)
        self.head = nn.Linear(10, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.gn(self.c1(x)))
        x = F.relu(self.bn(self.c2(x)))
        x = F.relu(self.c3(F.relu(self.g(x))))
        return self.head(x.mean((2, 3)))


class SplitBranches(nn.Module):
    """``torch.split`` of one layer's channels into two branches (as in ShuffleNetV2 or CSP blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(4, 6, 1)
        self.right = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, b = torch.split(F.relu(self.c1(x)), [4, 4], dim=1)
        return self.head(torch.cat([self.left(a), self.right(b)], 1).mean((2, 3)))


class FeaturesToo(nn.Module):
    """Returns the logits and the last feature map, whose channels are therefore part of the output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.head(h.mean((2, 3))), h


class ChannelMean(nn.Module):
    """Adds a per-sample mean over all of ``c1``'s channels to the logits (a broadcast add)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.sigmoid(self.c1(x))
        return self.head(self.c2(h).mean((2, 3)) + h.mean((1, 2, 3))[:, None])


# ---------------------------------------------------------------------------------------------- 1. equivalence
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: MLP(), (2, 1, 8, 8)),
    "small_cnn": (lambda: SmallCNN(), (2, 1, 8, 8)),
    "vgg_tiny": (lambda: VGG("tiny"), (2, 3, 32, 32)),
    "vgg_style": (lambda: VGG((16, 16, "M", 32, "M", 32, 32)), (2, 3, 16, 16)),
    "resnet20": (resnet20, (2, 3, 32, 32)),
    "resnet56": (resnet56, (2, 3, 32, 32)),
    "resnet18": (lambda: torchvision_model("resnet18", num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision_model("mobilenet_v2", num_classes=10), (2, 3, 32, 32)),
}


EQUIVALENCE_CASES: list[tuple[str, float, dict[str, Any]]] = [
    ("mlp", 0.5, {}),
    ("small_cnn", 0.5, {}),
    ("small_cnn", 0.7, {"scope": "layer", "round_to": 8}),
    ("vgg_tiny", 0.7, {}),
    ("vgg_style", 0.3, {"scope": "layer"}),
    ("resnet20", 0.5, {}),
    ("resnet20", 0.3, {"round_to": 8}),
    ("resnet20", 0.7, {"scope": "layer", "importance": "l2"}),
    ("resnet56", 0.5, {}),
    ("resnet18", 0.5, {"round_to": 8}),
    ("resnet18", 0.7, {"scope": "layer"}),
    ("mobilenet_v2", 0.5, {}),
    ("mobilenet_v2", 0.3, {"scope": "layer", "round_to": 8}),
]


@pytest.mark.parametrize(
    ("name", "sparsity", "kwargs"),
    EQUIVALENCE_CASES,
    ids=["-".join([n, str(s), *(f"{k}={v}" for k, v in kw.items())]) for n, s, kw in EQUIVALENCE_CASES],
)
def test_compact_model_computes_what_the_masked_model_computes(name, sparsity, kwargs):
    factory, shape = ZOO[name]
    model = randomise_batchnorm_(build(factory)).eval()
    x = inputs(*shape)
    masks = prune_channels_(model, x, sparsity, **kwargs)
    assert masks.num_pruned_channels() > 0
    before = snapshot(model)

    small = compact(model, x)

    assert_same_state(before, model)  # the original is untouched
    assert not small.training
    expected, got = run(model, x), run(small, x)
    assert got.shape == expected.shape
    assert relative_error(expected, got) <= 1e-5
    assert num_params(small) < num_params(model)
    assert_compact_matches_masks(model, small, masks)


def test_compact_keeps_the_training_mode_and_verifies_in_eval_mode():
    model = build(Concat)  # dropout and BatchNorm: training mode would make outputs differ
    x = inputs(2, 3, 4, 4)
    prune_channels_(model, x, 0.5)
    assert model.training
    small = compact(model, x)
    assert small.training and model.training
    assert relative_error(run(model, x), run(small, x)) <= 1e-5


# ---------------------------------------------------------------------------------------------- 2. general case
GENERAL: dict[str, tuple[Callable[[], nn.Module], Any]] = {
    "concat_dropout_flatten": (Concat, (2, 3, 4, 4)),
    "depthwise_separable": (DepthwiseSeparable, (2, 3, 6, 6)),
    "residual_add": (Residual, (2, 3, 6, 6)),
    "conv_transpose": (Transposed, (2, 3, 8, 8)),
    "conv1d": (Sequence1d, (2, 4, 9)),
    "tuple_inputs": (TwoInputs, ((2, 5), (2, 3))),
    "keyword_inputs": (TwoInputs, {"x": (2, 5), "y": (2, 3), "scale": 2.0}),
}


def make_example(spec: Any) -> Any:
    if isinstance(spec, dict):
        return {k: make_example(v) for k, v in spec.items()}
    if isinstance(spec, tuple) and spec and isinstance(spec[0], tuple):
        return tuple(inputs(*s, seed=i) for i, s in enumerate(spec))
    if isinstance(spec, tuple):
        return inputs(*spec)
    return spec


@pytest.mark.parametrize("name", list(GENERAL))
def test_models_of_every_shape_compact_exactly(name):
    factory, spec = GENERAL[name]
    model = randomise_batchnorm_(build(factory)).eval()
    x = make_example(spec)
    masks = prune_channels_(model, x, 0.5)
    assert masks.channel_sparsity() == round(0.5 * masks.num_channels()) / masks.num_channels()
    assert_pruned_channels_zero(model, masks)
    before = snapshot(model)
    small = compact(model, x)
    assert_same_state(before, model)
    assert relative_error(run(model, x), run(small, x)) <= 1e-5
    assert num_params(small) < num_params(model)
    assert_compact_matches_masks(model, small, masks)


def test_group_norm_and_grouped_convolutions_are_left_whole_with_a_warning():
    model = randomise_batchnorm_(build(Grouped)).eval()
    with torch.no_grad():
        model.gn.bias.copy_(inputs(8, seed=3))
    x = inputs(2, 3, 6, 6)
    whole = r"leaves these layers' channel groups whole: .*c2 \(through g: Conv2d\).*c1 \(through gn: GroupNorm\)"
    with pytest.warns(UserWarning, match=whole):
        masks = prune_channels_(model, x, 0.5)
    assert [g.name for g in masks.groups] == ["c3"]
    touched = set(masks.names)
    assert touched == {"c3.weight", "c3.bias", "head.weight"}
    for name in ("c1.weight", "gn.weight", "gn.bias", "c2.weight", "bn.weight", "g.weight", "g.bias"):
        assert name not in touched
        assert not zero_rows(dict(model.named_parameters())[name]), name
    with pytest.warns(UserWarning, match="GroupNorm"):
        small = compact(model, x)
    assert (small.c1.out_channels, small.gn.num_channels, small.c2.out_channels, small.g.out_channels) == (8, 8, 12, 6)
    assert small.c3.out_channels == 5
    assert relative_error(run(model, x), run(small, x)) <= 1e-5


def test_ignored_layers_keep_their_channels():
    model = build(lambda: SmallCNN(channels=(8, 16), hidden=32)).eval()
    x = inputs(2, 1, 8, 8)
    names = [g.name for g in channel_groups(model, x)]
    assert sorted(names) == ["classifier.1", "features.0", "features.4"]
    masks = prune_channels_(model, x, 0.5, ignore=["features.0"])
    assert sorted(g.name for g in masks.groups) == ["classifier.1", "features.4"]
    assert not zero_rows(model.features[0].weight) and not zero_rows(model.features[1].weight)
    assert compact(model, x, ignore=["features.0"]).features[0].out_channels == 8


def test_tracing_and_compaction_work_without_gradients():
    model = build(lambda: SmallCNN(channels=(8, 16), hidden=32)).eval()
    x = inputs(2, 1, 8, 8)
    with torch.no_grad():  # as in an evaluation script
        masks = prune_channels_(model, x, 0.5)
        small = compact(model, x)
    assert masks.num_pruned_channels() == 28
    assert relative_error(run(model, x), run(small, x)) <= 1e-5


def test_tracing_leaves_the_model_as_it_was():
    model = build(lambda: SmallCNN(channels=(8, 16), hidden=32))
    model.train()
    before = snapshot(model)
    channel_groups(model, inputs(4, 1, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert_same_state(before, model)  # BatchNorm statistics were not updated by the trace
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# The next three are models whose couplings Torch-Pruning's trace gets wrong; the masks must still be right
# (or the group left whole / a clear error raised) so that compaction at the end of a long run does not fail.
def test_split_branches_are_coupled_to_the_channels_they_read():
    model = build(SplitBranches).eval()
    x = inputs(2, 3, 6, 6)
    masks = prune_channels_(model, x, 0.5)
    pruned = zero_rows(model.c1.weight)
    # c1's channels 0-3 feed `left`, 4-7 feed `right`: a pruned c1 channel must be zero in that branch's columns.
    for c in pruned:
        reader, column = (model.left, c) if c < 4 else (model.right, c - 4)
        assert bool((reader.weight[:, column] == 0).all()), f"c1 channel {c} still feeds the branch reading it"
    small = compact(model, x)
    assert relative_error(run(model, x), run(small, x)) <= 1e-5
    assert_compact_matches_masks(model, small, masks)


def test_a_group_whose_channels_are_returned_by_the_model_is_left_whole():
    model = build(FeaturesToo).eval()
    x = inputs(2, 3, 6, 6)
    masks = prune_channels_(model, x, 0.5)
    assert "c2" not in [g.name for g in masks.groups], "c2's channels are the model's second output"
    small = compact(model, x)
    (logits, features), (small_logits, small_features) = run(model, x), run(small, x)
    assert small_features.shape == features.shape
    assert relative_error(logits, small_logits) <= 1e-5


def test_a_reduction_over_channels_fails_clearly_or_compacts_exactly():
    model = build(ChannelMean).eval()
    x = inputs(2, 3, 6, 6)
    try:
        prune_channels_(model, x, 0.5)
    except ValueError:
        return  # refused with a clear message: acceptable
    assert relative_error(run(model, x), run(compact(model, x), x)) <= 1e-5


# ---------------------------------------------------------------------------------------------- 3. coupling
def test_pruned_channels_are_zero_in_every_coupled_slice_through_flatten():
    model = randomise_batchnorm_(build(lambda: SmallCNN(channels=(8, 16), hidden=32))).eval()
    masks = prune_channels_(model, inputs(2, 1, 8, 8), 0.5)
    assert_pruned_channels_zero(model, masks)
    conv0, bn0, conv1, bn1 = model.features[0], model.features[1], model.features[4], model.features[5]
    fc = model.classifier[1]  # reads 16 channels x (2 x 2) pooled positions, flattened channel-major
    first = zero_rows(conv0.weight)
    assert first and first == zero_rows(bn0.weight) == zero_rows(bn0.bias)
    assert first <= zero_rows(conv1.weight, dim=1)
    second = zero_rows(conv1.weight)
    assert second and second == zero_rows(bn1.weight) == zero_rows(bn1.bias)
    flat_zero = zero_rows(fc.weight, dim=1)
    assert {c * 4 + k for c in second for k in range(4)} <= flat_zero
    kept = set(range(16)) - second
    assert not any(c * 4 + k in flat_zero for c in kept for k in range(4))
    hidden = zero_rows(fc.weight)
    assert hidden and hidden == zero_rows(fc.bias) and hidden <= zero_rows(model.head.weight, dim=1)


def test_concatenated_branches_map_to_their_own_positions():
    model = randomise_batchnorm_(build(Concat)).eval()
    masks = prune_channels_(model, inputs(2, 3, 4, 4), 0.5)
    assert_pruned_channels_zero(model, masks)
    bn_zero = zero_rows(model.bn.weight)
    a_zero, b_zero = zero_rows(model.a.weight), zero_rows(model.b.weight)
    assert a_zero and b_zero
    assert bn_zero == a_zero | {6 + j for j in b_zero} == zero_rows(model.bn.bias)
    assert zero_rows(model.c.weight, dim=1) == bn_zero
    assert a_zero == zero_rows(model.a.bias) and b_zero == zero_rows(model.b.bias)
    c_zero = zero_rows(model.c.weight)
    assert zero_rows(model.head.weight, dim=1) == {16 * c + k for c in c_zero for k in range(16)}


def test_residual_coupled_layers_prune_the_same_channels():
    model = randomise_batchnorm_(build(resnet20)).eval()
    masks = prune_channels_(model, inputs(2, 3, 32, 32), 0.5)
    assert_pruned_channels_zero(model, masks)
    for stage, entry in ((model.layer1, model.stem[0]), (model.layer2, model.layer2[0].shortcut[0])):
        writers = [entry.weight] + [block.conv2.weight for block in stage]
        norms = [block.bn2.weight for block in stage] + [block.bn2.bias for block in stage]
        pruned = zero_rows(writers[0])
        assert pruned, "no channel of the residual stream was pruned"
        assert all(zero_rows(w) == pruned for w in writers + norms)
        readers = [block.conv1.weight for block in stage[1:]]
        assert all(pruned <= zero_rows(w, dim=1) for w in readers)
    stream = zero_rows(model.layer3[0].shortcut[0].weight)
    assert zero_rows(model.head.weight, dim=1) == stream


# ---------------------------------------------------------------------------------------------- 4. selection
def pruned_counts(masks: ChannelMaskSet) -> dict[str, int]:
    return {g.name: int((~masks.kept(g)).sum()) for g in masks.groups}


def test_layer_scope_prunes_round_s_n_in_every_group():
    model = build(lambda: SmallCNN(channels=(10, 20), hidden=30)).eval()
    masks = prune_channels_(model, inputs(2, 1, 8, 8), 0.25, scope="layer")
    assert pruned_counts(masks) == {"features.0": round(2.5), "features.4": 5, "classifier.1": round(7.5)}


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.6])
def test_global_scope_reaches_round_s_n_channels(sparsity):
    model = build(lambda: SmallCNN(channels=(10, 20), hidden=30)).eval()
    masks = prune_channels_(model, inputs(2, 1, 8, 8), sparsity)
    assert masks.num_channels() == 60
    assert masks.num_pruned_channels() == round(sparsity * 60)
    assert ChannelStructure().sparsity(masks) == round(sparsity * 60) / 60


def chain(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_max_layer_sparsity_caps_every_group_under_global_scope():
    model = build(lambda: chain((4, 8, 12, 2)))
    with torch.no_grad():  # seven of the first layer's eight channels are tiny: globally, they would all go first
        model[0].weight[1:] *= 1e-4
        model[0].bias[1:] *= 1e-4
        model[2].weight[:, 1:] *= 1e-4
    masks = prune_channels_(model, inputs(2, 4), 0.6, max_layer_sparsity=0.7)
    counts = pruned_counts(masks)
    assert counts["0"] == 8 - 3  # ceil(0.3 * 8) channels stay
    assert sum(counts.values()) == round(0.6 * 20)
    assert all(n / g.channels <= 0.7 for g, n in zip(masks.groups, counts.values()))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_round_to_keeps_multiples_or_the_full_count(scope):
    model = build(lambda: SmallCNN(channels=(16, 24), hidden=20)).eval()
    structure = ChannelStructure(round_to=8)
    masks = structure.bind(model, example_inputs=inputs(2, 1, 8, 8))
    for sparsity in (0.25, 0.4, 0.55):  # at most 60% can go: 8 channels stay in each group
        structure.prune_(masks, LpNormImportance(1), sparsity, scope)
        for g in masks.groups:
            kept = int(masks.kept(g).sum())
            assert kept % 8 == 0 or kept == g.channels, (g.name, kept)
    assert masks.num_pruned_channels() > 0


@pytest.mark.parametrize(("scope", "round_to"), [("global", 1), ("global", 4), ("layer", 1)])
def test_growing_sparsity_never_revives_a_channel(scope, round_to):
    model = build(lambda: SmallCNN(channels=(8, 16), hidden=32)).eval()
    x = inputs(2, 1, 8, 8)
    structure = ChannelStructure(round_to=round_to)
    masks = structure.bind(model, example_inputs=x)
    previous = [torch.ones(g.channels, dtype=torch.bool) for g in masks.groups]
    g = torch.Generator().manual_seed(5)
    for sparsity in (0.2, 0.4, 0.6):
        with torch.no_grad():  # training moves every weight, pruned ones included when nothing re-masks them
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        structure.prune_(masks, LpNormImportance(1), sparsity, scope)
        kept = [masks.kept(grp) for grp in masks.groups]
        for before, now in zip(previous, kept):
            assert not bool((now & ~before).any()), "a pruned channel came back"
        assert sum(int((~k).sum()) for k in kept) >= sum(int((~k).sum()) for k in previous)
        assert_pruned_channels_zero(model, masks)
        previous = kept
    if round_to == 1 and scope == "global":
        assert masks.num_pruned_channels() == round(0.6 * masks.num_channels())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_channels_with_the_lowest_l1_norm_go_first(scope):
    model = nn.Sequential(nn.Conv2d(2, 6, 1, bias=False), nn.ReLU(), nn.Conv2d(6, 1, 1, bias=False))
    norms = torch.tensor([6.0, 1.0, 5.0, 2.0, 4.0, 3.0])  # each row is (n / 2, -n / 2): L1 norm n
    with torch.no_grad():
        model[0].weight.copy_((norms / 2).view(6, 1, 1, 1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
        model[2].weight.fill_(0.5)
    masks = prune_channels_(model, inputs(2, 2, 4, 4), 0.5, scope=scope)
    assert zero_rows(model[0].weight) == {1, 3, 5}
    assert masks.kept(masks.groups[0]).tolist() == [True, False, True, False, True, False]


def test_l2_ranks_channels_differently_from_l1():
    def crafted() -> nn.Sequential:
        net = nn.Sequential(nn.Linear(4, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]]))  # L1 4 vs 3, L2 2 vs 3
            net[2].weight.fill_(0.5)
        return net

    x = inputs(2, 4)
    by_l1, by_l2 = crafted(), crafted()
    prune_channels_(by_l1, x, 0.5, importance="l1")
    prune_channels_(by_l2, x, 0.5, importance="l2")
    assert zero_rows(by_l1[0].weight) == {1}
    assert zero_rows(by_l2[0].weight) == {0}
    magnitude = crafted()
    prune_channels_(magnitude, x, 0.5, importance="magnitude")
    assert torch.equal(magnitude[0].weight, by_l1[0].weight)


def test_summary_lists_every_group():
    model = build(lambda: SmallCNN(channels=(8, 16), hidden=32)).eval()
    masks = prune_channels_(model, inputs(2, 1, 8, 8), 0.5)
    table = ChannelStructure().summary(masks)
    assert "features.0" in table and "classifier.1" in table
    assert "28 / 56" in table and "50.00%" in table
    assert ChannelStructure().layer_sparsity(masks) == masks.group_sparsity()


# ---------------------------------------------------------------------------------------------- 5. bad input
class HalfScore(Importance):
    """A criterion that is not a norm of the weights."""

    def __call__(self, name: str, param: Tensor) -> Tensor:
        return param.detach().abs() * 0.5


def test_round_to_larger_than_a_layer_names_the_layer():
    with pytest.raises(ValueError, match=r"`round_to`=64 would empty layer 'features.0', which has 32 channels"):
        ChannelStructure(round_to=64).bind(build(SmallCNN), example_inputs=inputs(2, 1, 8, 8))


def test_unreachable_sparsity_under_the_cap_is_refused():
    model = build(lambda: SmallCNN(channels=(8, 16), hidden=32)).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot prune 95% of the channels: .*`max_layer_sparsity`=0.5"):
        prune_channels_(model, inputs(2, 1, 8, 8), 0.95, max_layer_sparsity=0.5)
    assert_same_state(before, model)


@pytest.mark.parametrize(
    ("example", "match"),
    [
        (inputs(2, 3, 8, 8), r"SmallCNN cannot run on the `example_inputs` \(tensor of shape \(2, 3, 8, 8\)\)"),
        ((inputs(2, 1, 8, 8), inputs(2)), r"tensor of shape \(2, 1, 8, 8\), tensor of shape \(2,\)"),
        (None, "Channel pruning needs `example_inputs` to trace SmallCNN"),
    ],
)
def test_bad_example_inputs_raise_a_value_error_naming_them(example, match):
    model = build(SmallCNN)
    with pytest.raises(ValueError, match=match):
        channel_groups(model, example)
    with pytest.raises(ValueError, match=match):
        prune_channels_(model, example, 0.5)
    with pytest.raises(ValueError, match=match):
        compact(model, example)


def test_importance_that_is_not_a_weight_norm_is_refused():
    structure = ChannelStructure()
    with pytest.raises(ValueError, match=r"supports importance 'l1', 'l2' or 'magnitude'.*HalfScore"):
        structure.check_importance(HalfScore())
    structure.check_importance(LpNormImportance(2))  # accepted
    with pytest.raises(ValueError, match="HalfScore"):
        prune_channels_(build(SmallCNN), inputs(2, 1, 8, 8), 0.5, importance=HalfScore())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"round_to": 0}, r"`round_to` must be a positive integer, got 0"),
        ({"round_to": True}, r"`round_to` must be a positive integer, got True"),
        ({"max_layer_sparsity": 1.0}, r"`max_layer_sparsity` must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_channel_structure_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChannelStructure(**kwargs)


def test_ignore_pattern_matching_nothing_is_refused():
    with pytest.raises(ValueError, match=r"`ignore` pattern 'classifier.9' matches no module of SmallCNN"):
        prune_channels_(build(SmallCNN), inputs(2, 1, 8, 8), 0.5, ignore=["classifier.9"])


def test_compaction_failing_in_the_surgery_leaves_the_original_unchanged(monkeypatch):
    from torch_pruning.dependency.group import Group

    model = randomise_batchnorm_(build(lambda: SmallCNN(channels=(8, 16), hidden=32))).eval()
    x = inputs(2, 1, 8, 8)
    prune_channels_(model, x, 0.5)
    before, expected = snapshot(model), run(model, x)
    original, calls = Group.prune, []

    def prune_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first group was already cut out of the copy
            raise RuntimeError("surgery interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Group, "prune", prune_then_fail)
    with pytest.raises(RuntimeError, match=r"failed in the layer surgery \(RuntimeError: surgery interrupted\)"):
        compact(model, x)
    assert len(calls) == 2
    assert_same_state(before, model)
    assert model.features[0].out_channels == 8 and model.classifier[1].out_features == 32
    assert torch.equal(run(model, x), expected)


# ---------------------------------------------------------------------------------------------- 6. saving
@pytest.mark.parametrize(
    "factory", [lambda: SmallCNN(channels=(8, 16), hidden=32), DepthwiseSeparable], ids=["small_cnn", "depthwise"]
)
def test_compact_state_round_trip_into_a_fresh_instance(factory, tmp_path):
    model = randomise_batchnorm_(build(factory)).eval()
    x = inputs(2, 1, 8, 8) if isinstance(model, SmallCNN) else inputs(2, 3, 6, 6)
    prune_channels_(model, x, 0.5)
    small = compact(model, x)
    for state in (compact_state(small), save_compact(small, tmp_path / "nested" / "small.pt")):
        fresh = build(factory, seed=7)
        loaded = load_compact(fresh, state)
        assert loaded is fresh
        assert {k: v.shape for k, v in loaded.state_dict().items()} == {
            k: v.shape for k, v in small.state_dict().items()
        }
        assert torch.equal(run(loaded, x), run(small, x))
        assert num_params(loaded) == num_params(small)


def test_a_loaded_compact_model_trains():
    model = build(DepthwiseSeparable)
    x = inputs(4, 3, 6, 6)
    prune_channels_(model, x, 0.5)
    loaded = load_compact(build(DepthwiseSeparable, seed=3), compact_state(compact(model, x)))
    assert loaded.dw.groups == loaded.dw.in_channels == loaded.dw.out_channels < 12
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    before = snapshot(loaded)
    loaded.train()
    loss = loaded(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in loaded.parameters())
    opt.step()
    assert not torch.equal(loaded.pw.weight, before["pw.weight"])


def test_loading_into_another_architecture_is_refused(tmp_path):
    model = build(lambda: SmallCNN(channels=(8, 16), hidden=32)).eval()
    x = inputs(2, 1, 8, 8)
    prune_channels_(model, x, 0.5)
    path = save_compact(compact(model, x), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="was saved from a SmallCNN, not a VGG"):
        load_compact(VGG("tiny", in_channels=1), path)
    with pytest.raises(ValueError, match=r"has layers this SmallCNN lacks: \['features.5'"):
        load_compact(SmallCNN(channels=(8,), hidden=32), path)


def test_loading_into_a_deeper_instance_of_the_same_class_is_refused(tmp_path):
    model = build(lambda: SmallCNN(channels=(8, 16), hidden=32)).eval()
    x = inputs(2, 1, 8, 8)
    prune_channels_(model, x, 0.5)
    path = save_compact(compact(model, x), tmp_path / "small.pt")
    with pytest.raises(
        ValueError,
        match=r"The compact model's weights do not fit this SmallCNN: missing \['features\.8\.weight', .*"
        r"unexpected \[\]\. Build the model with the constructor arguments it was trained with\.",
    ):
        load_compact(SmallCNN(channels=(8, 16, 16), hidden=32), path)


def test_loading_a_file_that_is_not_a_compact_model_is_refused(tmp_path):
    model = build(SmallCNN)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"is not a compact model saved by lightning_prune\.save_compact"):
        load_compact(build(SmallCNN), tmp_path / "plain.pt")
    state = compact_state(model)
    state["version"] = 99
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        load_compact(build(SmallCNN), state)


# ---------------------------------------------------------------------------------------------- 7. masks under training
OPTIMIZERS = {
    "sgd_momentum_decay": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_channel_masks_stay_exactly_zero_under_training(optimizer):
    model = randomise_batchnorm_(build(Concat))
    masks = prune_channels_(model, inputs(2, 3, 4, 4), 0.5)
    assert isinstance(masks, ChannelMaskSet) and isinstance(masks, MaskSet)
    assert {"bn.weight", "bn.bias", "a.bias", "c.bias", "head.weight"} <= set(masks.names)
    opt = OPTIMIZERS[optimizer](model.parameters())
    masks.attach([opt])
    before = snapshot(model)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(30):
        x = torch.randn(8, 3, 4, 4, generator=g)
        loss = (model(x) - 1.0).square().mean()
        opt.zero_grad()
        loss.backward()
        for name, p, m in zip(masks.names, masks.params, masks.masks):
            assert bool((p.grad[~m] == 0).all()), f"gradient of a pruned entry of {name}"
        opt.step()
        for name, p, m in zip(masks.names, masks.params, masks.masks):
            assert bool((p[~m] == 0).all()), name
            for value in opt.state[p].values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert bool((value[~m] == 0).all()), f"optimizer state of {name}"
    assert_pruned_channels_zero(model, masks)
    assert not torch.equal(model.c.weight, before["c.weight"]), "the kept weights did not train"
    masks.detach()
    assert not masks.attached


def test_channel_masks_round_trip_through_their_state_dict():
    x = inputs(2, 1, 8, 8)
    model = build(lambda: SmallCNN(channels=(8, 16), hidden=32)).eval()
    masks = prune_channels_(model, x, 0.5)
    fresh = build(lambda: SmallCNN(channels=(8, 16), hidden=32), seed=1).eval()
    restored = ChannelStructure().bind(fresh, example_inputs=x)
    restored.load_state_dict(masks.state_dict())
    assert [restored.kept(g).tolist() for g in restored.groups] == [masks.kept(g).tolist() for g in masks.groups]
    assert_pruned_channels_zero(fresh, restored)


class _DetachedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).detach()


class _NoTensorOutput(_DetachedOutput):
    def forward(self, x):
        return {"label": "x", "n": int(self.b(self.a(x)).argmax())}


@pytest.mark.parametrize(
    ("model", "match"),
    [(_DetachedOutput, "has no channel group to prune"), (_NoTensorOutput, "could not trace the channel couplings")],
)
def test_a_model_that_cannot_be_traced_is_refused_clearly(model, match):
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_channels_(net, torch.randn(2, 4), sparsity=0.5)
    with pytest.raises(ValueError, match=match):
        compact(net, torch.randn(2, 4))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
