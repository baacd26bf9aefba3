"""Head pruning of ``nn.MultiheadAttention``: what a head owns (packed or separate projections, ``bias_k``/``bias_v``),
compaction to :class:`CompactMultiheadAttention` with equal outputs on PyTorch's transformer layers and torchvision's
ViT (masks, ``batch_first`` both ways, ``need_weights``), reloading with ``load_compact``, and bad inputs."""

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from lightning_prune.criteria import build_importance
from lightning_prune.deploy import CompactMultiheadAttention, compact_state, load_compact, save_compact
from lightning_prune.deploy.transformer import compact_heads
from lightning_prune.structures import HeadStructure

pytestmark = pytest.mark.usefixtures("one_thread")


def prune(model: nn.Module, sparsity: float = 0.5, **options) -> object:
    structure = HeadStructure(**options)
    masks = structure.bind(model)
    structure.prune_(masks, build_importance("l2"), sparsity, scope="layer")
    return masks


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def zero_positions(t: torch.Tensor, dim: int) -> list[int]:
    flat = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1)
    return [i for i in range(flat.shape[0]) if bool((flat[i] == 0).all())]


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_separate_projections_and_bias_kv_are_owned_by_their_head():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 4, kdim=6, vdim=5, add_bias_kv=True)  # head_dim 2
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.rand(p.shape) + 1.0)
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            getattr(attention, name)[[2, 3]] *= 0.01  # head 1
    masks = prune(nn.Sequential(attention), 0.25)
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        assert zero_positions(getattr(attention, name), 0) == [2, 3]
    assert zero_positions(attention.in_proj_bias.unsqueeze(1), 0) == [2, 3, 10, 11, 18, 19]
    assert zero_positions(attention.bias_k, 2) == [2, 3] and zero_positions(attention.bias_v, 2) == [2, 3]
    assert zero_positions(attention.out_proj.weight, 1) == [2, 3]
    assert masks.kept(masks.groups[0]).tolist() == [True, False, True, True]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_transformer_encoder_compacts_its_heads_to_equal_outputs_with_masks(tmp_path, batch_first):
    torch.manual_seed(0)

    def build() -> nn.TransformerEncoder:
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=batch_first)

    model = build().eval()
    masks = prune(model)
    small = compact_heads(model, masks)
    attention = small.layers[0].self_attn
    assert isinstance(attention, CompactMultiheadAttention)
    assert (attention.num_heads, attention.head_dim, attention.embed_dim) == (2, 4, 16)
    assert attention.q_proj_weight.shape == (8, 16) and attention.out_proj.weight.shape == (16, 8)
    assert small.layers[0].linear1.out_features == 16
    assert count(small) == count(model) - masks.num_pruned()
    assert not small.use_nested_tensor and isinstance(model.layers[0].self_attn, nn.MultiheadAttention)
    x = randn(2, 5, 16) if batch_first else randn(5, 2, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    kept = ~padding if batch_first else ~padding.T  # positions that are not padding
    with torch.no_grad():
        assert relative_error(model(x), small(x)) <= 1e-5
        assert relative_error(model(x, mask=causal), small(x, mask=causal)) <= 1e-5
        # the masked model's nested-tensor path zeroes padded positions; the others are equal
        a, b = model(x, src_key_padding_mask=padding), small(x, src_key_padding_mask=padding)
        assert relative_error(a[kept], b[kept]) <= 1e-5
    save_compact(small, tmp_path / "encoder.pt")
    reloaded = load_compact(build(), tmp_path / "encoder.pt").eval()
    assert isinstance(reloaded.layers[1].self_attn, CompactMultiheadAttention) and not reloaded.use_nested_tensor
    with torch.no_grad():
        assert torch.equal(reloaded(x, src_key_padding_mask=padding), small(x, src_key_padding_mask=padding))


def test_transformer_decoder_compacts_self_and_cross_attention_heads():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, num_layers=2).eval()
    masks = prune(model, units="heads")
    assert [g.name for g in masks.groups] == [
        "layers.0.self_attn",
        "layers.0.multihead_attn",
        "layers.1.self_attn",
        "layers.1.multihead_attn",
    ]
    small = compact_heads(model, masks)
    assert [small.layers[i].multihead_attn.num_heads for i in (0, 1)] == [2, 2]
    tgt, memory = randn(2, 5, 16), randn(2, 7, 16, seed=2)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    padding = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    with torch.no_grad():
        a = model(tgt, memory, tgt_mask=causal, memory_key_padding_mask=padding)
        b = small(tgt, memory, tgt_mask=causal, memory_key_padding_mask=padding)
    assert relative_error(a, b) <= 1e-5


def test_torchvision_vit_compacts_heads_and_neurons():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the classifier at zero
    model.eval()
    masks = prune(model)
    small = compact_heads(model, masks)
    block = small.encoder.layers[0]
    assert (block.self_attention.num_heads, block.self_attention.head_dim, block.mlp[0].out_features) == (2, 8, 32)
    assert count(small) == count(model) - masks.num_pruned()
    x = randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), small(x)) <= 1e-5


def masked_attention(**options) -> nn.MultiheadAttention:
    """Four heads of width 2 over 8 features; head 1 is pruned (its rows and columns zero)."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 4, **options).eval()
    with torch.no_grad():
        attention.out_proj.weight[:, 2:4] *= 0.01
        if attention.in_proj_weight is not None:
            attention.in_proj_weight[[2, 3, 10, 11, 18, 19]] *= 0.01
        else:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                getattr(attention, name)[2:4] *= 0.01
    masks = prune(nn.Sequential(attention), 0.25)
    assert masks.kept(masks.groups[0]).tolist() == [True, False, True, True]
    return attention


@pytest.mark.parametrize(
    "options",
    [{}, {"kdim": 6, "vdim": 5}, {"add_bias_kv": True, "add_zero_attn": True}, {"bias": False, "batch_first": True}],
    ids=["packed", "kdim-vdim", "bias-kv-zero-attn", "no-bias-batch-first"],
)
def test_compact_attention_equals_the_masked_one(options):
    full = masked_attention(**options)
    small = CompactMultiheadAttention.from_attention(full, heads=[0, 2, 3])
    kdim, vdim = options.get("kdim", 8), options.get("vdim", 8)
    first = options.get("batch_first", False)
    query = randn(2, 5, 8) if first else randn(5, 2, 8)
    key, value = (randn(2, 7, d, seed=2) if first else randn(7, 2, d, seed=2) for d in (kdim, vdim))
    padding = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(3)) > 0.7
    mask[:, 0] = False  # every query attends somewhere
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": padding, "attn_mask": mask}):
            expected, all_weights = full(query, key, value, average_attn_weights=False, **kwargs)
            out, weights = small(query, key, value, average_attn_weights=False, **kwargs)
            assert relative_error(expected, out) <= 1e-5
            assert torch.allclose(weights, all_weights[:, [0, 2, 3]], atol=1e-6)
            fast, none = small(query, key, value, need_weights=False, **kwargs)
            assert none is None and relative_error(expected, fast) <= 1e-5


def test_compact_attention_takes_unbatched_inputs_and_per_head_masks_of_the_original_heads():
    full = masked_attention()
    small = CompactMultiheadAttention.from_attention(full, heads=[0, 2, 3])
    x = randn(5, 8)
    with torch.no_grad():
        assert relative_error(full(x, x, x)[0], small(x, x, x)[0]) <= 1e-5
        batch = randn(5, 2, 8)
        per_head = randn(2 * 4, 5, 5, seed=4)  # float masks for the 4 original heads
        expected = full(batch, batch, batch, attn_mask=per_head)[0]
        assert relative_error(expected, small(batch, batch, batch, attn_mask=per_head)[0]) <= 1e-5
    again = CompactMultiheadAttention.from_attention(small, heads=[1, 2])
    assert (again.heads, again.source_num_heads) == ((2, 3), 4)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: CompactMultiheadAttention.from_attention(nn.MultiheadAttention(8, 4), heads=[]),
            ValueError,
            r"`heads` must be distinct indices of 4 heads, at least one, got \[\]\.",
        ),
        (
            lambda: CompactMultiheadAttention.from_attention(nn.MultiheadAttention(8, 4), heads=[1, 4]),
            ValueError,
            r"`heads` must be distinct indices of 4 heads, at least one, got \[1, 4\]\.",
        ),
        (
            lambda: CompactMultiheadAttention.from_attention(nn.Linear(8, 8), heads=[0]),
            TypeError,
            r"`module` must be an nn.MultiheadAttention, got Linear\.",
        ),
        (
            lambda: CompactMultiheadAttention(8, 2, 0),
            ValueError,
            r"`head_dim` must be a positive integer, got 0\.",
        ),
        (
            lambda: CompactMultiheadAttention(8, 2, 2, heads=[0, 0], source_num_heads=4),
            ValueError,
            r"`heads` must be 2 distinct head indices below `source_num_heads`=4, got \[0, 0\]\.",
        ),
    ],
    ids=["no-heads", "unknown-head", "not-attention", "bad-width", "repeated-head"],
)
def test_bad_inputs_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_pruning_never_removes_every_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 4))
    masks = prune(model, 0.9, units="heads")  # the largest per-layer target max_layer_sparsity allows
    assert int(masks.kept(masks.groups[0]).sum()) == 1
    with pytest.raises(ValueError, match=r"`head_round_to`=8 would empty '0', which has 4 heads\. Lower"):
        HeadStructure(head_round_to=8).bind(model)
    with pytest.raises(
        ValueError, match=r"Cannot prune these groups' units to their targets with `max_layer_sparsity`"
    ):
        prune(model, 0.95, units="heads")


def test_load_compact_builds_only_the_package_s_compact_modules():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    state = compact_state(compact_heads(model, prune(model, units="heads")))
    assert state["replaced"]["layers.0.self_attn"]["type"] == "CompactMultiheadAttention"
    state["replaced"]["layers.0.self_attn"]["type"] = "os.system"
    with pytest.raises(
        ValueError,
        match=r"The compact model replaces 'layers.0.self_attn' by 'os.system', which load_compact cannot build: it "
        r"builds \['CompactMultiheadAttention', 'CompactRelativeAttention', 'CompactShiftedWindowAttention'\]\.",
    ):
        load_compact(model, state)
