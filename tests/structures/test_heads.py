"""Head and neuron pruning: masks against hand-computed indices (grouped-query attention included), criteria,
rounding, bad inputs, and a real Trainer run through PruningCallback's schedule."""

import pytest
import torch
from _checks import ZeroChecker, tiny_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import Pruner, PruningCallback
from lightning_prune.criteria import build_importance
from lightning_prune.models import GPT, GPTConfig, LanguageModel
from lightning_prune.models.gpt import Attention, SwiGLU
from lightning_prune.structures import HeadStructure, build_structure

pytestmark = pytest.mark.usefixtures("one_thread")

L2 = build_importance("l2")


def zero_rows(t: torch.Tensor, dim: int = 0) -> list[int]:
    """The positions along ``dim`` whose entries are all zero."""
    flat = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1)
    return [i for i in range(flat.shape[0]) if bool((flat[i] == 0).all())]


def gqa_attention(scale: dict[str, dict[int, float]]) -> nn.Sequential:
    """4 query heads of width 2 sharing 2 key/value heads, hidden 8; ``scale[proj][row]`` shrinks chosen rows."""
    torch.manual_seed(0)
    attention = Attention(hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2)
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.rand(p.shape) + 1.0)  # every entry in [1, 2): scores differ by the scaled rows only
        for proj, rows in scale.items():
            weight = getattr(attention, proj).weight
            for row, factor in rows.items():
                (weight[:, row] if proj == "o_proj" else weight[row]).mul_(factor)
    return nn.Sequential(attention)


def test_gqa_kv_mode_removes_a_key_value_head_with_its_query_heads():
    # key/value head 1 (k rows 2-3) is the weakest, so its group goes: query heads 2 and 3.
    model = gqa_attention({"k_proj": {2: 0.01, 3: 0.01}, "v_proj": {2: 0.01, 3: 0.01}})
    structure = HeadStructure(units="heads")
    masks = structure.bind(model)
    assert [g.channels for g in masks.groups] == [2]  # two units: the key/value groups
    structure.prune_(masks, L2, 0.5, scope="layer")
    a = model[0]
    assert zero_rows(a.q_proj.weight) == [4, 5, 6, 7]
    assert zero_rows(a.k_proj.weight) == [2, 3] and zero_rows(a.v_proj.weight) == [2, 3]
    assert zero_rows(a.o_proj.weight, dim=1) == [4, 5, 6, 7]
    assert masks.sparsity() == pytest.approx(0.5)


def test_gqa_query_mode_removes_the_same_number_of_query_heads_from_every_group():
    # query head 0 (group 0) and query head 3 (group 1) are the weakest of their groups; head 1 is weaker than 3
    # but both of group 0 cannot go while group 1 keeps two.
    model = gqa_attention({"q_proj": {0: 0.01, 1: 0.01, 2: 0.2, 3: 0.2, 6: 0.5, 7: 0.5}})
    structure = HeadStructure(units="heads", gqa="query")
    masks = structure.bind(model)
    assert [g.channels for g in masks.groups] == [4]
    structure.prune_(masks, L2, 0.5, scope="layer")
    a = model[0]
    assert zero_rows(a.q_proj.weight) == [0, 1, 6, 7]
    assert zero_rows(a.o_proj.weight, dim=1) == [0, 1, 6, 7]
    assert zero_rows(a.k_proj.weight) == [] and zero_rows(a.v_proj.weight) == []
    assert structure.layer_sparsity(masks) == {"0": 0.5}


def test_query_mode_rounds_to_whole_rounds_of_the_groups():
    model = gqa_attention({})
    structure = HeadStructure(units="heads", gqa="query")
    masks = structure.bind(model)
    structure.prune_(masks, L2, 0.4, scope="layer")  # 1.6 heads asked: 2, one from each group
    kept = masks.kept(masks.groups[0])
    assert int(kept[:2].sum()) == int(kept[2:].sum()) == 1


def test_gated_mlp_neuron_owns_gate_and_up_rows_and_the_down_column():
    torch.manual_seed(0)
    mlp = SwiGLU(hidden_size=4, intermediate_size=6)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.rand(p.shape) + 1.0)
        mlp.gate_proj.weight[[1, 4]] *= 0.01
        mlp.up_proj.weight[[1, 4]] *= 0.01
    model = nn.Sequential(mlp)
    structure = HeadStructure(units="neurons")
    masks = structure.bind(model)
    structure.prune_(masks, build_importance("l1"), 2 / 6, scope="layer")
    assert zero_rows(mlp.gate_proj.weight) == [1, 4] and zero_rows(mlp.up_proj.weight) == [1, 4]
    assert zero_rows(mlp.down_proj.weight, dim=1) == [1, 4]


def test_multihead_attention_head_owns_its_packed_in_projection_rows_and_output_columns():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 4)  # head_dim 2
    with torch.no_grad():
        attention.in_proj_weight.copy_(torch.rand(24, 8) + 1.0)
        attention.in_proj_bias.fill_(1.0)
        attention.in_proj_weight[[2, 3, 10, 11, 18, 19]] *= 0.01  # head 1's q, k and v rows
    model = nn.Sequential(attention)
    structure = HeadStructure()
    masks = structure.bind(model)
    structure.prune_(masks, L2, 0.25, scope="layer")
    assert zero_rows(attention.in_proj_weight) == [2, 3, 10, 11, 18, 19]
    assert zero_rows(attention.in_proj_bias.unsqueeze(1)) == [2, 3, 10, 11, 18, 19]
    assert zero_rows(attention.out_proj.weight, dim=1) == [2, 3]


def test_hugging_face_gpt2_heads_and_neurons_follow_the_transposed_conv1d():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=4, n_positions=8, vocab_size=20))
    attn = model.h[0].attn
    with torch.no_grad():
        attn.c_attn.weight.copy_(torch.rand(8, 24) + 1.0)
        attn.c_attn.weight[:, [4, 5, 12, 13, 20, 21]] *= 0.01  # head 2's q, k, v columns (Conv1D: (in, out))
    structure = HeadStructure(units="heads")
    masks = structure.bind(model)
    assert [(g.name, g.channels) for g in masks.groups] == [("h.0.attn", 4)]
    structure.prune_(masks, L2, 0.25, scope="layer")
    assert zero_rows(attn.c_attn.weight, dim=1) == [4, 5, 12, 13, 20, 21]
    assert zero_rows(attn.c_proj.weight) == [4, 5]
    both = HeadStructure().bind(GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=4, n_positions=8, vocab_size=20)))
    assert [(g.name, g.channels) for g in both.groups] == [("h.0.attn", 4), ("h.0.mlp", 32)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert"])
def test_hugging_face_attention_and_mlps_are_found(family):
    import transformers

    if family == "bert":
        model = transformers.BertModel(
            transformers.BertConfig(
                hidden_size=16, num_attention_heads=4, num_hidden_layers=1, intermediate_size=24, vocab_size=30
            )
        )
        expected = [("encoder.layer.0", 24), ("encoder.layer.0.attention", 4)]
    else:
        config_cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        model_cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
        config = config_cls(
            hidden_size=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=1,
            intermediate_size=24,
            vocab_size=30,
        )
        model = model_cls(config)
        expected = [("model.layers.0.self_attn", 2), ("model.layers.0.mlp", 24)]
    masks = HeadStructure().bind(model)
    assert [(g.name, g.channels) for g in masks.groups] == expected


def test_taylor_scores_units_by_their_gradients():
    model = gqa_attention({})
    pruner = Pruner(0.5, structure=HeadStructure(units="heads", gqa="query"), importance="taylor", scope="layer")
    pruner.bind(model)
    pruner.start_collecting()
    cos = torch.ones(5, 2)
    sin = torch.zeros(5, 2)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model.zero_grad()
        model[0](x, cos, sin)[..., :1].sum().backward()
        pruner.observe()
    assert pruner.prune(0.5)
    kept = pruner.masks.kept(pruner.masks.groups[0])
    assert kept.tolist().count(True) == 2 and int(kept[:2].sum()) == 1


def test_global_scope_reaches_the_parameter_fraction():
    torch.manual_seed(0)
    model = GPT(GPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32))
    structure = HeadStructure()
    masks = structure.bind(model)
    structure.prune_(masks, L2, 0.3)
    assert structure.sparsity(masks) == pytest.approx(0.3, abs=0.03)
    assert all(int(masks.kept(g).sum()) > 0 for g in masks.groups)


def test_round_to_keeps_a_multiple_of_neurons():
    torch.manual_seed(0)
    model = nn.Sequential(SwiGLU(hidden_size=4, intermediate_size=32))
    structure = HeadStructure(units="neurons", round_to=8)
    masks = structure.bind(model)
    structure.prune_(masks, L2, 0.4, scope="layer")  # 19.2 kept asked: 16
    assert int(masks.kept(masks.groups[0]).sum()) == 16


class HeadlessAttention(nn.Module):
    def __init__(self, q: int = 8, kv: int = 8, head_dim: int = 3) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, q), nn.Linear(8, kv), nn.Linear(8, kv)
        self.o_proj = nn.Linear(q, 8)


@pytest.mark.parametrize(
    ("model", "structure", "match"),
    [
        (
            nn.Sequential(HeadlessAttention(head_dim=3)),
            HeadStructure(),
            r"Attention module '0' \(HeadlessAttention\) has 8 query and 8 key/value outputs, which head_dim=3 does "
            r"not divide: its head count is not whole",
        ),
        (
            nn.Sequential(HeadlessAttention(q=6, kv=4, head_dim=2)),
            HeadStructure(),
            r"Attention module '0' \(HeadlessAttention\) has 3 query heads and 2 key/value heads: grouped-query "
            r"attention needs the key/value heads to divide the query heads",
        ),
        (
            nn.Sequential(nn.MultiheadAttention(8, 4)),
            HeadStructure(head_round_to=8),
            r"`head_round_to`=8 would empty '0', which has 4 heads\. Lower `head_round_to`",
        ),
        (
            gqa_attention({}),
            HeadStructure(gqa="query", head_round_to=3),
            r"`head_round_to`=3 would empty '0', which has 4 heads in 2 key/value groups",
        ),
        (
            nn.Sequential(nn.Linear(4, 4)),
            HeadStructure(),
            r"Found no heads or neurons to prune in Sequential: HeadStructure knows attention with",
        ),
    ],
    ids=["head-count-not-whole", "gqa-ratio", "round-to-above-heads", "round-to-above-groups", "no-transformer"],
)
def test_bad_models_and_roundings_are_refused(model, structure, match):
    with pytest.raises(ValueError, match=match):
        structure.bind(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"units": "layers"}, r"`units` must be 'heads', 'neurons' or both, got 'layers'"),
        ({"gqa": "groups"}, r"`gqa` must be 'kv' \(remove a key/value head with its query heads\) or 'query'"),
        ({"round_to": 0}, r"`round_to` must be a positive integer, got 0"),
        ({"head_round_to": 1.5}, r"`head_round_to` must be a positive integer, got 1.5"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeadStructure(**kwargs)


def test_registered_by_name_with_its_options():
    built = build_structure("heads", round_to=8, gqa="query")
    assert isinstance(built, HeadStructure) and built.round_to == 8 and built.gqa == "query"
    with pytest.raises(ValueError, match=r"`gqa` applies to structure='heads' only, got structure='channel'"):
        build_structure("channel", gqa="kv")


def test_pruning_callback_prunes_heads_and_neurons_on_the_cubic_schedule(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    module = LanguageModel(GPT(config), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (16, 9), generator=g)
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    pruning = PruningCallback(
        sparsity=0.5, structure="heads", importance="l2", scope="layer", start_epoch=0, end_epoch=2
    )
    checker = ZeroChecker(pruning)
    tiny_trainer(tmp_path, [pruning, checker], max_epochs=3).fit(module, data)
    assert pruning.achieved_sparsity == pytest.approx(0.5)
    assert set(pruning.layer_sparsity().values()) == {0.5}
    assert checker.checked > 0
    layer = module.model.layers[0]
    assert len(zero_rows(layer.self_attn.k_proj.weight)) == 4  # one of two key/value heads (head_dim 4)
    assert len(zero_rows(layer.mlp.down_proj.weight, dim=1)) == 16
