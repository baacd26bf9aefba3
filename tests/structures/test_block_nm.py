"""Block and N:M sparsity patterns: exact structure against sort-based references, errors, and real Trainer runs."""

import itertools

import lightning.pytorch as pl
import pytest
import torch
from _checks import ZeroChecker, check_ranks_agree, images, make_optimizer, run_ddp_job, tiny_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune import PruningCallback
from lightning_prune.criteria import IMPORTANCES
from lightning_prune.criteria.base import Importance
from lightning_prune.criteria.magnitude import LpNormImportance, MagnitudeImportance
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.structures import build_structure
from lightning_prune.structures.block import BlockStructure
from lightning_prune.structures.nm import NMStructure
from lightning_prune.structures.unstructured import Unstructured

pytestmark = pytest.mark.usefixtures("one_thread")

MAG = MagnitudeImportance()


def mask_set(*weights: torch.Tensor) -> MaskSet:
    return MaskSet({f"w{i}.weight": nn.Parameter(w.clone()) for i, w in enumerate(weights)})


# ---------------------------------------------------------------------------------------------- references
def nm_groups(shape, m):
    """Flat indices of every N:M group: m consecutive positions along dimension 1 at each other position."""
    index = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    groups = []
    for o in range(shape[0]):
        for pos in itertools.product(*[range(s) for s in shape[2:]]):
            for g in range(shape[1] // m):
                groups.append([int(index[(o, g * m + j, *pos)]) for j in range(m)])
    return groups


def nm_reference_step(scores, keep, n, m, k_per_group_of_tensors):
    """One pruning step: eligible = each group's (n - zeros) lowest kept entries (ties: earlier in the group);
    then the k lowest eligible entries go, ties to the earliest (tensor, flat index)."""
    keep = [kp.clone() for kp in keep]
    for tensors, k in k_per_group_of_tensors:
        candidates = []
        for t in tensors:
            flat_s, flat_k = scores[t].reshape(-1), keep[t].reshape(-1)
            for group in nm_groups(tuple(scores[t].shape), m):
                kept = [i for i in group if flat_k[i]]
                quota = n - (m - len(kept))
                kept.sort(key=lambda i: (float(flat_s[i]), group.index(i)))
                candidates += [(float(flat_s[i]), t, i) for i in kept[:quota]]
        candidates.sort()
        for _, t, i in candidates[:k]:
            keep[t].view(-1)[i] = False
    return keep


def block_reference_step(scores, keep, bh, bw, k_per_group_of_tensors):
    """Tiles scored by their mean score (partial tiles over their own size); the k lowest kept tiles go, ties to
    the earliest (tensor, tile row, tile column)."""
    keep = [kp.clone() for kp in keep]
    for tensors, k in k_per_group_of_tensors:
        tiles = []
        for t in tensors:
            s, kp = scores[t].reshape(scores[t].shape[0], -1).double(), keep[t].view(keep[t].shape[0], -1)
            for r, c in itertools.product(range(0, s.shape[0], bh), range(0, s.shape[1], bw)):
                if bool(kp[r : r + bh, c : c + bw].any()):
                    tiles.append((float(s[r : r + bh, c : c + bw].mean()), t, r, c))
        tiles.sort()
        for _, t, r, c in tiles[:k]:
            keep[t].view(keep[t].shape[0], -1)[r : r + bh, c : c + bw] = False
    return keep


def tile_counts(mask, bh, bw):
    view = mask.view(mask.shape[0], -1)
    rows, cols = range(0, view.shape[0], bh), range(0, view.shape[1], bw)
    tiles = [view[r : r + bh, c : c + bw] for r, c in itertools.product(rows, cols)]
    return tiles, sum(1 for tile in tiles if not bool(tile.any()))


def step_counts(structure, masks, target, scope, units):
    """(tensor indices ranked together, how many more units to prune) for one pruning step."""
    groups = [list(range(len(units)))] if scope == "global" else [[i] for i in range(len(units))]
    out = []
    for g in groups:
        total = sum(units[i][0] for i in g)
        pruned = sum(units[i][1] for i in g)
        out.append((g, max(round(target * total) - pruned, 0)))
    return out


# ---------------------------------------------------------------------------------------------- N:M
@st.composite
def nm_problems(draw):
    n, m = draw(st.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (5, 32)]))
    shapes = []
    for _ in range(draw(st.integers(1, 3))):
        out, groups = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        kernel = draw(st.sampled_from([(), (1,), (2, 2), (3, 1)]))
        shapes.append((out, groups * m, *kernel))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tied = draw(st.booleans())
    weights = [torch.randint(-3, 4, s, generator=g).float() if tied else torch.randn(s, generator=g) for s in shapes]
    steps = [*sorted(draw(st.lists(st.floats(0, n / m), min_size=1, max_size=3))), n / m]
    return n, m, weights, steps, draw(st.sampled_from(["global", "layer"]))


@settings(max_examples=40, deadline=None)
@given(nm_problems())
def test_nm_gradual_steps_match_the_reference_and_end_with_exactly_n_zeros_per_group(problem):
    n, m, weights, steps, scope = problem
    structure = NMStructure(n, m)
    masks = mask_set(*weights)
    expected = [torch.ones(w.shape, dtype=torch.bool) for w in weights]
    for target in steps:
        units = [(e.numel(), int((~e).sum())) for e in expected]
        expected = nm_reference_step(
            [w.abs() for w in weights], expected, n, m, step_counts(structure, masks, target, scope, units)
        )
        before = [mk.clone() for mk in masks.masks]
        structure.prune_(masks, MAG, target, scope)
        for got, want, old in zip(masks.masks, expected, before):
            assert torch.equal(got, want)
            assert not bool((got & ~old).any()), "a pruned entry was revived"
        for w, mk in zip(masks.params, masks.masks):
            flat = mk.reshape(-1)
            assert all(sum(1 for i in grp if not flat[i]) <= n for grp in nm_groups(tuple(w.shape), m))
    for w, mk in zip(masks.params, masks.masks):
        flat, values = mk.reshape(-1), w.detach().reshape(-1)
        for grp in nm_groups(tuple(w.shape), m):
            assert sum(1 for i in grp if not flat[i]) == n
            assert all(values[i] == 0 for i in grp if not flat[i])
    assert structure.complete_groups(masks) == {name: 1.0 for name in masks.names}


def test_nm_groups_run_along_conv_input_channels_at_each_kernel_position():
    conv = nn.Conv2d(4, 3, 2, bias=False)
    with torch.no_grad():  # |w| grows with the input channel, so 2:4 must zero channels 0 and 1 everywhere
        conv.weight.copy_(torch.arange(1.0, 5.0).view(1, 4, 1, 1) + 0.1 * torch.rand(3, 4, 2, 2))
    structure = NMStructure(2, 4)
    masks = structure.bind(nn.Sequential(conv))
    structure.prune_(masks, MAG, 0.5)
    assert bool((conv.weight[:, :2] == 0).all()) and bool((conv.weight[:, 2:] != 0).all())


def test_nm_gradual_step_picks_the_lowest_eligible_entries_by_hand():
    # Two groups of 4; 2:4 at 25% prunes 2 entries: the lowest eligible ones overall. Group 0 is [0.1, 0.2, 5, 6],
    # group 1 [0.3, 7, 8, 9]: the two lowest overall (0.1, 0.2) are both in group 0 and both eligible.
    masks = mask_set(torch.tensor([[0.1, 0.2, 5.0, 6.0, 0.3, 7.0, 8.0, 9.0]]))
    NMStructure(2, 4).prune_(masks, MAG, 0.25)
    assert masks.masks[0].tolist() == [[False, False, True, True, True, True, True, True]]
    # 1:4 at 25% may take one per group: 0.1 from group 0, and 0.3 (not 0.2) from group 1.
    masks = mask_set(torch.tensor([[0.1, 0.2, 5.0, 6.0, 0.3, 7.0, 8.0, 9.0]]))
    NMStructure(1, 4).prune_(masks, MAG, 0.25)
    assert masks.masks[0].tolist() == [[False, True, True, True, False, True, True, True]]


def test_nm_scopes_and_an_importance_other_than_magnitude():
    g = torch.Generator().manual_seed(0)
    small, large = torch.randn(4, 8, generator=g) * 0.01, torch.randn(4, 8, generator=g)
    masks = mask_set(small, large)
    NMStructure(2, 4).prune_(masks, MAG, 0.25, "global")  # the small layer's entries are the lowest: all go there
    assert masks.layer_sparsity() == {"w0.weight": 0.5, "w1.weight": 0.0}
    masks = mask_set(small, large)
    NMStructure(2, 4).prune_(masks, MAG, 0.25, "layer")
    assert masks.layer_sparsity() == {"w0.weight": 0.25, "w1.weight": 0.25}

    class Reversed(Importance):  # not pointwise: the largest weights are the least important
        def __call__(self, name, param):
            return -param.detach().abs()

    masks = mask_set(large)
    NMStructure(2, 4).prune_(masks, Reversed(), 0.5)
    expected = torch.zeros(8, 4, dtype=torch.bool).scatter_(1, large.abs().view(8, 4).topk(2, dim=1).indices, True)
    assert torch.equal(~masks.masks[0].view(8, 4), expected)


def test_defaults_and_registry():
    assert NMStructure(2, 4).default_sparsity == 0.5
    assert NMStructure(1, 3).default_sparsity == pytest.approx(1 / 3)
    assert repr(build_structure("2:4")) == "NMStructure(n=2, m=4)"
    assert repr(build_structure("4:8")) == "NMStructure(n=4, m=8)"
    assert repr(build_structure("block")) == "BlockStructure(block_shape=(4, 4))"
    assert BlockStructure(8).block_shape == (8, 8)
    assert BlockStructure(OmegaConf.create([4, 8])).block_shape == (4, 8)  # a list from a Hydra config
    assert repr(PruningCallback(structure="1:4", sparsity=0.25).structure) == "NMStructure(n=1, m=4)"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NMStructure(3, 2), r"`n` must satisfy 1 <= n < m .*got 3:2"),
        (lambda: NMStructure(0, 4), r"`n` must satisfy 1 <= n < m .*got 0:4"),
        (lambda: NMStructure(4, 4), "n == m would empty every layer"),
        (lambda: NMStructure(1, 1), "`m` must be at least 2"),
        (lambda: NMStructure(2.0, 4), r"`n` must be an integer, got 2\.0"),
        (lambda: NMStructure(True, 4), "`n` must be an integer, got True"),
        (lambda: build_structure("2:x"), r"'2:x' is not an N:M pattern: expected two integers such as '2:4'"),
        (lambda: build_structure("2:4:8"), "'2:4:8' is not an N:M pattern"),
        (lambda: build_structure(":4"), "':4' is not an N:M pattern"),
        (lambda: build_structure("5:4"), r"got 5:4"),
        (lambda: build_structure("2-4"), r"Unknown structure '2-4'.*an 'N:M' pattern such as '1:4'"),
        (
            lambda: build_structure(OmegaConf.create("structure: 2:4").structure),
            r"Unknown structure 124.*unquoted 2:4 in a YAML file is read as the base-60 integer 124: quote it, '2:4'",
        ),
    ],
)
def test_nm_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_nm_bad_layers_and_targets():
    with pytest.raises(
        ValueError,
        match=r"'1.weight' \(shape \(2, 6\)\) has 6 input features, not a multiple of 4.*Add '1' to `ignore`",
    ):
        NMStructure(2, 4).bind(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)))
    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(
        ValueError, match=r"has 1 input channels \(per group\), not a multiple of 4.*Add '0' to `ignore`"
    ):
        NMStructure(2, 4).bind(depthwise)
    with pytest.raises(ValueError, match=r"'0' is a transposed convolution.*Add '0' to `ignore`"):
        NMStructure(2, 4).bind(nn.Sequential(nn.ConvTranspose2d(8, 8, 3)))
    with pytest.raises(
        ValueError, match=r"prunes weight matrices .* 'w0.weight' has shape \(8,\)\. Add 'w0' to `ignore`"
    ):
        NMStructure(2, 4).prune_(mask_set(torch.randn(8)), MAG, 0.5)
    masks = NMStructure(2, 4).bind(nn.Sequential(nn.Linear(8, 4)))
    with pytest.raises(ValueError, match=r"2:4 prunes at most 50% of the weights \(2 of every 4\), got `sparsity`=0.6"):
        NMStructure(2, 4).prune_(masks, MAG, 0.6)
    with pytest.raises(ValueError, match=r"2:4 prunes at most 50%.*higher: \{'0.weight': 0.75\}"):
        NMStructure(2, 4).check_target(masks, {"0": 0.75}, "layer")
    masks.masks[0][0, :3] = False  # 3 zeros in one group: masks that break the pattern cannot be grown into it
    with pytest.raises(ValueError, match="more than 2 zeros, so they do not follow the 2:4 pattern"):
        NMStructure(2, 4).prune_(masks, MAG, 0.5)


def test_nm_summary_reports_complete_groups():
    structure = NMStructure(2, 4)
    masks = structure.bind(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4)))
    masks.masks[0][:3, :2] = False  # rows 0-2: their first group of 4 has 2 zeros; 3 of 8 groups complete
    masks.masks[0][3, 4] = False  # one zero only: incomplete
    assert structure.complete_groups(masks) == {"0.weight": 3 / 8, "2.weight": 0.0}
    structure.prune_(masks, MAG, 0.5)
    assert structure.complete_groups(masks) == {"0.weight": 1.0, "2.weight": 1.0}
    table = structure.summary(masks).splitlines()
    assert table[0] == "2:4 pruning summary" and "groups at 2:4" in table[1]
    assert table[3].split() == ["0.weight", "4x8", "16", "/", "32", "50.00%", "100.00%"]
    assert table[-1].split() == ["total", "24", "/", "48", "50.00%"]


# ---------------------------------------------------------------------------------------------- blocks
@st.composite
def block_problems(draw):
    shapes = []
    for _ in range(draw(st.integers(1, 3))):
        shapes.append(tuple(draw(st.lists(st.integers(1, 7), min_size=2, max_size=4))))
    rows = min(s[0] for s in shapes)
    cols = min(int(torch.tensor(s[1:]).prod()) for s in shapes)
    bh, bw = draw(st.integers(1, rows)), draw(st.integers(1, cols))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tied = draw(st.booleans())
    weights = [torch.randint(-2, 3, s, generator=g).float() if tied else torch.randn(s, generator=g) for s in shapes]
    steps = sorted(draw(st.lists(st.floats(0, 0.95), min_size=1, max_size=3)))
    p = draw(st.sampled_from([1, 2]))
    return (bh, bw), weights, steps, draw(st.sampled_from(["global", "layer"])), p


@settings(max_examples=40, deadline=None)
@given(block_problems())
def test_block_steps_match_the_reference_and_prune_whole_blocks(problem):
    (bh, bw), weights, steps, scope, p = problem
    structure = BlockStructure((bh, bw))
    masks = mask_set(*weights)
    expected = [torch.ones(w.shape, dtype=torch.bool) for w in weights]
    importance = LpNormImportance(p)
    for target in steps:
        units = []
        for e in expected:
            tiles, pruned = tile_counts(e, bh, bw)
            units.append((len(tiles), pruned))
        expected = block_reference_step(
            [w.abs() ** p for w in weights], expected, bh, bw, step_counts(structure, masks, target, scope, units)
        )
        before = [mk.clone() for mk in masks.masks]
        structure.prune_(masks, importance, target, scope)
        for got, want, old in zip(masks.masks, expected, before):
            assert torch.equal(got, want)
            assert not bool((got & ~old).any()), "a pruned entry was revived"
        total = sum(u[0] for u in units)
        if scope == "global":
            assert structure.sparsity(masks) == max(round(target * total), sum(u[1] for u in units)) / total
        for mk in masks.masks:
            tiles, _ = tile_counts(mk, bh, bw)
            assert all(bool(t.all()) or not bool(t.any()) for t in tiles), "a block is partly pruned"
    for w, mk in zip(masks.params, masks.masks):
        assert bool((w.detach()[~mk] == 0).all())


def test_partial_edge_blocks_compete_by_their_mean_score():
    # A full 2x2 tile summing to 4 (mean 1) and a 2x1 edge tile summing to 3 (mean 1.5): the full one goes.
    masks = mask_set(torch.tensor([[1.0, 1.0, 1.5], [1.0, 1.0, 1.5]]))
    structure = BlockStructure((2, 2))
    structure.prune_(masks, MAG, 0.5)
    assert masks.params[0].tolist() == [[0.0, 0.0, 1.5], [0.0, 0.0, 1.5]]
    assert structure.sparsity(masks) == 0.5 and masks.sparsity() == pytest.approx(4 / 6)


def test_block_norm_order_and_other_importances_by_hand():
    weight = torch.tensor([[3.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])  # L1 means 0.75 / 1; mean squares 2.25 / 1
    masks = mask_set(weight)
    BlockStructure((1, 4)).prune_(masks, LpNormImportance(1), 0.5)
    assert masks.params[0].tolist() == [[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]]
    masks = mask_set(weight)
    BlockStructure((1, 4)).prune_(masks, LpNormImportance(2), 0.5)
    assert masks.params[0].tolist() == [[3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]

    class Given(Importance):  # per-entry scores unrelated to the weights: the mean of these scores decides
        def __call__(self, name, param):
            return torch.tensor([[1.0, 1.0, 1.5], [1.0, 1.0, 1.5]])

    masks = mask_set(torch.full((2, 3), 5.0))
    BlockStructure((2, 2)).prune_(masks, Given(), 0.5)
    assert masks.masks[0].tolist() == [[False, False, True], [False, False, True]]


def test_conv_blocks_follow_the_im2col_view():
    conv = nn.Conv2d(2, 2, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[1, 0] = 0.1  # output 1's kernel on input channel 0: one 1x4 tile of the (2, 8) view
    structure = BlockStructure((1, 4))
    masks = structure.bind(nn.Sequential(conv))
    structure.prune_(masks, MAG, 0.25)
    assert bool((conv.weight[1, 0] == 0).all()) and int((conv.weight == 0).sum()) == 4


def test_block_scopes():
    small, large = torch.full((4, 8), 0.1), torch.full((4, 8), 1.0)
    structure = BlockStructure((2, 4))
    masks = mask_set(small, large)
    structure.prune_(masks, MAG, 0.5, "global")
    assert structure.layer_sparsity(masks) == {"w0.weight": 1.0, "w1.weight": 0.0}
    masks = mask_set(small, large)
    structure.prune_(masks, MAG, 0.5, "layer")
    assert structure.layer_sparsity(masks) == {"w0.weight": 0.5, "w1.weight": 0.5}
    table = structure.summary(masks)
    assert "Block pruning summary (2x4 blocks)" in table and "2 / 4" in table and "4 / 8" in table


@pytest.mark.parametrize("structure", [NMStructure(2, 4), BlockStructure((2, 8))], ids=["2:4", "block"])
def test_channels_last_weights_get_the_masks_of_contiguous_ones(structure):
    def conv_net():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 4, 1))

    plain, last = conv_net(), conv_net().to(memory_format=torch.channels_last)
    assert not last[0].weight.is_contiguous()
    results = []
    for model in (plain, last):
        masks = structure.bind(model)
        structure.prune_(masks, MAG, 0.25, "global")
        structure.prune_(masks, MAG, 0.5, "layer")
        results.append(masks)
    for a, b, p in zip(results[0].masks, results[1].masks, results[1].params):
        assert torch.equal(a, b) and bool((p[~b] == 0).all()) and bool((p[b] != 0).all())


@pytest.mark.parametrize("shape", [0, (0, 4), (4,), (4, 4, 4), "4x4", True, (2.0, 2), (4, -1)])
def test_block_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"`block_shape` must be two positive integers \(rows, columns\).*got"):
        BlockStructure(shape)


def test_block_bad_layers(tmp_path):
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(
        ValueError, match=r"Block shape 4x4 is larger than the 2x8 GEMM view of '2.weight'.*Add '2' to `ignore`"
    ):
        BlockStructure((4, 4)).bind(net)
    assert BlockStructure((4, 4)).bind(net, ignore=["2"]).names == ["0.weight"]
    with pytest.raises(ValueError, match=r"larger than the 4x18 GEMM view of '0.weight' \(shape \(4, 2, 3, 3\)\)"):
        BlockStructure((8, 8)).bind(nn.Sequential(nn.Conv2d(2, 4, 3)))
    with pytest.raises(MisconfigurationException, match=r"PruningCallback: Block shape 4x4 is larger"):
        pruning = PruningCallback(structure=BlockStructure(4), sparsity=0.5, schedule="one_shot")
        tiny_trainer(tmp_path, [pruning], 1).fit(PatternNet(head=2), data())


def test_bad_scores_are_clear_errors():
    class PerChannel(Importance):
        def __call__(self, name, param):
            return param.detach().abs().sum(1)

    class NoEntries(Importance):
        def __call__(self, name, param):
            raise NotImplementedError("scores channels only")

    for structure in (BlockStructure((2, 2)), NMStructure(2, 4)):
        with pytest.raises(
            ValueError,
            match=r"needs a score for every weight of 'w0.weight' \(shape \(4, 8\)\), but .* returned \(4,\)",
        ):
            structure.prune_(mask_set(torch.randn(4, 8)), PerChannel(), 0.5)
        with pytest.raises(ValueError, match=r"cannot score single entries .*scores channels only"):
            structure.prune_(mask_set(torch.randn(4, 8)), NoEntries(), 0.5)
        with pytest.raises(ValueError, match=r"'w0\.weight' contain NaN or infinite values"):
            structure.prune_(mask_set(torch.full((4, 8), float("nan"))), MAG, 0.5)
        with pytest.raises(TypeError, match="`importance` must be an Importance object"):
            structure.check_importance("magnitude")


@pytest.mark.parametrize("name", sorted(IMPORTANCES))
def test_patterns_accept_exactly_the_criteria_that_score_single_weights(name):
    importance = IMPORTANCES[name]()
    try:
        Unstructured().check_importance(importance)
        per_entry = getattr(importance, "scores_entries", True)
    except ValueError:
        per_entry = False
    for structure in (BlockStructure(), NMStructure()):
        if per_entry:
            structure.check_importance(importance)
        else:
            with pytest.raises(ValueError, match="needs a score for every single weight"):
                structure.check_importance(importance)


def test_channel_only_criteria_are_refused_with_a_clear_message(monkeypatch):
    class ChannelsOnly(Importance):
        scores_entries = False

        def __call__(self, name, param):
            raise NotImplementedError

    with pytest.raises(
        ValueError,
        match=r"BlockStructure\(block_shape=\(4, 4\)\) needs a score for every single "
        r"weight .*ChannelsOnly\(\) scores whole channels only\. Use structure='channel'",
    ):
        BlockStructure().check_importance(ChannelsOnly())

    def refuse(self, importance):
        raise ValueError("'apoz' scores channels.")

    monkeypatch.setattr(Unstructured, "check_importance", refuse)
    with pytest.raises(
        ValueError,
        match=r"NMStructure\(n=2, m=4\) needs a score for every single weight .*'apoz' scores channels\. "
        r".*structure='channel'",
    ):
        NMStructure().check_importance(MAG)


# ---------------------------------------------------------------------------------------------- Trainer runs
class PatternNet(pl.LightningModule):
    """Two convolutions, a hidden layer and a head; every input dimension a multiple of 4."""

    def __init__(self, optimizer: str = "sgd", head: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.features = nn.Sequential(
                nn.Conv2d(4, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(3),
                nn.Flatten(),
            )
            self.body = nn.Sequential(nn.Linear(72, 16), nn.ReLU())
            self.head = nn.Linear(16, head)

    def forward(self, x):
        return self.head(self.body(self.features(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return make_optimizer(self.hparams.optimizer, self.parameters())


def data(n: int = 64, shuffle: bool = False) -> DataLoader:
    return images(n, shape=(4, 6, 6), sampler="epoch" if shuffle else None)


class PatternChecker(ZeroChecker):
    """After every batch: pruned entries and their optimizer state are zero, and the pattern holds exactly."""

    def check(self, pl_module, masks):
        structure = self.pruning.structure
        for name, p, m in zip(masks.names, masks.params, masks.masks):
            assert torch.equal(p.detach() != 0, m), f"{name}: a kept weight is exactly zero or a pruned one is not"
            if isinstance(structure, NMStructure):
                zeros = [sum(1 for i in g if not m.reshape(-1)[i]) for g in nm_groups(tuple(p.shape), structure.m)]
                assert max(zeros) <= structure.n, f"{name}: a group has more than {structure.n} zeros"
            else:
                tiles, _ = tile_counts(m, *structure.block_shape)
                assert all(bool(t.all()) or not bool(t.any()) for t in tiles), f"{name}: a block is partly pruned"


class EpochRecord(Callback):
    def __init__(self, pruning):
        self.pruning, self.seen = pruning, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(self.pruning.achieved_sparsity)


@pytest.mark.parametrize("structure", [NMStructure(2, 4), BlockStructure((4, 8))], ids=["2:4", "block4x8"])
@pytest.mark.parametrize(
    ("optimizer", "extra"),
    [("sgd", {}), ("adamw", {}), ("sgd", {"accumulate_grad_batches": 3})],
    ids=["sgd-momentum", "adamw-decay", "sgd-accumulate"],
)
def test_patterns_hold_exactly_through_training(tmp_path, structure, optimizer, extra):
    pruning = PruningCallback(structure=structure, sparsity=0.5, schedule="linear", start_epoch=0, end_epoch=2)
    checker, record = PatternChecker(pruning), EpochRecord(pruning)
    tiny_trainer(tmp_path, [pruning, checker, record], max_epochs=4, **extra).fit(PatternNet(optimizer), data())
    assert checker.checked >= 6
    masks = pruning.masks
    if isinstance(structure, NMStructure):
        assert record.seen == [0.0, round(0.25 * masks.numel()) / masks.numel(), 0.5, 0.5]
        assert structure.complete_groups(masks) == {name: 1.0 for name in masks.names}
    else:
        blocks = sum(len(tile_counts(m, 4, 8)[0]) for m in masks.masks)
        assert record.seen == [round(s * blocks) / blocks for s in (0.0, 0.25, 0.5, 0.5)]


@pytest.mark.parametrize("structure", ["2:4", "block"])
def test_resume_mid_schedule_ends_with_the_masks_of_an_uninterrupted_run(tmp_path, structure):
    def callback():
        return PruningCallback(structure=structure, sparsity=0.5, schedule="cubic", start_epoch=1, end_epoch=4)

    full, full_cb = PatternNet("adamw"), callback()
    tiny_trainer(tmp_path / "a", [full_cb], max_epochs=6).fit(full, data(shuffle=True))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tiny_trainer(tmp_path / "b", [callback(), ckpt], max_epochs=3, enable_checkpointing=True).fit(
        PatternNet("adamw"), data(shuffle=True)
    )
    resumed, resumed_cb = PatternNet("adamw"), callback()
    tiny_trainer(tmp_path / "c", [resumed_cb], max_epochs=6).fit(
        resumed, data(shuffle=True), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert resumed_cb.achieved_sparsity == full_cb.achieved_sparsity == pytest.approx(0.5, abs=0.02)
    for a, b in zip(full_cb.masks.masks, resumed_cb.masks.masks):
        assert torch.equal(a, b)
    for (key, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("structure", ["2:4", pytest.param("block", marks=pytest.mark.slow)])
def test_ranks_hold_the_same_pattern_under_ddp_though_each_scores_differently(tmp_path, structure):
    # tests/_ddp_job.py under strategy="ddp": every rank adds its own noise to the magnitudes, so the ranks would grow
    # other patterns if rank 0's masks were not broadcast at each pruning step.
    result = run_ddp_job(tmp_path / "ranks.json", "--structure", structure, "--importance", "rank")
    check_ranks_agree(result)
    assert result["sparsity"] == 0.5
    masks = torch.load(tmp_path / "ranks.masks.pt", weights_only=True)
    if structure == "2:4":
        assert sorted(masks) == ["body.0.weight", "head.weight"]  # the one-channel convolution is ignored
        for name, m in masks.items():
            zeros = {sum(1 for i in g if not m.reshape(-1)[i]) for g in nm_groups(tuple(m.shape), 4)}
            assert zeros == {2}, f"{name}: groups with {zeros} zeros"
    else:
        assert sorted(masks) == ["body.0.weight", "features.0.weight", "head.weight"]
        for name, m in masks.items():
            tiles, _ = tile_counts(m, 4, 4)
            assert all(bool(t.all()) or not bool(t.any()) for t in tiles), f"{name}: a block is partly pruned"
