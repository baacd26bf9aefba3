"""Per-layer targets: ``{layer-name pattern: sparsity}`` resolved to layers and reached by every structure."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lightning_prune.criteria.magnitude import MagnitudeImportance
from lightning_prune.structures.base import layer_targets, resolve_layer_targets
from lightning_prune.structures.block import BlockStructure
from lightning_prune.structures.channel import ChannelStructure
from lightning_prune.structures.nm import NMStructure
from lightning_prune.structures.unstructured import Unstructured

MAG = MagnitudeImportance()
NAMES = ["features.0.weight", "features.3.weight", "body.0.weight", "head.weight"]


# ---------------------------------------------------------------------------------------------- resolution
def test_patterns_match_names_suffixes_and_wildcards():
    assert resolve_layer_targets(NAMES, {"features.3": 0.5, "head.weight": 0.2}) == {
        "features.0.weight": 0.0,
        "features.3.weight": 0.5,
        "body.0.weight": 0.0,
        "head.weight": 0.2,
    }
    assert resolve_layer_targets(["model.body.0.weight", "model.head.weight"], {"body": 0.7}) == {
        "model.body.0.weight": 0.7,
        "model.head.weight": 0.0,
    }
    assert list(resolve_layer_targets(NAMES, {"features.*": 0.6}).values()) == [0.6, 0.6, 0.0, 0.0]
    assert list(resolve_layer_targets(NAMES, {"*.0": 0.4}).values()) == [0.4, 0.0, 0.4, 0.0]


@pytest.mark.parametrize(
    "targets",
    [{"*": 0.8, "features.*": 0.6, "head": 0.3}, {"head": 0.3, "features.*": 0.6, "*": 0.8}],
    ids=["general-first", "specific-first"],
)
def test_the_pattern_matching_fewest_layers_wins_whatever_the_order(targets):
    assert resolve_layer_targets(NAMES, targets) == {
        "features.0.weight": 0.6,
        "features.3.weight": 0.6,
        "body.0.weight": 0.8,
        "head.weight": 0.3,
    }


def test_exact_names_from_an_allocation_resolve_to_themselves():
    # "0.weight" is also a dotted suffix of "1.0.weight"; the exact name of the latter is more specific.
    names = ["0.weight", "1.0.weight"]
    assert resolve_layer_targets(names, {"0.weight": 0.1, "1.0.weight": 0.2}) == {"0.weight": 0.1, "1.0.weight": 0.2}


def test_equally_specific_patterns_must_agree():
    with pytest.raises(
        ValueError, match=r"targets for 'head.weight' are ambiguous: patterns \['head', 'head.weight'\]"
    ):
        resolve_layer_targets(NAMES, {"head": 0.3, "head.weight": 0.4})
    assert resolve_layer_targets(NAMES, {"head": 0.3, "head.weight": 0.3})["head.weight"] == 0.3


@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        ([("head", 0.5)], TypeError, r"Per-layer targets must be a mapping \{layer-name pattern: sparsity\}, got list"),
        ({}, ValueError, "Per-layer targets are empty"),
        ({3: 0.5}, TypeError, "patterns must be strings, got 3"),
        ({"": 0.5}, ValueError, "patterns must be non-empty strings"),
        ({"head": 1.0}, ValueError, r"`sparsity\['head'\]` must be a number in \[0, 1\), got 1.0"),
        ({"head": -0.1}, ValueError, r"`sparsity\['head'\]` must be a number in \[0, 1\), got -0.1"),
        ({"head": True}, ValueError, r"`sparsity\['head'\]` must be a number in \[0, 1\), got True"),
        ({"head": "0.5"}, ValueError, r"`sparsity\['head'\]` must be a number in \[0, 1\), got '0.5'"),
        (
            {"classifier": 0.5},
            ValueError,
            r"pattern 'classifier' matches no layer\. The layers are: \['features.0.weight', .*'head.weight'\]",
        ),
    ],
)
def test_bad_targets(targets, error, match):
    with pytest.raises(error, match=match):
        resolve_layer_targets(NAMES, targets)


def test_layer_targets_checks_the_value_and_the_scope():
    assert layer_targets(NAMES, {"head": 0.5}, "layer") == [0.0, 0.0, 0.0, 0.5]
    assert layer_targets(NAMES, 0.5, "global") is None
    assert layer_targets(NAMES, OmegaConf.create({"head": 0.5}), "layer") == [0.0, 0.0, 0.0, 0.5]  # from Hydra
    with pytest.raises(ValueError, match=r"contradicts scope='global'.*Pass scope='layer' with a mapping"):
        layer_targets(NAMES, {"head": 0.5}, "global")
    with pytest.raises(ValueError, match="Unknown scope 'local'"):
        layer_targets(NAMES, {"head": 0.5}, "local")
    # A sequence gives one target per layer, in order (what a Pruner passes after matching the patterns once).
    assert layer_targets(NAMES, [0.1, 0.2, 0.3, 0.4], "layer") == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match=r"Got 1 per-layer targets for 4 layers .*give one per layer"):
        layer_targets(NAMES, [0.5], "layer")
    with pytest.raises(ValueError, match=r"`sparsity\['head.weight'\]` must be a number in \[0, 1\), got 1.5"):
        layer_targets(NAMES, [0.1, 0.2, 0.3, 1.5], "layer")
    with pytest.raises(ValueError, match=r"contradicts scope='global'"):
        layer_targets(NAMES, [0.1, 0.2, 0.3, 0.4], "global")
    with pytest.raises(TypeError, match=r"`sparsity` must be a number in \[0, 1\) or a mapping .*got str '0.5'"):
        layer_targets(NAMES, "0.5", "layer")
    with pytest.raises(ValueError, match=r"`sparsity` must be a number in \[0, 1\), got 1.0"):
        layer_targets(NAMES, 1.0, "layer")


# ---------------------------------------------------------------------------------------------- structures
def net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def bind(structure, model):
    return structure.bind(model, example_inputs=torch.randn(2, 8))


def units(structure, masks):
    """Per layer, how many units a target fraction counts: entries, 2x4 tiles, or channels."""
    if isinstance(structure, ChannelStructure):
        return {g.name: g.channels for g in masks.groups}
    if isinstance(structure, BlockStructure):
        bh, bw = structure.block_shape
        return {n: math.ceil(m.shape[0] / bh) * math.ceil(m[0].numel() / bw) for n, m in zip(masks.names, masks.masks)}
    return {n: m.numel() for n, m in zip(masks.names, masks.masks)}


STRUCTURES = [Unstructured(), BlockStructure((2, 4)), NMStructure(2, 4), ChannelStructure()]
IDS = ["unstructured", "block", "2:4", "channel"]
#: Final per-layer targets (keys match parameter names and channel groups' names alike); 2:4 caps them at 0.5.
TARGETS = {"0": 0.5, "2": 0.25}


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
def test_every_layer_reaches_its_own_target_and_unmatched_layers_stay_dense(structure):
    model = net()
    masks = bind(structure, model)
    structure.check_target(masks, TARGETS, "layer")
    structure.prune_(masks, MAG, TARGETS, "layer")
    counts = units(structure, masks)
    got = structure.layer_sparsity(masks)
    for name, sparsity in got.items():
        target = 0.5 if name.startswith("0") else 0.25 if name.startswith("2") else 0.0
        assert sparsity == round(target * counts[name]) / counts[name], name
    if not isinstance(structure, ChannelStructure):
        assert bool((model[4].weight != 0).all()), "the head matches no pattern and must stay dense"


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
def test_a_mapping_that_gives_every_layer_one_target_equals_layer_scope(structure):
    by_mapping, by_scope = bind(structure, net()), bind(structure, net())
    structure.prune_(by_mapping, MAG, {"*": 0.25}, "layer")
    structure.prune_(by_scope, MAG, 0.25, "layer")
    for a, b in zip(by_mapping.masks, by_scope.masks):
        assert torch.equal(a, b)


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
def test_targets_scaled_by_schedule_progress_grow_the_masks_and_never_revive(structure):
    model = net()
    masks = bind(structure, model)
    g = torch.Generator().manual_seed(1)
    counts = units(structure, masks)
    for progress in (0.2, 0.5, 0.8, 1.0):
        with torch.no_grad():  # training moves every weight, even pruned ones until they are re-masked
            for p in masks.params:
                p.add_(torch.randn(p.shape, generator=g))
        before = [m.clone() for m in masks.masks]
        scaled = {pattern: target * progress for pattern, target in TARGETS.items()}
        structure.prune_(masks, MAG, scaled, "layer")
        for old, new in zip(before, masks.masks):
            assert not bool((new & ~old).any()), "a pruned entry was revived"
        for name, sparsity in structure.layer_sparsity(masks).items():
            target = scaled.get(name.split(".")[0], 0.0)
            assert sparsity == round(target * counts[name]) / counts[name], (progress, name)
        for p, m in zip(masks.params, masks.masks):
            assert bool((p[~m] == 0).all())


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
def test_a_mapping_with_global_scope_is_refused(structure):
    masks = bind(structure, net())
    with pytest.raises(ValueError, match="contradicts scope='global'"):
        structure.prune_(masks, MAG, TARGETS, "global")
    with pytest.raises(ValueError, match="contradicts scope='global'"):
        structure.check_target(masks, TARGETS, "global")
    with pytest.raises(ValueError, match="pattern 'classifier' matches no layer"):
        structure.prune_(masks, MAG, {"classifier": 0.5}, "layer")


def test_channel_targets_respect_round_to_and_max_layer_sparsity():
    structure = ChannelStructure(round_to=4, max_layer_sparsity=0.8)
    masks = bind(structure, net())
    structure.prune_(masks, MAG, {"0": 0.3, "2": 0.1}, "layer")  # keep 16 - 5 = 11 -> 12; keep 8 - 1 = 7 -> 8
    assert {g.name: int(masks.kept(g).sum()) for g in masks.groups} == {"0": 12, "2": 8}
    structure.prune_(masks, MAG, {"0": 0.7, "2": 0.6}, "layer")  # 16 - 11 = 5 -> 4; 8 - 5 = 3 -> 4
    assert {g.name: int(masks.kept(g).sum()) for g in masks.groups} == {"0": 4, "2": 4}
    with pytest.raises(ValueError, match=r"with `max_layer_sparsity`=0.8: \{'0': 0.9\}\. Lower their targets"):
        structure.prune_(masks, MAG, {"0": 0.9, "2": 0.5}, "layer")


def test_nm_targets_above_the_pattern_are_refused_per_layer():
    structure = NMStructure(2, 4)
    masks = bind(structure, net())
    with pytest.raises(ValueError, match=r"2:4 prunes at most 50%.*higher: \{'2.weight': 0.75\}"):
        structure.prune_(masks, MAG, {"0": 0.5, "2": 0.75}, "layer")
    structure.prune_(masks, MAG, {"0": 0.5}, "layer")
    assert structure.complete_groups(masks) == {"0.weight": 1.0, "2.weight": 0.0, "4.weight": 0.0}


def test_unstructured_per_layer_targets_prune_the_lowest_weights_of_each_layer():
    model = net()
    masks = bind(Unstructured(), model)
    weights = [p.detach().clone() for p in masks.params]
    Unstructured().prune_(masks, MAG, {"0": 0.5, "4": 0.75}, "layer")
    for w, m, target in zip(weights, masks.masks, (0.5, 0.0, 0.75)):
        k = round(target * w.numel())
        flat = w.abs().reshape(-1)
        lowest = set(torch.sort(flat, stable=True).indices[:k].tolist())
        assert set(torch.nonzero(~m.reshape(-1)).flatten().tolist()) == lowest


def test_growing_targets_never_shrink_when_a_layer_target_drops():
    masks = bind(Unstructured(), net())
    Unstructured().prune_(masks, MAG, {"0": 0.5}, "layer")
    before = [m.clone() for m in masks.masks]
    Unstructured().prune_(masks, MAG, {"0": 0.2, "2": 0.25}, "layer")  # below what layer 0 has: nothing revived
    assert torch.equal(before[0], masks.masks[0])
    assert masks.layer_sparsity()["2.weight"] == 0.25
    assert torch.equal(before[2], masks.masks[2])  # the head matches no pattern: still dense
