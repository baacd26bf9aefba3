"""Head pruning of torchvision's Swin (v1, v2) and MaxViT attention: what a head owns (fused q/k/v rows, output
columns, its position bias), compaction with equal outputs, reloading with ``load_compact``, and bad inputs."""

import pytest
import torch
from torch import nn
from torchvision.models.maxvit import MaxVit, RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

from lightning_prune.criteria import ActivationImportance, build_importance
from lightning_prune.deploy import CompactRelativeAttention, CompactShiftedWindowAttention, load_compact, save_compact
from lightning_prune.deploy.transformer import compact_heads
from lightning_prune.structures import HeadStructure

pytestmark = pytest.mark.usefixtures("one_thread")


def prune(model: nn.Module, sparsity: float = 0.5, **options) -> object:
    structure = HeadStructure(**options)
    masks = structure.bind(model)
    structure.prune_(masks, build_importance("l2"), sparsity, scope="layer")
    return masks


def zero_positions(t: torch.Tensor, dim: int) -> list[int]:
    flat = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1)
    return [i for i in range(flat.shape[0]) if bool((flat[i] == 0).all())]


def weaken(weight: torch.Tensor, rows: list[int]) -> None:
    with torch.no_grad():
        weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) + 1.0)
        weight[rows] *= 0.01


@pytest.mark.parametrize("version", [ShiftedWindowAttention, ShiftedWindowAttentionV2], ids=["v1", "v2"])
def test_a_swin_head_owns_its_fused_rows_output_columns_and_position_bias(version):
    torch.manual_seed(0)
    attention = version(8, [2, 2], [0, 0], num_heads=4)  # head_dim 2
    weaken(attention.qkv.weight, [2, 3, 10, 11, 18, 19])  # head 1's q, k and v rows
    nn.init.ones_(attention.qkv.bias)  # v2 starts the key bias at zero
    masks = prune(nn.Sequential(attention), 0.25)
    assert [(g.name, g.channels) for g in masks.groups] == [("0", 4)]
    assert zero_positions(attention.qkv.weight, 0) == [2, 3, 10, 11, 18, 19]
    assert zero_positions(attention.qkv.bias.unsqueeze(1), 0) == [2, 3, 10, 11, 18, 19]
    assert zero_positions(attention.proj.weight, 1) == [2, 3]
    if version is ShiftedWindowAttentionV2:
        assert zero_positions(attention.logit_scale, 0) == [1]
        assert zero_positions(attention.cpb_mlp[2].weight, 0) == [1]
    else:
        assert zero_positions(attention.relative_position_bias_table, 1) == [1]


def test_a_maxvit_head_owns_its_fused_rows_output_columns_and_position_bias():
    torch.manual_seed(0)
    attention = RelativePositionalMultiHeadAttention(8, 2, 4)  # 4 heads of width 2, 2x2 partitions
    weaken(attention.to_qkv.weight, [4, 5, 12, 13, 20, 21])  # head 2
    prune(nn.Sequential(attention), 0.25)
    assert zero_positions(attention.to_qkv.weight, 0) == [4, 5, 12, 13, 20, 21]
    assert zero_positions(attention.merge.weight, 1) == [4, 5]
    assert zero_positions(attention.relative_position_bias_table, 1) == [2]


def swin(v2: bool) -> SwinTransformer:
    torch.manual_seed(0)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    model = SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=5, **extra)
    return model.eval()


def maxvit() -> MaxVit:
    torch.manual_seed(0)
    model = MaxVit(
        input_size=(32, 32),
        stem_channels=8,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=4,
        stochastic_depth_prob=0.0,
        num_classes=5,
    )
    return model.eval()


@pytest.mark.parametrize(
    ("build", "attention", "compact_type", "heads"),
    [
        (lambda: swin(False), "features.3.0.attn", CompactShiftedWindowAttention, ("num_heads", 2)),
        (lambda: swin(True), "features.3.0.attn", CompactShiftedWindowAttention, ("num_heads", 2)),
        (maxvit, "blocks.1.layers.0.layers.grid_attention.attn_layer.1", CompactRelativeAttention, ("n_heads", 4)),
    ],
    ids=["swin-v1", "swin-v2", "maxvit"],
)
def test_compacts_to_equal_outputs_and_reloads(tmp_path, build, attention, compact_type, heads):
    model = build()
    masks = prune(model)
    small = compact_heads(model, masks)
    module = small.get_submodule(attention)
    assert isinstance(module, compact_type) and getattr(module, heads[0]) == heads[1]  # half the heads
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters()) - masks.num_pruned()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), small(x)
    assert float((a - b).norm() / a.norm()) <= 1e-5
    save_compact(small, tmp_path / "small.pt")
    reloaded = load_compact(build(), tmp_path / "small.pt").eval()
    assert isinstance(reloaded.get_submodule(attention), compact_type)
    with torch.no_grad():
        assert torch.equal(reloaded(x), b)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: CompactShiftedWindowAttention.from_attention(ShiftedWindowAttention(8, [2, 2], [0, 0], 4), []),
            r"`heads` must be distinct indices of 4 heads, at least one, got \[\]\.",
        ),
        (
            lambda: CompactRelativeAttention.from_attention(RelativePositionalMultiHeadAttention(8, 2, 4), [0, 0]),
            r"`heads` must be distinct indices of 4 heads, at least one, got \[0, 0\]\.",
        ),
        (
            lambda: HeadStructure(head_round_to=8).bind(nn.Sequential(ShiftedWindowAttention(8, [2, 2], [0, 0], 4))),
            r"`head_round_to`=8 would empty '0', which has 4 heads\. Lower `head_round_to`",
        ),
    ],
    ids=["no-heads", "repeated-head", "round-to-above-heads"],
)
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("version", [ShiftedWindowAttention, ShiftedWindowAttentionV2], ids=["v1", "v2"])
def test_activation_scores_a_swin_head_by_its_output(version):
    # torchvision applies `proj` with F.linear, so the criterion recomputes the head outputs
    torch.manual_seed(0)
    attention = version(8, [2, 2], [1, 1], num_heads=4)
    with torch.no_grad():
        attention.qkv.weight[16:].zero_()  # v = its bias: head h outputs the constant values[h] everywhere
        attention.qkv.bias[16:].copy_(torch.tensor([0.5, -2.0, 0.0, 1.0]).repeat_interleave(2))
    model = nn.Sequential(attention)
    masks = HeadStructure().bind(model)
    importance = ActivationImportance(batches=1)
    importance.start(model, masks)
    model(torch.randn(2, 4, 4, 8))
    assert importance.observe(masks) and importance.readers == {"0": ["0"]}
    scores = importance.channel_scores(masks, masks.groups[0])
    assert torch.allclose(scores, torch.tensor([0.5, 2.0, 0.0, 1.0], dtype=torch.float64), atol=1e-6)
