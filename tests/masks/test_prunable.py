"""Which parameters are prunable: attention projections, Hugging Face Conv1D, embeddings opt-in, and selection by
module type, parameter-name pattern and predicate."""

import pytest
import torch
from torch import nn

from lightning_prune import Pruner
from lightning_prune.criteria import MagnitudeImportance
from lightning_prune.masks import MaskSet, Prunable, prunable_parameters
from lightning_prune.structures import Unstructured


def test_multihead_attention_in_projection_is_prunable_by_default():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32)
    names = list(prunable_parameters(layer))
    assert names == ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]
    matrices = [p for p in layer.parameters() if p.dim() == 2]
    assert sum(p.numel() for p in prunable_parameters(layer).values()) == sum(p.numel() for p in matrices)


def test_separate_query_key_value_projections_are_prunable():
    attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert list(prunable_parameters(attention)) == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj.weight",
    ]


def test_hugging_face_conv1d_is_prunable():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=8, vocab_size=20))
    names = list(prunable_parameters(model))
    assert names == ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"]


class TinyLM(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 10, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


def test_embeddings_and_tied_output_heads_are_opt_in():
    assert list(prunable_parameters(TinyLM(tied=True))) == ["body.weight"]
    assert list(prunable_parameters(TinyLM(tied=False))) == ["body.weight", "lm_head.weight"]
    assert list(prunable_parameters(TinyLM(tied=True), select=Prunable(embeddings=True))) == [
        "embed.weight",
        "body.weight",
    ]


def test_selection_by_type_pattern_and_predicate():
    model = TinyLM(tied=False)
    assert list(prunable_parameters(model, select=Prunable(types=[nn.Embedding], defaults=False))) == ["embed.weight"]
    assert list(prunable_parameters(model, select=Prunable(names=["body.bias"]))) == [
        "body.weight",
        "body.bias",
        "lm_head.weight",
    ]
    wide = Prunable(predicate=lambda name, p: name.startswith("lm_"), defaults=False)
    assert list(prunable_parameters(model, select=wide)) == ["lm_head.weight"]
    assert list(prunable_parameters(model, ["lm_head"], select=Prunable(embeddings=True))) == [
        "embed.weight",
        "body.weight",
    ]


def test_bare_parameter_of_a_custom_module_is_prunable_by_name():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Parameter(torch.randn(12, 4))

    net = nn.Sequential(Attention(), nn.Linear(4, 4))
    assert list(prunable_parameters(net, select=Prunable(names=["qkv"]))) == ["0.qkv", "1.weight"]
    assert list(prunable_parameters(net, select=Prunable(types=[Attention], defaults=False))) == ["0.qkv"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"types": ["Linear"]},
            TypeError,
            r"`Prunable.types` must be nn.Module subclasses \(e.g. \[nn.Embedding\]\), got \['Linear'\]",
        ),
        ({"names": [""]}, ValueError, r"`Prunable.names` must be a list of module-name patterns .*got \[''\]"),
        (
            {"predicate": 3},
            TypeError,
            r"`Prunable.predicate` must be a callable \(name, parameter\) -> bool or None, got int 3",
        ),
    ],
)
def test_bad_selections_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        Prunable(**kwargs)


def test_a_pattern_that_names_no_parameter_is_refused():
    with pytest.raises(ValueError, match=r"`Prunable.names` pattern 'qkv' matches no parameter of TinyLM"):
        prunable_parameters(TinyLM(tied=False), select=Prunable(names=["qkv"]))
    with pytest.raises(ValueError, match=r"TinyLM has nothing left to prune: Prunable\(defaults=False\)"):
        prunable_parameters(TinyLM(tied=False), select=Prunable(defaults=False))


def test_pruner_refuses_a_selection_for_structures_that_find_their_own_groups():
    with pytest.raises(ValueError, match=r"`prunable`=Prunable\(embeddings=True\) selects the parameters of"):
        Pruner(0.5, structure="channel", prunable=Prunable(embeddings=True))
    with pytest.raises(TypeError, match=r"`prunable` must be a lightning_prune.masks.Prunable or None, got list"):
        Pruner(0.5, prunable=["embed"])  # type: ignore[arg-type]


def test_unstructured_pruning_reaches_the_target_over_every_attention_matrix():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32)
    masks = MaskSet(prunable_parameters(layer))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.9)
    matrices = [p for p in layer.parameters() if p.dim() == 2]
    zeros = sum(int((p == 0).sum()) for p in matrices)
    assert zeros == round(0.9 * sum(p.numel() for p in matrices))
    assert bool((layer.self_attn.in_proj_weight == 0).any())
