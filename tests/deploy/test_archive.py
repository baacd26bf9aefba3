"""Sparse archives: bitwise round trips, sizes, and refusals (lightning_prune.deploy.archive)."""

import copy

import pytest
import torch
from torch import nn

from lightning_prune import MaskSet, PruningCallback, prunable_parameters
from lightning_prune.criteria.magnitude import MagnitudeImportance
from lightning_prune.deploy.archive import (
    SPARSE_FORMAT,
    check_masks_applied,
    load_sparse,
    load_sparse_state_dict,
    save_sparse,
    sparse_archive,
)
from lightning_prune.models import MLP, SmallCNN, resnet20
from lightning_prune.structures.channel import prune_channels_
from lightning_prune.structures.unstructured import Unstructured


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.is_complex():
        return torch.view_as_real(t).view(torch.int64 if t.dtype == torch.complex128 else torch.int32)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(_bits(a[key]), _bits(b[key])), key


def _pruned_unstructured(model: nn.Module, sparsity: float) -> MaskSet:
    masks = MaskSet(prunable_parameters(model))
    Unstructured().prune_(masks, MagnitudeImportance(), sparsity=sparsity)
    return masks


def _mlp(sparsity: float = 0.9) -> tuple[nn.Module, MaskSet]:
    torch.manual_seed(0)
    net = MLP()
    return net, _pruned_unstructured(net, sparsity)


def _cnn_channels() -> tuple[nn.Module, MaskSet]:
    torch.manual_seed(0)
    net = SmallCNN()
    x = torch.randn(4, 1, 8, 8)
    net(x)  # BatchNorm running statistics that are not the defaults
    return net.eval(), prune_channels_(net, x, sparsity=0.5)


def _resnet() -> tuple[nn.Module, MaskSet]:
    torch.manual_seed(0)
    net = resnet20(in_channels=1)
    return net.eval(), _pruned_unstructured(net, 0.8)


@pytest.mark.parametrize("build", [_mlp, _cnn_channels, _resnet], ids=["mlp", "cnn-channels", "resnet20"])
def test_round_trip_restores_the_exact_model(build, tmp_path):
    net, masks = build()
    path = save_sparse(net, tmp_path / "sparse.pt", masks=masks)
    fresh = copy.deepcopy(net)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    load_sparse(fresh, path)
    assert_bitwise_equal(fresh.state_dict(), net.state_dict())
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(fresh.eval()(x), net.eval()(x))


def _negate_zeros_(net: nn.Module) -> None:
    """Make every zero weight -0.0 (what zeroing by a multiply leaves where the weight was negative)."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.where(p == 0, torch.full_like(p, -0.0), p))


def test_negative_zeros_survive(tmp_path):
    net, masks = _mlp()
    _negate_zeros_(net)
    weight = net.features[1].weight
    assert int((torch.signbit(weight) & (weight == 0)).sum()) > 0
    restored = load_sparse_state_dict(save_sparse(net, tmp_path / "a.pt", masks=masks))
    assert_bitwise_equal(restored, net.state_dict())


def test_archive_at_90_percent_is_at_most_a_fifth_of_the_dense_file(tmp_path):
    net, masks = _mlp(0.9)
    _negate_zeros_(net)
    dense = tmp_path / "dense.pt"
    torch.save(net.state_dict(), dense)
    exact = save_sparse(net, tmp_path / "exact.pt", masks=masks).stat().st_size
    unsigned = save_sparse(net, tmp_path / "unsigned.pt", signed_zeros=False).stat().st_size
    assert exact <= 0.2 * dense.stat().st_size
    assert unsigned < exact  # the signs of the zeros cost up to one bit per zero
    restored = load_sparse_state_dict(tmp_path / "unsigned.pt")
    for key, value in net.state_dict().items():
        assert torch.equal(restored[key], value)  # equal values; every zero is +0.0
        assert not bool(torch.signbit(restored[key][restored[key] == 0]).any())


def test_encoding_is_the_smallest_per_tensor():
    g = torch.Generator().manual_seed(0)
    state = {
        "dense": torch.randn(64, 64, generator=g),
        "ninety": torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) > 0.9),
        "very": torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) > 0.995),
        "small": torch.zeros(8),
    }
    tensors = sparse_archive(state)["tensors"]
    assert [tensors[k]["encoding"] for k in state] == ["dense", "bitmask", "indices", "dense"]
    assert tensors["ninety"]["bitmask"]["dtype"] == "uint8" and tensors["ninety"]["bitmask"]["count"] == 64 * 64 // 8
    assert tensors["very"]["indices"]["dtype"] == "int32"
    assert tensors["ninety"]["values"]["dtype"] == "int32"  # float32 values, moved bit for bit


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool, torch.complex64]
)
def test_every_dtype_round_trips(dtype):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(40, 50, generator=g) * (torch.rand(40, 50, generator=g) > 0.85)
    tensor = values.to(torch.complex64) * 1j if dtype == torch.complex64 else (values * 10).to(dtype)
    restored = load_sparse_state_dict(sparse_archive({"t": tensor}))["t"]
    assert restored.dtype == dtype
    assert torch.equal(_bits(restored), _bits(tensor))


def test_nan_payloads_infinities_and_noncontiguous_tensors_are_kept():
    t = torch.zeros(30, 40)
    t[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40])
    t.view(torch.int32)[1, 0] = 0x7FC00123  # a NaN with a payload
    channels_last = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    channels_last[:, :6] = 0
    restored = load_sparse_state_dict(sparse_archive({"t": t, "cl": channels_last}))
    assert torch.equal(_bits(restored["t"]), _bits(t))
    assert torch.equal(restored["cl"], channels_last)


def test_archive_loads_with_weights_only_and_records_format(tmp_path):
    net, masks = _mlp()
    path = save_sparse(net, tmp_path / "sparse.pt", masks=masks)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == SPARSE_FORMAT and raw["version"] == 1 and raw["architecture"] == "MLP"
    entry = raw["tensors"]["features.1.weight"]
    assert (entry["shape"], entry["dtype"], entry["encoding"]) == ([300, 64], "float32", "bitmask")
    assert raw["blob"].dtype == torch.uint8 and raw["blob"].dim() == 1


def test_loading_into_another_shape_is_refused_and_leaves_the_model_alone(tmp_path):
    net, masks = _mlp()
    path = save_sparse(net, tmp_path / "sparse.pt", masks=masks)
    other = MLP(hidden=(200, 100))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(
        ValueError,
        match=r"does not fit this MLP \(saved from a MLP\): features\.1\.weight: archived "
        r"shape \(300, 64\), the model's \(200, 64\).*Build the model with the widths",
    ):
        load_sparse(other, path)
    assert_bitwise_equal(other.state_dict(), before)
    with pytest.raises(
        ValueError,
        match=r"unexpected features\.3\.weight.*head\.weight: archived shape \(10, 100\), the model's \(10, 300\)",
    ):
        load_sparse(MLP(hidden=(300,)), path)
    with pytest.raises(ValueError, match=r"archived dtype torch\.float32, the model's torch\.float64"):
        load_sparse(MLP().double(), path)


def test_damaged_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"No sparse archive at .*does not exist"):
        load_sparse_state_dict(tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"not a sparse archive written by lightning_prune\.save_sparse"):
        load_sparse_state_dict(tmp_path / "plain.pt")
    archive = sparse_archive({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"format version 99 is not supported \(this version reads 1\)"):
        load_sparse_state_dict({**archive, "version": 99})
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(
        ValueError, match=r"junk\.pt' is not a file written by torch\.save \(it is not a zip archive; 9 bytes\)"
    ):
        load_sparse_state_dict(tmp_path / "junk.pt")
    broken = sparse_archive({"w": torch.randn(64, 64) * (torch.rand(64, 64) > 0.9)})
    broken["tensors"]["w"]["values"]["count"] -= 1
    with pytest.raises(ValueError, match=r"entry 'w' is damaged: \d+ values for \d+ nonzero positions"):
        load_sparse_state_dict(broken)
    broken["tensors"]["w"]["values"]["offset"] = 10**9
    with pytest.raises(ValueError, match=r"entry 'w' is damaged: a section lies outside the archive's bytes"):
        load_sparse_state_dict(broken)
    with pytest.raises(ValueError, match=r"The sparse archive is damaged: it has no `blob` of bytes"):
        load_sparse_state_dict({**broken, "blob": None})


def test_state_dicts_with_other_entries_are_refused():
    class WithExtraState(nn.Linear):
        def get_extra_state(self):
            return {"note": "kept"}

        def set_extra_state(self, state):
            pass

    with pytest.raises(ValueError, match=r"entry '_extra_state' is a dict, not a tensor.*holds tensors only"):
        sparse_archive(WithExtraState(2, 2))
    with pytest.raises(ValueError, match=r"entry 'm' is a torch\.strided tensor on meta"):
        sparse_archive({"m": torch.empty(4, device="meta")})
    with pytest.raises(ValueError, match=r"entry 's' is a torch\.sparse_coo"):
        sparse_archive({"s": torch.eye(3).to_sparse()})
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module or a state dict, got int"):
        sparse_archive(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`signed_zeros` must be True or False, got 'yes'"):
        sparse_archive({}, signed_zeros="yes")  # type: ignore[arg-type]


def test_masks_that_were_never_applied_are_refused(tmp_path):
    torch.manual_seed(0)
    net = MLP()
    masks = MaskSet(prunable_parameters(net))
    masks.masks[0][:10] = False  # grown, not applied
    with pytest.raises(
        ValueError,
        match=r"masks were not applied to MLP: features\.1\.weight has 640 nonzero entries "
        r"among the 640 its mask prunes\. Call `masks\.apply_\(\)`",
    ):
        save_sparse(net, tmp_path / "a.pt", masks=masks)
    assert not (tmp_path / "a.pt").exists()
    keep = {name: mask.clone() for name, mask in masks.state_dict().items()}
    with pytest.raises(ValueError, match="masks were not applied"):
        check_masks_applied(net, keep)  # the same masks as a checkpoint's mapping
    masks.apply_()
    check_masks_applied(net, masks)
    check_masks_applied(net, keep)


def test_mask_arguments_are_checked():
    net = MLP()
    other = MLP()
    with pytest.raises(ValueError, match=r"prune 'features\.1\.weight', which is not a parameter of this SmallCNN"):
        check_masks_applied(SmallCNN(), MaskSet(prunable_parameters(other)))
    with pytest.raises(
        ValueError,
        match=r"`masks` names 'model\.features\.1\.weight', which is not a parameter of "
        r"this MLP \(similar: \['features\.1\.weight'\]\)",
    ):
        check_masks_applied(net, {"model.features.1.weight": torch.ones(300, 64, dtype=torch.bool)})
    with pytest.raises(
        ValueError, match=r"mask of 'features\.1\.weight' has shape \(3, 3\), the parameter \(300, 64\)"
    ):
        check_masks_applied(net, {"features.1.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"PruningCallback has no masks yet: it builds them when training starts"):
        check_masks_applied(net, PruningCallback(sparsity=0.5))
    with pytest.raises(TypeError, match=r"`masks` must be None, a MaskSet, a fitted PruningCallback or a mapping"):
        check_masks_applied(net, [1, 2])
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module, got dict"):
        check_masks_applied({}, None)  # type: ignore[arg-type]


def test_torch_prune_reparametrisation_is_refused():
    net = MLP()
    torch.nn.utils.prune.l1_unstructured(net.features[1], "weight", amount=0.5)
    with pytest.raises(
        ValueError,
        match=r"reparametrised by torch\.nn\.utils\.prune \(features\.1\.weight_orig times "
        r"its mask\).*prune\.remove\(module, 'weight'\)",
    ):
        sparse_archive(net)
    torch.nn.utils.prune.remove(net.features[1], "weight")
    assert sparse_archive(net)["tensors"]["features.1.weight"]["encoding"] == "bitmask"
