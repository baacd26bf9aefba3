"""Channel pruning through general grouped convolutions (ResNeXt, RegNet): input channel c goes with output channel
c, every convolution group loses as many channels as the others, and compaction keeps ``groups``."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.criteria.activation import ActivationImportance
from lightning_prune.deploy.compact import compact, compact_state, load_compact
from lightning_prune.deploy.profile import count_macs
from lightning_prune.masks.channels import ChannelMaskSet, ChannelSlice
from lightning_prune.sensitivity import analyze
from lightning_prune.structures.channel import ChannelStructure, prune_channels_
from lightning_prune.structures.tracing import channel_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def build(factory: type[nn.Module], seed: int = 0) -> nn.Module:
    """``factory()`` seeded, in eval mode, with random BatchNorm statistics, gamma and beta (so that a pruned channel's
    BatchNorm is not a no-op); the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory().eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.3)
    return model


def inputs(*shape: int, seed: int = 2) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def relative_error(model: nn.Module, small: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        expected, got = model(x), small(x)
    assert got.shape == expected.shape
    return float((expected - got).abs().max() / expected.abs().max())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Bottleneck(nn.Module):
    """A ResNeXt-style block: 1x1 conv, BatchNorm, grouped 3x3 conv (4 groups of 4), BatchNorm, 1x1 conv, with a
    residual sum around them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 16, 1)
        self.bn_a = nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn_g = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 1)
        self.bn_c = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        y = F.relu(self.bn_a(self.a(x)))
        y = F.relu(self.bn_g(self.g(y)))
        return self.head(F.relu(x + self.bn_c(self.c(y))).mean((2, 3)))


@torch.no_grad()
def set_channel_scale_(model: Bottleneck, scale: list[float]) -> None:
    """Every scored entry of the grouped group's channel ``c`` times ``scale[c]``: the producer's row, the grouped
    convolution's row and its input column (in the rows of the channel's convolution group), the consumer's column."""
    width = model.g.weight.shape[1]
    for c, s in enumerate(scale):
        model.a.weight[c] *= s
        model.g.weight[c] *= s
        first = c // width * width
        model.g.weight[first : first + width, c % width] *= s
        model.c.weight[:, c] *= s


def grouped_group(masks: ChannelMaskSet, name: str = "g"):
    return next(g for g in masks.groups if name in [s.param.rpartition(".")[0] for s in g.slices if s.groups > 1])


# ---------------------------------------------------------------------------------------------- slices
def test_grouped_slice_owns_a_column_of_its_convolution_group_only() -> None:
    weight = torch.arange(1.0, 17.0).reshape(4, 2, 2)  # Conv1d(4, 4, 2, groups=2): rows 0-1 read inputs 0-1
    s = ChannelSlice("g.weight", 1, torch.arange(4), torch.arange(4), groups=2)
    assert s.rows(weight).tolist() == [[1, 2, 5, 6], [3, 4, 7, 8], [9, 10, 13, 14], [11, 12, 15, 16]]
    assert s.extent(weight) == 4
    s.fill_(weight, torch.tensor([1, 2]), 0.0)
    assert weight.tolist() == [[[1, 2], [0, 0]], [[5, 6], [0, 0]], [[0, 0], [11, 12]], [[0, 0], [15, 16]]]


def test_grouped_convolution_couples_its_inputs_and_outputs_in_one_group_with_equal_blocks() -> None:
    model = build(Bottleneck)
    groups = {g.name: g for g in channel_groups(model, inputs(2, 3, 6, 6))}
    grouped = next(g for g in groups.values() if "g.weight" in g.params())
    owners = ["g.weight", "g.bias", "bn_g.weight", "bn_g.bias", "c.weight", "bn_a.weight", "bn_a.bias", "a.weight"]
    assert grouped.params() == [*owners, "a.bias"]
    assert [(s.param, s.dim, s.groups) for s in grouped.slices if s.param == "g.weight"] == [
        ("g.weight", 1, 4),
        ("g.weight", 0, 1),
    ]
    assert grouped.blocks is not None and grouped.blocks.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert grouped.parts == ()
    assert len(groups) == 2  # the residual group (stem, c, bn_c, head) is the other


# ---------------------------------------------------------------------------------------------- selection
def test_layer_scope_prunes_the_lowest_channels_of_every_convolution_group_by_an_equal_count() -> None:
    model = build(Bottleneck)
    # Block 0 holds the four weakest channels: ranked alone, they would all go; each block loses its two lowest.
    set_channel_scale_(model, [0.01, 0.02, 0.04, 0.03, 5, 6, 8, 7, 9, 0.5, 10, 0.6, 3, 2, 4, 1])
    x = inputs(2, 3, 6, 6)
    masks = prune_channels_(model, x, 0.5, scope="layer")
    kept = masks.kept(grouped_group(masks))
    assert torch.nonzero(~kept).flatten().tolist() == [0, 1, 4, 5, 9, 11, 13, 15]
    weight = model.g.weight.detach()
    for c in (0, 1, 4, 5, 9, 11, 13, 15):  # the grouped convolution's row and its input column within the group
        assert bool((weight[c] == 0).all()) and bool((weight[c // 4 * 4 : c // 4 * 4 + 4, c % 4] == 0).all()), c
    assert bool((weight[kept] != 0).all(-1).all(-1).sum(1).eq(2).all())  # kept rows: their group's 2 kept inputs
    small = compact(model, x)
    assert (small.g.in_channels, small.g.out_channels, small.g.groups) == (8, 8, 4)
    assert tuple(small.g.weight.shape) == (8, 2, 3, 3)
    assert (small.a.out_channels, small.bn_a.num_features, small.bn_g.num_features, small.c.in_channels) == (8, 8, 8, 8)
    assert relative_error(model, small, x) <= 1e-5
    assert torch.equal(small.g.weight[0], weight[2][[2, 3]])  # channel 2 reads inputs 2 and 3 of its group


def test_global_scope_takes_whole_tiers_of_the_weakest_channels_and_keeps_the_other_group() -> None:
    model = build(Bottleneck)
    # Two near-zero channels in every block: relative to their group they are the weakest channels of the model.
    tiny = [0, 3, 5, 6, 8, 9, 14, 15]
    set_channel_scale_(model, [1e-3 if c in tiny else 1.0 for c in range(16)])
    x = inputs(2, 3, 6, 6)
    masks = prune_channels_(model, x, 8 / 24)  # 24 channels: 16 in the grouped group, 8 in the residual one
    assert torch.nonzero(~masks.kept(grouped_group(masks))).flatten().tolist() == tiny
    assert masks.num_pruned_channels() == 8
    assert relative_error(model, compact(model, x), x) <= 1e-5


@pytest.mark.parametrize("cap", [0.25, 0.5])
def test_the_cap_holds_for_a_grouped_group_and_its_blocks_stay_equal(cap: float) -> None:
    model = build(Bottleneck)
    set_channel_scale_(model, [1e-3, 1e-3, 1e-3, 1.0] * 4)  # three weak channels a block: all would go uncapped
    x = inputs(2, 3, 6, 6)
    masks = prune_channels_(model, x, 0.25, max_layer_sparsity=cap)
    group = grouped_group(masks)
    kept = masks.kept(group)
    assert group.blocks is not None
    per_block = torch.bincount(group.blocks[kept], minlength=4).tolist()
    assert per_block == [round(4 * (1 - cap))] * 4
    small = compact(model, x)
    assert small.g.groups == 4 and small.g.out_channels == sum(per_block)
    assert relative_error(model, small, x) <= 1e-5


def test_round_to_and_blocks_keep_a_common_multiple() -> None:
    model = build(Bottleneck)
    x = inputs(2, 3, 6, 6)
    masks = prune_channels_(model, x, 0.6, scope="layer", round_to=8)  # lcm(8, 4 blocks) = 8: 16 -> 8
    assert int(masks.kept(grouped_group(masks)).sum()) == 8
    assert relative_error(model, compact(model, x), x) <= 1e-5


def test_activation_criterion_reads_a_channel_where_the_grouped_convolution_and_the_consumer_read_it() -> None:
    model = build(Bottleneck)
    x = inputs(4, 3, 6, 6)
    masks = ChannelStructure().bind(model, example_inputs=x)
    criterion = ActivationImportance(batches=1, training_only=False)
    criterion.start(model, masks)
    seen: dict[str, Tensor] = {}

    def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        seen["g" if module is model.g else "c"] = args[0]

    hooks = [model.g.register_forward_hook(record), model.c.register_forward_hook(record)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    criterion.observe(masks)
    scores = criterion.channel_scores(masks, grouped_group(masks))
    # mean |a| over both readers' inputs: the grouped convolution's (channel c of its input) and c's
    g, c = seen["g"].double(), seen["c"].double()
    expected = (g.abs().sum((0, 2, 3)) + c.abs().sum((0, 2, 3))) / (2 * g[:, 0].numel())
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0.0)  # summed in float32


def test_compact_removes_as_many_zero_channels_from_every_convolution_group() -> None:
    model = build(Bottleneck)
    x = inputs(2, 3, 6, 6)
    masks = prune_channels_(model, x, 0.25, scope="layer")  # one channel of each convolution group
    extra = int(torch.nonzero(masks.kept(grouped_group(masks))[:4]).flatten()[0])  # a kept channel of group 0
    set_channel_scale_(model, [0.0 if c == extra else 1.0 for c in range(16)])  # zero, but outside the masks
    with torch.no_grad():
        for vector in (
            model.a.bias,
            model.bn_a.weight,
            model.bn_a.bias,
            model.g.bias,
            model.bn_g.weight,
            model.bn_g.bias,
        ):
            vector[extra] = 0.0
    small = compact(model, x)
    assert (small.g.out_channels, small.g.groups) == (12, 4)  # group 0's second zero channel stays
    assert relative_error(model, small, x) <= 1e-5


def test_sensitivity_counts_a_grouped_convolution_once_and_predicts_its_macs() -> None:
    model = build(Bottleneck)
    x = inputs(1, 3, 6, 6)
    table = analyze(model, evaluate=lambda m: 1.0, example_inputs=x, ratios=[0.5], structure="channel", metric="one")
    masks = prune_channels_(model, x, 0.5, scope="layer")
    name = grouped_group(masks).name
    assert table.layer(name).macs == (16 * 8 + 16 * 4 * 9 + 8 * 16) * 36  # a's rows, all of g, c's columns
    predicted = sum(term.after(masks.group_sparsity()) for term in table.mac_terms)  # g: (1 - 0.5) ** 2 of it
    assert count_macs(model, x).macs == pytest.approx(predicted, rel=1e-9)


# ---------------------------------------------------------------------------------------------- stacked
class Stacked(nn.Module):
    def __init__(self, first: int, second: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.g1 = nn.Conv2d(12, 12, 3, padding=1, groups=first)
        self.bn = nn.BatchNorm2d(12)
        self.g2 = nn.Conv2d(12, 12, 3, padding=1, groups=second)
        self.head = nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.g2(F.relu(self.bn(self.g1(F.relu(self.a(x))))))
        return self.head(F.relu(y).mean((2, 3)))


def test_nested_grouped_convolutions_prune_by_their_finest_groups() -> None:
    model = build(lambda: Stacked(4, 2))
    x = inputs(2, 3, 6, 6)
    masks = prune_channels_(model, x, 1 / 3, scope="layer")
    group = masks.groups[0]
    assert group.blocks is not None and group.blocks.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert torch.bincount(group.blocks[masks.kept(group)]).tolist() == [2, 2, 2, 2]
    small = compact(model, x)
    assert (small.g1.groups, small.g1.out_channels, small.g2.groups, small.g2.out_channels) == (4, 8, 2, 8)
    assert relative_error(model, small, x) <= 1e-5


def test_grouped_convolutions_whose_groups_cannot_stay_equal_are_left_whole_with_a_warning() -> None:
    model = build(lambda: Stacked(4, 3))  # blocks of 3 and of 4 channels: their overlaps are 1, 2 or 3 wide
    x = inputs(2, 3, 6, 6)
    whole = r"whole: g2 \(through g2, g1: grouped convolutions whose groups cannot all stay equal\)"
    with pytest.warns(UserWarning, match=whole), pytest.raises(ValueError, match="has no channel group to prune"):
        channel_groups(model, x)


# ---------------------------------------------------------------------------------------------- saving
def test_a_compact_grouped_model_saves_and_loads_into_a_fresh_instance() -> None:
    model = build(Bottleneck)
    x = inputs(2, 3, 6, 6)
    prune_channels_(model, x, 0.5)
    small = compact(model, x)
    fresh = load_compact(build(Bottleneck, seed=5), compact_state(small))
    assert (fresh.g.in_channels, fresh.g.out_channels, fresh.g.groups) == (small.g.in_channels, small.g.out_channels, 4)
    assert relative_error(small, fresh, x) == 0.0


# ---------------------------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize(("name", "before"), [("resnext50_32x4d", 0.293), ("regnet_y_400mf", 0.181)])
def test_torchvision_grouped_models_compact_to_equal_outputs_with_more_removed(name: str, before: float) -> None:
    """30% of the channels; ``before``: the fraction of parameters removed when grouped convolutions were left
    whole (ResNeXt's 3x3 convolutions with 32 groups, RegNet's group-width convolutions)."""
    torchvision = pytest.importorskip("torchvision")
    model = build(lambda: torchvision.models.get_model(name, weights=None))
    x = inputs(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group is left whole
        prune_channels_(model, x, 0.3)
        small = compact(model, x)
    assert relative_error(model, small, x) <= 1e-5
    assert 1 - num_params(small) / num_params(model) >= before + 0.05
    grouped = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels}
    compacted = dict(small.named_modules())
    assert all(compacted[n].groups == m.groups for n, m in grouped.items())
    assert all(compacted[n].in_channels == compacted[n].out_channels for n in grouped)
    assert sum(compacted[n].out_channels for n in grouped) < sum(m.out_channels for m in grouped.values())
