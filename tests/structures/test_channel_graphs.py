"""Channel graphs beyond plain chains: concatenations feeding residual sums (the cap holds for every producer),
depthwise layers, and ops the tracer cannot follow (left whole with a warning, never an exception)."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_prune.deploy.compact import compact
from lightning_prune.masks.channels import ChannelMaskSet
from lightning_prune.structures.channel import prune_channels_
from lightning_prune.structures.tracing import channel_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def build(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def inputs(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_same(model: nn.Module, small: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        expected, got = model(x), small(x)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def width(model: nn.Module, name: str) -> int:
    return dict(model.named_modules())[name].out_channels


# ---------------------------------------------------------------------------------------------- concatenations
class ConcatResidual(nn.Module):
    """The issue's case: a concatenation of a narrow and a wide producer feeds a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 56, 3, padding=1)
        self.r = nn.Conv2d(64, 64, 1)
        self.c = nn.Conv2d(64, 10, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.a(x), self.b(x)], 1)
        h = h + self.r(h)
        return self.c(h).mean((2, 3))


class ThreeWay(nn.Module):
    """A three-way concatenation, one producer depthwise, feeding a residual sum and a depthwise layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 4, 1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c = nn.Conv2d(16, 12, 1)
        self.r = nn.Conv2d(32, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(self.stem(x))
        h = torch.cat([self.a(s), self.b(s), self.c(s)], 1)
        h = h + self.r(h)
        return self.head(self.bn(self.dw(h))).mean((2, 3))


class ConcatOfConcat(nn.Module):
    """A concatenation of a concatenation and a third producer, feeding a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 3, padding=1)
        self.c = nn.Conv2d(3, 48, 3, padding=1)
        self.r = nn.Conv2d(64, 64, 1)
        self.head = nn.Conv2d(64, 10, 1)

    def forward(self, x: Tensor) -> Tensor:
        inner = torch.cat([self.a(x), self.b(x)], 1)
        h = torch.cat([inner, self.c(x)], 1)
        h = h + self.r(h)
        return self.head(h).mean((2, 3))


def weaken_(model: nn.Module, *names: str) -> nn.Module:
    """Scale the named layers' weights down so that a global norm ranking would take all their channels."""
    with torch.no_grad():
        for name in names:
            dict(model.named_modules())[name].weight.mul_(0.01)
    return model


def test_issue_case_keeps_every_producer_and_compacts_to_equal_outputs() -> None:
    model = weaken_(build(ConcatResidual), "a")
    x = inputs(2, 3, 8, 8)
    masks = prune_channels_(model, x, 0.5)
    group = next(g for g in masks.groups if g.channels == 64)
    assert [len(p) for p in group.parts] == [8, 56]
    kept = masks.kept(group)
    assert int(kept[:8].sum()) == 1  # the cap: 10% of a's 8 channels, at least one, stays
    small = compact(model, x)
    assert width(small, "a") == 1 and width(small, "b") + 1 == int(kept.sum())
    assert_same(model, small, x)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize(
    ("factory", "weak", "parts"),
    [
        (ThreeWay, ("a", "c"), [4, 16, 12]),
        (ConcatOfConcat, ("a", "b"), [6, 10, 48]),
    ],
    ids=["three-way-depthwise", "concat-of-concat"],
)
def test_cap_holds_for_every_producer(
    factory: Callable[[], nn.Module], weak: tuple[str, ...], parts: list[int], scope: str
) -> None:
    model = weaken_(build(factory), *weak)
    x = inputs(2, 3, 8, 8)
    masks = prune_channels_(model, x, 0.7, scope=scope, max_layer_sparsity=0.75)  # type: ignore[arg-type]
    group = next(g for g in masks.groups if g.channels == 32 or g.channels == 64)
    assert sorted(len(p) for p in group.parts) == sorted(parts)
    kept = masks.kept(group)
    for part in group.parts:
        assert int(kept[part].sum()) >= max(1, -(-len(part) // 4))  # 25% of each producer stays, rounded up
    small = compact(model, x)
    assert_same(model, small, x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_compact_keeps_a_channel_of_a_producer_zeroed_outside_the_masks() -> None:
    # Weights zeroed by hand (not by the structure): compaction must still leave every layer a channel.
    model = build(ConcatResidual)
    x = inputs(2, 3, 8, 8)
    with torch.no_grad():
        model.a.weight.zero_()
        model.a.bias.zero_()
        model.r.weight[:8].zero_()
        model.r.bias[:8].zero_()
        model.r.weight[:, :8].zero_()
        model.c.weight[:, :8].zero_()
    small = compact(model, x)
    assert width(small, "a") == 1 and width(small, "b") == 56
    assert_same(model, small, x)


def test_plain_group_has_no_parts() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    (group,) = channel_groups(net, inputs(2, 3, 8, 8))
    assert group.parts == ()
    assert isinstance(ChannelMaskSet(dict(net.named_parameters()), [group]), ChannelMaskSet)


# ---------------------------------------------------------------------------------------------- never crash
class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle between two convolutions (Torch-Pruning alone raises ZeroDivisionError)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 10, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.a(h))
        n, c, height, w = h.shape
        h = h.view(n, 2, c // 2, height, w).transpose(1, 2).contiguous().view(n, c, height, w)
        return self.head(torch.relu(self.b(h))).mean((2, 3))


def test_channel_shuffle_leaves_its_groups_whole_with_a_warning_and_compacts_the_rest() -> None:
    model = build(Shuffle)
    x = inputs(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"whole: a \(through TransposeBackward0, which moves or mixes the channel"):
        masks = prune_channels_(model, x, 0.3)
    assert sorted(g.name for g in masks.groups) == ["b", "stem"]  # a's channels cross the shuffle
    with pytest.warns(UserWarning, match="TransposeBackward0"):
        small = compact(model, x)
    assert small.a.out_channels == 8 and small.stem.out_channels < 16 and small.b.out_channels < 8
    assert_same(model, small, x)


class Untraceable(nn.Module):
    """A model whose output Torch-Pruning cannot trace (no tensor): its body is traced on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))

    def forward(self, x: Tensor) -> dict[str, object]:
        return {"label": "x", "n": int(self.body(x).argmax())}


def test_a_model_that_cannot_be_traced_as_a_whole_is_traced_part_by_part() -> None:
    model = build(Untraceable)
    x = inputs(2, 3, 8, 8)
    whole = r"whole: Untraceable as a whole \(could not be traced: .*its parts were traced one by one\)"
    with pytest.warns(UserWarning, match=whole):
        masks = prune_channels_(model, x, 0.5)
    assert [g.name for g in masks.groups] == ["body.0"]  # body.3's channels reach the body's output
    with pytest.warns(UserWarning, match=whole):
        small = compact(model, x)
    assert small.body[0].out_channels == 4 and small.body[1].num_features == 4 and small.body[3].in_channels == 4
    with torch.no_grad():
        assert torch.allclose(small.body(x), model.body(x), rtol=1e-5, atol=1e-6)


def test_tracing_past_its_time_budget_refuses_with_a_message_instead_of_running_on() -> None:
    from lightning_prune.structures.tracing import trace_groups

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    refused = r"could not trace the channel couplings of Sequential \(TraceBudgetExceeded"
    with pytest.warns(UserWarning, match="time budget"), pytest.raises(ValueError, match=refused):
        trace_groups(net, inputs(2, 3, 8, 8), (), budget_s=0.0)


def test_torchvision_shufflenet_prunes_and_compacts_to_equal_outputs() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = build(lambda: torchvision.models.shufflenet_v2_x0_5(weights=None))
    x = inputs(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="TransposeBackward0"):
        prune_channels_(model, x, 0.3)
    with pytest.warns(UserWarning, match="TransposeBackward0"):
        small = compact(model, x)
    assert_same(model, small, x)
    assert sum(p.numel() for p in small.parameters()) < 0.9 * sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "swin_s", "swin_v2_t", "maxvit_t", "shufflenet_v2_x1_0"])
def test_torchvision_models_the_tracer_could_not_follow_compact_to_equal_outputs(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = build(lambda: torchvision.models.get_model(name, weights=None))
    x = inputs(1, 3, 224, 224)
    with pytest.warns(UserWarning, match="whole"):
        prune_channels_(model, x, 0.3)
    with pytest.warns(UserWarning, match="whole"):
        small = compact(model, x)
    assert_same(model, small, x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
