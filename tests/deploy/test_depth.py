"""Depth pruning: whole blocks removed from our GPT, Hugging Face Llama (GQA), Qwen2, GPT-2, BERT and
nn.TransformerEncoder, with equal outputs to the model whose removed blocks are bypassed, the layer counts rewritten,
``from_pretrained`` and ``load_compact`` round trips, and the bad inputs refused."""

import pytest
import torch
import transformers
from torch import nn

from lightning_prune.criteria import build_importance
from lightning_prune.deploy import load_compact, remove_blocks, remove_blocks_, save_compact
from lightning_prune.deploy.transformer import compact_heads, save_pretrained_compact
from lightning_prune.models import GPT, GPTConfig
from lightning_prune.oneshot import score_blocks
from lightning_prune.structures import HeadStructure, find_block_container, select_blocks, skip_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    for field in ("logits", "last_hidden_state"):
        if hasattr(out, field):
            return getattr(out, field)
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def bypassed(model: nn.Module, indices: list[int], x: torch.Tensor) -> torch.Tensor:
    with skip_blocks(model, indices):
        return output(model, x)


def gpt(layers: int = 4, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48
    )
    return GPT(config).eval()


def test_our_gpt_loses_the_blocks_with_equal_outputs_and_reloads_through_load_compact(tmp_path):
    model = gpt()
    small = remove_blocks(model, [0, 2])
    assert len(small.layers) == small.config.num_hidden_layers == 2
    assert small.layers[0] is not model.layers[1]  # a copy
    assert torch.equal(small.layers[0].mlp.up_proj.weight, model.layers[1].mlp.up_proj.weight)
    assert torch.equal(small.layers[1].mlp.up_proj.weight, model.layers[3].mlp.up_proj.weight)
    assert relative_error(bypassed(model, [0, 2], TOKENS), output(small, TOKENS)) <= 1e-6
    assert relative_error(output(model, TOKENS), output(small, TOKENS)) > 1e-3  # the removed blocks mattered
    assert len(model.layers) == model.config.num_hidden_layers == 4  # the model is left as it was
    save_compact(small, tmp_path / "small.pt")
    reloaded = load_compact(gpt(seed=1), tmp_path / "small.pt").eval()
    assert len(reloaded.layers) == reloaded.config.num_hidden_layers == 2
    assert torch.equal(output(reloaded, TOKENS), output(small, TOKENS))


def test_depth_and_head_pruning_compose_and_reload_through_load_compact(tmp_path):
    model = gpt()
    shallow = remove_blocks(model, [1])
    structure = HeadStructure()
    masks = structure.bind(shallow)
    structure.prune_(masks, build_importance("l2"), 0.4, scope="global")
    small = compact_heads(shallow, masks).eval()
    widths = small.layer_widths()
    assert len(widths) == 3 and widths != [widths[0]] * 3  # uneven widths: a Hugging Face config cannot hold them
    save_compact(small, tmp_path / "small.pt")
    reloaded = load_compact(gpt(seed=1), tmp_path / "small.pt").eval()
    assert reloaded.layer_widths() == widths
    assert torch.equal(output(reloaded, TOKENS), output(small, TOKENS))


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_hugging_face_gqa_models_round_trip_through_from_pretrained(tmp_path, family):
    torch.manual_seed(0)
    options = {"use_sliding_window": True, "max_window_layers": 2, "sliding_window": 4} if family == "Qwen2" else {}
    config = getattr(transformers, f"{family}Config")(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=48,
        vocab_size=50,
        **options,
    )
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    model = model_cls(config).eval()
    batch = {"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS), "labels": TOKENS}  # labels left out
    scores = score_blocks(model, [batch])
    assert scores.names == [f"model.layers.{i}" for i in range(4)] and scores.tokens == 14
    assert bool(torch.isfinite(scores.scores).all()) and bool((scores.scores > 0).all())
    small = remove_blocks(model, [1, 2]).eval()
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]  # the key/value cache's slots
    assert small.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 4
    if family == "Qwen2":  # the per-layer list follows the kept blocks: layers 0 and 3 of 4
        assert small.config.layer_types == ["full_attention", "sliding_attention"]
    assert relative_error(bypassed(model, [1, 2], TOKENS), output(small, TOKENS)) <= 1e-5
    save_pretrained_compact(small, tmp_path)
    reloaded = model_cls.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == len(reloaded.model.layers) == 2
    assert torch.equal(output(reloaded, TOKENS), output(small, TOKENS))
    with torch.no_grad():  # generation through the key/value cache indexes it by the renumbered layer_idx
        generated = reloaded.generate(TOKENS[:1], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 10)


def test_gpt2_round_trips_through_from_pretrained_and_refuses_renumbering_index_scaled_attention(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=16, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config).eval()
    small = remove_blocks(model, [0]).eval()
    assert [block.attn.layer_idx for block in small.transformer.h] == [0, 1]
    assert relative_error(bypassed(model, [0], TOKENS), output(small, TOKENS)) <= 1e-5
    small.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.n_layer == len(reloaded.transformer.h) == 2
    assert torch.equal(output(reloaded, TOKENS), output(small, TOKENS))

    scaled = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=32, n_layer=3, n_head=4, n_positions=16, vocab_size=50, scale_attn_by_inverse_layer_idx=True
        )
    )
    with pytest.raises(ValueError, match=r"^Block 1 of 'transformer.h' computes with its own index \(GPT2Attention "):
        remove_blocks(scaled, [0])
    assert len(remove_blocks(scaled, [2]).transformer.h) == 2  # removing the last blocks renumbers nothing


def test_bert_and_pytorch_post_norm_encoders_lose_blocks_with_equal_outputs(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=48, vocab_size=50
    )
    bert = transformers.BertModel(config).eval()
    small = remove_blocks(bert, [1]).eval()
    assert relative_error(bypassed(bert, [1], TOKENS), output(small, TOKENS)) <= 1e-5
    small.save_pretrained(tmp_path)
    reloaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == len(reloaded.encoder.layer) == 2
    assert torch.equal(output(reloaded, TOKENS), output(small, TOKENS))

    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    shallow = remove_blocks(encoder, [0, 3]).eval()
    assert (len(shallow.layers), shallow.num_layers, encoder.num_layers) == (2, 2, 4)
    assert relative_error(bypassed(encoder, [0, 3], x), output(shallow, x)) <= 1e-6


def test_remove_blocks_in_place_and_the_scores_pick_the_identity_block():
    model = gpt()
    with torch.no_grad():  # block 2 writes nothing to the residual stream: the identity
        model.layers[2].self_attn.o_proj.weight.zero_()
        model.layers[2].mlp.down_proj.weight.zero_()
    scores = score_blocks(model, [TOKENS, TOKENS])
    assert scores.tokens == 28 and float(scores.scores[2]) == pytest.approx(0.0, abs=1e-12)
    assert scores.least_important(1) == [2]
    before = output(model, TOKENS)
    assert remove_blocks_(model, [2]) is model
    assert len(model.layers) == model.config.num_hidden_layers == 3
    assert relative_error(before, output(model, TOKENS)) <= 1e-6


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([0, 1, 2, 3], r"^`indices` \[0, 1, 2, 3\] would remove all 4 blocks of 'layers': at least one must stay\.$"),
        ([4], r"^`indices` \[4\] are not blocks of 'layers': it holds 4 \(0 to 3\)\.$"),
        ([1, 1], r"^`indices` \[1, 1\] repeat a block: give each block to remove once\.$"),
        ([], r"^`indices` must be a non-empty list of block positions, got \[\]\.$"),
    ],
)
def test_bad_indices_are_refused_and_leave_the_model_whole(indices, message):
    model = gpt()
    with pytest.raises(ValueError, match=message):
        remove_blocks_(model, indices)
    assert len(model.layers) == 4


def test_bad_block_counts_and_models_without_blocks_are_refused():
    with pytest.raises(ValueError, match=r"^`num_blocks`=4 would remove all 4 blocks: at least one must stay\. Use "):
        select_blocks([0.1, 0.2, 0.3, 0.4], 4)
    with pytest.raises(ValueError, match=r"^`num_blocks`=6 would remove all 4 blocks"):
        select_blocks([0.1, 0.2, 0.3, 0.4], 6)
    with pytest.raises(ValueError, match=r"^`num_blocks`=0.05 of 4 blocks rounds to 0 blocks: use a larger fraction"):
        select_blocks([0.1, 0.2, 0.3, 0.4], 0.05)
    with pytest.raises(ValueError, match=r"^`num_blocks` must be an integer >= 1 \(blocks to remove\) or a fraction"):
        select_blocks([0.1, 0.2], 1.5)
    flat = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"^Found no repeated blocks in Sequential: no nn.ModuleList"):
        remove_blocks(flat, [0])
    with pytest.raises(ValueError, match=r"^Found no repeated blocks in Sequential"):
        score_blocks(flat, [torch.randn(2, 4)])
    with pytest.raises(ValueError, match=r"^`blocks`='trunk' names no module of GPT\."):
        find_block_container(gpt(), "trunk")
