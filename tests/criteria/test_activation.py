"""Activation criteria (APoZ, mean absolute activation) in plain PyTorch: statistics against hand-computed
references on tiny models (after ReLU and max-pooling, across a flatten, on a residual group), the hooks' life,
checkpoints, the reduction over the ranks of a real two-process gloo group."""

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _checks import seeded
from _gloo_ranks import collect, reduce_activation_statistics, run_on_ranks
from torch import Tensor, nn

from lightning_prune.criteria.activation import ActivationImportance, ActivationStatistics, APoZImportance
from lightning_prune.masks.channels import ChannelMaskSet
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.masks.params import prunable_parameters
from lightning_prune.structures.channel import ChannelStructure

pytestmark = pytest.mark.usefixtures("one_thread")


def data(step: int, *shape: int) -> Tensor:
    return torch.randn(6, *shape, generator=torch.Generator().manual_seed(200 + step))


def mlp() -> nn.Module:
    return seeded(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))


def conv_pool() -> nn.Module:
    """Conv -> BN -> ReLU -> MaxPool -> Conv -> ReLU -> Flatten -> Linear on 1x4x4 inputs."""
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 2),
    )
    return seeded(net)


class Residual(nn.Module):
    """``relu(bn(conv(a)) + a)`` with ``a = relu(stem(x))``, pooled into a linear head: one residual group whose
    channels two producers write (``stem`` and ``conv``), read by ``conv`` and by ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.stem(x))
        y = F.relu(self.bn(self.conv(a)) + a)
        return self.head(y.mean((2, 3)))


def channel_stats(x: Tensor, dim: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel along ``dim``: zeros, sum of |x| and count, by hand."""
    moved = x.detach().movedim(dim, 0).reshape(x.shape[dim], -1).double()
    return (moved == 0).sum(1).double(), moved.abs().sum(1), torch.full((x.shape[dim],), float(moved.shape[1]))


def expected(criterion: str, zeros: Tensor, sums: Tensor, counts: Tensor) -> Tensor:
    return 1 - zeros / counts if criterion == "apoz" else sums / counts


CRITERIA: dict[str, Callable[..., ActivationStatistics]] = {"apoz": APoZImportance, "activation": ActivationImportance}


def bind(net: nn.Module, *shape: int) -> ChannelMaskSet:
    return ChannelStructure().bind(net, example_inputs=torch.randn(2, *shape))


def hook_count(net: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules())


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("criterion", ["apoz", "activation"])
def test_mlp_statistics_are_those_of_the_next_layers_input(criterion):
    net = mlp()
    masks = bind(net, 3)
    ref = copy.deepcopy(net)  # the reference runs without hooks
    importance = CRITERIA[criterion](batches=2)
    importance.start(net, masks)
    assert hook_count(net) == 1 and importance.hooked
    zeros, sums, counts = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), torch.zeros(5)
    for step in range(3):
        x = data(step, 3)
        net(x)
        if step < 2:  # the third step is after the window
            z, s, c = channel_stats(F.relu(ref[0](x)))
            zeros, sums, counts = zeros + z, sums + s, counts + c
        assert importance.observe(masks) == (step < 2)
    assert importance.ready and not importance.hooked and hook_count(net) == 0  # removed once the window is full
    importance.stop()
    (group,) = masks.groups
    want = expected(criterion, zeros, sums, counts.double())
    torch.testing.assert_close(importance.channel_scores(masks, group), want)
    assert 0 < int(zeros.sum()) < int(counts.sum())  # the reference has zeros and non-zeros: the check can fail
    ChannelStructure().prune_(masks, importance, 0.4, scope="layer")  # 2 of 5
    lowest = set(torch.sort(want, stable=True).indices[:2].tolist())
    assert set(torch.nonzero(~masks.kept(group)).flatten().tolist()) == lowest


@pytest.mark.parametrize("criterion", ["apoz", "activation"])
def test_conv_statistics_after_pooling_and_across_a_flatten(criterion):
    net = conv_pool()
    masks = bind(net, 1, 4, 4)
    assert sorted(g.name for g in masks.groups) == ["0", "4"]
    ref_net = copy.deepcopy(net)  # the reference runs without hooks
    importance = CRITERIA[criterion](batches=3)
    importance.start(net, masks)
    ref: dict[str, list[Tensor]] = {"0": [], "4": []}
    for step in range(3):
        x = data(step, 1, 4, 4)
        net(x)
        with torch.no_grad():  # by hand, layer by layer (training mode: BatchNorm uses the batch statistics)
            pooled = ref_net[3](F.relu(ref_net[1](ref_net[0](x))))  # what conv 4 reads
            second = F.relu(ref_net[4](pooled))  # what the linear layer reads, before the flatten
        for name, act in (("0", pooled), ("4", second)):
            ref[name].append(torch.stack(channel_stats(act)))
        importance.observe(masks)
    importance.stop()
    for group in masks.groups:
        zeros, sums, counts = torch.stack(ref[group.name]).sum(0)
        torch.testing.assert_close(importance.channel_scores(masks, group), expected(criterion, zeros, sums, counts))


@pytest.mark.parametrize("criterion", ["apoz", "activation"])
def test_a_residual_group_pools_every_layer_that_reads_it(criterion):
    net = seeded(Residual())
    masks = bind(net, 2, 3, 3)
    (group,) = [g for g in masks.groups if g.name == "stem"]
    ref = copy.deepcopy(net)  # the reference runs without hooks
    importance = CRITERIA[criterion](batches=2)
    importance.start(net, masks)
    assert sorted(importance.readers["stem"]) == ["conv", "head"]
    totals = torch.zeros(3, 4, dtype=torch.float64)
    for step in range(2):
        x = data(step, 2, 3, 3)
        net(x)
        with torch.no_grad():
            a = F.relu(ref.stem(x))
            y = F.relu(ref.bn(ref.conv(a)) + a).mean((2, 3))
        totals += torch.stack(channel_stats(a)) + torch.stack(channel_stats(y))  # read by conv and by head
        importance.observe(masks)
    importance.stop()
    torch.testing.assert_close(importance.channel_scores(masks, group), expected(criterion, *totals))


def test_only_training_mode_forward_passes_count_by_default():
    net = mlp()
    masks = bind(net, 3)
    (group,) = masks.groups
    apoz = APoZImportance(batches=4)
    apoz.start(net, masks)
    net.eval()
    net(data(0, 3))  # validation inside the window
    assert apoz.observe(masks) is False and apoz.steps == 0
    with pytest.raises(ValueError, match="no activation was recorded yet"):
        apoz.channel_scores(masks, group)
    calibration = APoZImportance(batches=4, training_only=False)
    calibration.start(net, masks)
    net(data(0, 3))
    assert calibration.observe(masks)
    zeros, _, counts = channel_stats(F.relu(net[0](data(0, 3))))
    torch.testing.assert_close(calibration.channel_scores(masks, group), 1 - zeros / counts.double())


def test_hooks_exist_only_inside_the_window():
    net = conv_pool()
    masks = bind(net, 1, 4, 4)
    activation = ActivationImportance(batches=5)
    assert hook_count(net) == 0
    activation.start(net, masks)
    assert hook_count(net) == 2  # conv 4 and the linear layer read the two groups
    activation.start(net, masks)  # restarting does not stack hooks
    assert hook_count(net) == 2
    net(data(0, 1, 4, 4))
    activation.observe(masks)
    activation.stop()
    assert hook_count(net) == 0 and not activation.collecting
    before = activation.state_dict()
    net(data(1, 1, 4, 4))  # after stop: nothing recorded
    after = activation.state_dict()
    assert all(torch.equal(before["local"][k], after["local"][k]) for k in before["local"])
    activation.stop()  # idempotent


def test_reset_restarts_an_open_window():
    net = mlp()
    masks = bind(net, 3)
    apoz = APoZImportance(batches=1)
    apoz.start(net, masks)
    net(data(0, 3))
    assert apoz.observe(masks) and not apoz.hooked
    apoz.reset()
    assert apoz.steps == 0 and apoz.hooked  # the full window reopens afresh
    net(data(1, 3))
    assert apoz.observe(masks)
    zeros, _, counts = channel_stats(F.relu(net[0](data(1, 3))))
    torch.testing.assert_close(apoz.channel_scores(masks, masks.groups[0]), 1 - zeros / counts.double())
    apoz.stop()
    apoz.reset()
    assert apoz.state_dict()["local"] == {}


# ---------------------------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip(tmp_path):
    net = conv_pool()
    masks = bind(net, 1, 4, 4)
    apoz = APoZImportance(batches=2)
    apoz.start(net, masks)
    net(data(0, 1, 4, 4))
    apoz.observe(masks)
    apoz.reduce_(lambda t: t)  # one process: part of the statistics is "reduced"
    net(data(1, 1, 4, 4))
    apoz.observe(masks)
    apoz.stop()
    torch.save(apoz.state_dict(), tmp_path / "apoz.pt")
    state = torch.load(tmp_path / "apoz.pt", weights_only=True)
    assert state["steps"] == 2 and all(t.dtype == torch.float64 for t in state["local"].values())
    resumed = APoZImportance(batches=2)
    resumed.load_state_dict(state, masks)
    assert resumed.steps == 2 and resumed.ready
    for group in masks.groups:
        torch.testing.assert_close(resumed.channel_scores(masks, group), apoz.channel_scores(masks, group))


def test_loading_statistics_of_other_groups_is_refused():
    net = conv_pool()
    masks = bind(net, 1, 4, 4)
    apoz = APoZImportance(batches=1)
    apoz.start(net, masks)
    net(data(0, 1, 4, 4))
    apoz.observe(masks)
    state = apoz.state_dict()
    with pytest.raises(ValueError, match=r"collected by 'apoz', not 'activation'"):
        ActivationImportance().load_state_dict(state)
    with pytest.raises(ValueError, match=r"must map channel groups to tensors of shape \(2, channels\)"):
        APoZImportance().load_state_dict({**state, "local": {"0": torch.zeros(3)}})
    with pytest.raises(ValueError, match="local and reduced parts of other groups"):
        APoZImportance().load_state_dict({**state, "reduced": {}})
    other = bind(mlp(), 3)
    with pytest.raises(
        ValueError, match=r"do not fit the channel groups: missing \[\], unexpected \['4'\], other widths \['0'\]"
    ):
        APoZImportance().load_state_dict(state, other)
    wider = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))
    wider.append(nn.Conv2d(6, 3, 3, padding=1)).append(nn.ReLU()).append(nn.Flatten()).append(nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"do not fit the channel groups: missing \[\], unexpected \[\], other widths"):
        APoZImportance().load_state_dict(state, bind(wider, 1, 4, 4))
    later = APoZImportance()
    later.load_state_dict(state)  # without masks: checked when the window opens
    with pytest.raises(ValueError, match="do not fit the channel groups"):
        later.start(wider, bind(wider, 1, 4, 4))


# ---------------------------------------------------------------------------------------------- reduction over ranks
def test_reduce_over_a_real_two_process_gloo_group_gives_every_rank_the_statistics_of_all(tmp_path):
    # Two spawned processes (tests/_gloo_ranks.py), each collecting on batches of its own, then one reduce_ per rank.
    net = conv_pool()
    batches = [[data(0, 1, 4, 4), data(1, 1, 4, 4)], [data(2, 1, 4, 4), data(3, 1, 4, 4)]]
    got = run_on_ranks(tmp_path, reduce_activation_statistics, CRITERIA, net, batches)
    masks = bind(net, 1, 4, 4)
    for name, cls in CRITERIA.items():
        ranks = [got[0][name], got[1][name]]
        assert [r["calls"] for r in ranks] == [1, 1]  # one collective per rank, on one flat tensor
        assert any(not torch.equal(ranks[0]["local"][g.name], ranks[1]["local"][g.name]) for g in masks.groups)
        both = cls(batches=4)  # one process that saw every batch
        collect(both, net, masks, [*batches[0], *batches[1]])
        for g in masks.groups:
            assert torch.equal(ranks[0]["reduced"][g.name], ranks[1]["reduced"][g.name])  # bit-identical on both
            torch.testing.assert_close(ranks[0]["reduced"][g.name], both.channel_scores(masks, g))
            for r in ranks:  # reducing again adds nothing: statistics reduced once are never summed twice
                assert torch.equal(r["again"][g.name], r["reduced"][g.name])


def test_reduce_refuses_a_sum_of_another_shape():
    net = mlp()
    masks = bind(net, 3)
    apoz = APoZImportance()
    _ = apoz.start(net, masks), net(data(0, 3)), apoz.observe(masks)
    with pytest.raises(ValueError, match=r"`all_reduce` returned a tensor of shape \(1,\) for one of shape \(10,\)"):
        apoz.reduce_(lambda t: t[:1])


# ---------------------------------------------------------------------------------------------- errors
def test_non_finite_activations_name_the_group_and_leave_the_masks():
    net = mlp()
    masks = bind(net, 3)
    activation = ActivationImportance(batches=1)
    activation.start(net, masks)
    x = data(0, 3)
    x[0, 0] = float("nan")
    net(x)
    activation.observe(masks)
    with pytest.raises(ValueError, match=r"activations of channel group '0' \(read by \['2'\]\) held NaN or infinite"):
        ChannelStructure().prune_(masks, activation, 0.4)
    assert masks.num_pruned() == 0


def test_scoring_before_any_forward_pass_says_what_to_change():
    net = conv_pool()
    masks = bind(net, 1, 4, 4)
    for importance in (APoZImportance(), ActivationImportance()):
        match = r"no activation was recorded yet.*`start_epoch` >= 1.*importance='l1'"
        with pytest.raises(ValueError, match=match):
            ChannelStructure().prune_(masks, importance, 0.5)
        importance.start(net, masks)
        with pytest.raises(ValueError, match=match):
            ChannelStructure().prune_(masks, importance, 0.5)
        importance.stop()
    assert masks.num_pruned() == 0


def test_start_checks_its_arguments():
    net = mlp()
    masks = bind(net, 3)
    apoz = APoZImportance()
    with pytest.raises(TypeError, match=r"`module` must be a torch\.nn\.Module, got str"):
        apoz.start("net", masks)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"needs the ChannelMaskSet of structure='channel'.*got MaskSet"):
        apoz.start(net, MaskSet(prunable_parameters(net)))
    with pytest.raises(
        ValueError, match=r"masks name '0.weight', which Sequential does not have: pass apoz the module"
    ):
        apoz.start(nn.Sequential(nn.Identity()), masks)
    with pytest.raises(TypeError, match="`training_only` must be True or False, got 'yes'"):
        APoZImportance(training_only="yes")  # type: ignore[arg-type]
    assert hook_count(net) == 0
