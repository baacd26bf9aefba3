"""Compaction of head- and neuron-pruned transformers: equal outputs, head bookkeeping, Hugging Face round trips
(``save_pretrained`` / ``from_pretrained`` for uniform widths, ``load_compact`` otherwise)."""

import pytest
import torch
import transformers
from torch import nn
from torchvision.models import VisionTransformer

from lightning_prune.criteria import build_importance
from lightning_prune.deploy import load_compact, save_compact
from lightning_prune.deploy.transformer import (
    compact_heads,
    compact_zero_heads,
    pretrained_config_widths,
    save_pretrained_compact,
)
from lightning_prune.models import GPT, GPTConfig
from lightning_prune.structures import HeadStructure

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def prune(model: nn.Module, sparsity: float = 0.5, scope: str = "layer", **options):
    structure = HeadStructure(**options)
    masks = structure.bind(model)
    structure.prune_(masks, build_importance("l2"), sparsity, scope=scope)
    return masks


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    for field in ("logits", "last_hidden_state"):
        if hasattr(out, field):
            return getattr(out, field)
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48
    )
    return GPT(config).eval()


@pytest.mark.parametrize(
    ("options", "widths"),
    [
        ({}, {"num_heads": 2, "num_kv_heads": 1, "head_dim": 8, "intermediate_size": 24}),
        ({"gqa": "query"}, {"num_heads": 2, "num_kv_heads": 2, "head_dim": 8, "intermediate_size": 24}),
    ],
    ids=["gqa-kv", "gqa-query"],
)
def test_our_gpt_compacts_to_equal_outputs(options, widths):
    model = gpt()
    masks = prune(model, **options)
    small = compact_heads(model, masks)
    assert small.layer_widths() == [widths, widths]
    assert relative_error(output(model, TOKENS), output(small, TOKENS)) <= 1e-5
    assert count(small) == count(model) - masks.num_pruned()
    assert model.layers[0].self_attn.num_heads == 4  # the masked model is left as it was


def test_non_uniform_widths_reload_through_load_compact(tmp_path):
    model = gpt()
    small = compact_heads(model, prune(model, 0.4, scope="global"))
    widths = small.layer_widths()
    assert widths[0] != widths[1]  # the global ranking gave the layers different widths
    with pytest.raises(ValueError, match=r"The layers have different widths \(.*\); a Hugging Face config holds one"):
        pretrained_config_widths(small)
    save_compact(small, tmp_path / "small.pt")
    reloaded = load_compact(gpt(seed=1), tmp_path / "small.pt").eval()
    assert reloaded.layer_widths() == widths
    assert torch.equal(output(reloaded, TOKENS), output(small, TOKENS))


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
@pytest.mark.parametrize("gqa", ["kv", "query"])
def test_hugging_face_gqa_models_round_trip_through_from_pretrained(tmp_path, family, gqa):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=48,
        vocab_size=50,
    )
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    model = model_cls(config).eval()
    small = compact_heads(model, prune(model, gqa=gqa)).eval()
    assert relative_error(output(model, TOKENS), output(small, TOKENS)) <= 1e-5
    save_pretrained_compact(small, tmp_path)
    reloaded = model_cls.from_pretrained(tmp_path).eval()
    kv = 1 if gqa == "kv" else 2
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, kv)
    assert (reloaded.config.intermediate_size, reloaded.config.head_dim) == (24, 8)
    assert count(reloaded) == count(small) < count(model)
    assert torch.equal(output(reloaded, TOKENS), output(small, TOKENS))


def test_gpt2_compacts_its_transposed_conv1d_projections(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config).eval()
    small = compact_heads(model, prune(model)).eval()
    attn = small.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.weight.shape) == (2, 16, (32, 48))
    assert small.transformer.h[0].mlp.c_fc.weight.shape == (32, 64)
    assert relative_error(output(model, TOKENS), output(small, TOKENS)) <= 1e-5
    save_compact(small, tmp_path / "gpt2.pt")
    reloaded = load_compact(transformers.GPT2LMHeadModel(config), tmp_path / "gpt2.pt").eval()
    assert torch.equal(output(reloaded, TOKENS), output(small, TOKENS))


def test_bert_compacts_heads_and_intermediate_neurons(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48, vocab_size=50
    )
    model = transformers.BertModel(config).eval()
    small = compact_heads(model, prune(model)).eval()
    inner = small.encoder.layer[0].attention.self
    assert (inner.num_attention_heads, inner.all_head_size, inner.query.out_features) == (2, 16, 16)
    assert small.encoder.layer[0].intermediate.dense.out_features == 24
    assert relative_error(output(model, TOKENS), output(small, TOKENS)) <= 1e-5
    save_compact(small, tmp_path / "bert.pt")
    reloaded = load_compact(transformers.BertModel(config), tmp_path / "bert.pt").eval()
    assert torch.equal(output(reloaded, TOKENS), output(small, TOKENS))


def test_pytorch_transformer_encoder_compacts_its_neurons_and_keeps_its_unpruned_attention():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    small = compact_heads(model, prune(model, units="neurons"))
    assert small.layers[0].linear1.out_features == 16
    assert type(small.layers[0].self_attn) is nn.MultiheadAttention  # no head pruned: PyTorch's own module stays
    assert relative_error(output(model, x), output(small, x)) <= 1e-5


def test_torchvision_vit_compacts_its_mlp_neurons():
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    ).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the classifier at zero
    masks = prune(model, units="neurons")
    assert [g.name for g in masks.groups] == [
        "encoder.layers.encoder_layer_0.mlp",
        "encoder.layers.encoder_layer_1.mlp",
    ]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    small = compact_heads(model, masks)
    assert small.encoder.layers[0].mlp[0].out_features == 16
    assert relative_error(output(model, x), output(small, x)) <= 1e-5
    heads = prune(VisionTransformer(16, 8, 2, 2, 16, 32, num_classes=3), units="heads")
    assert [g.channels for g in heads.groups] == [2, 2]


def test_bad_inputs_are_refused():
    model = gpt()
    with pytest.raises(TypeError, match=r"`masks` must be a HeadMaskSet \(from HeadStructure.bind\), got MaskSet"):
        from lightning_prune.masks import MaskSet, prunable_parameters

        compact_heads(model, MaskSet(prunable_parameters(model)))
    with pytest.raises(ValueError, match=r"The masks are not this model's: \['layers.0.self_attn.q_proj.weight'"):
        compact_heads(gpt(seed=1), prune(model))
    with pytest.raises(TypeError, match=r"`model` must be a Hugging Face PreTrainedModel .*got GPT"):
        save_pretrained_compact(model, "unused")


def test_zero_heads_and_neurons_compact_from_the_weights_alone():
    model = gpt()
    masks = prune(model)  # half the key/value groups and half the neurons; the masks are then dropped
    small = compact_zero_heads(model)
    assert small is not None
    widths = {"num_heads": 2, "num_kv_heads": 1, "head_dim": 8, "intermediate_size": 24}
    assert small.layer_widths() == [widths, widths]
    assert count(small) == count(model) - masks.num_pruned()
    assert relative_error(output(model, TOKENS), output(small, TOKENS)) <= 1e-5


def test_zero_heads_of_a_hugging_face_llama_compact_from_the_weights_alone():
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    prune(model, 0.5, gqa="query")  # one query head per key/value group: no key/value head is all zero
    small = compact_zero_heads(model)
    assert small is not None
    assert [layer.mlp.down_proj.in_features for layer in small.model.layers] == [24, 24]
    assert relative_error(output(model, TOKENS), output(small, TOKENS)) <= 1e-5


def test_nothing_to_remove_gives_none():
    assert compact_zero_heads(gpt()) is None  # no unit is all zero
    assert compact_zero_heads(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))) is None
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    mlp[0].weight.data[:4] = 0
    mlp[0].bias.data[:4] = 0
    assert compact_zero_heads(mlp) is None  # no attention: left to the channel compaction
    model = gpt()
    layer = model.layers[0].self_attn
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
        proj.weight.data[:8] = 0  # one key/value group's rows, but its output columns are not zero
    assert compact_zero_heads(model) is None


def test_inference_model_removes_the_heads_a_checkpoint_left_zero():
    from lightning_prune.deploy import inference_model

    model = gpt()
    masks = prune(model)
    small = inference_model(model, TOKENS)
    assert count(small) == count(model) - masks.num_pruned()
    assert relative_error(output(model, TOKENS), output(small, TOKENS)) <= 1e-5
    assert count(inference_model(model, TOKENS, compact=False)) == count(model)
