"""LitGPT's ``GPT``: heads (grouped-query attention included) and MLP neurons against hand-computed rows of the fused
``qkv``, compaction to the masked model's outputs (KV-cache path included), config bookkeeping, reload the LitGPT way
(uniform widths) and through ``load_compact`` (non-uniform), unstructured pruning, a real ``Trainer`` run and bad
inputs. Skipped without the ``litgpt`` extra."""

import pytest
import torch
from _checks import ZeroChecker, tiny_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

litgpt = pytest.importorskip("litgpt")
from litgpt.model import GPT  # noqa: E402

from lightning_prune import Pruner, PruningCallback  # noqa: E402
from lightning_prune.criteria import build_importance  # noqa: E402
from lightning_prune.deploy import load_compact, save_compact  # noqa: E402
from lightning_prune.deploy.transformer import (  # noqa: E402
    compact_heads,
    litgpt_config_widths,
    save_litgpt_compact,
)
from lightning_prune.models import LanguageModel  # noqa: E402
from lightning_prune.structures import HeadStructure  # noqa: E402
from lightning_prune.structures.heads import find_units  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

L2 = build_importance("l2")
MLPS = ["LLaMAMLP", "GemmaMLP", "GptNeoxMLP"]
TOKENS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def config(mlp: str = "LLaMAMLP", **overrides) -> "litgpt.Config":
    """2 layers, 4 query heads of width 8 sharing 2 key/value heads, 64 MLP neurons, partial rope."""
    options = dict(
        n_layer=2,
        n_head=4,
        n_query_groups=2,
        n_embd=32,
        block_size=16,
        vocab_size=100,
        padded_vocab_size=100,
        mlp_class_name=mlp,
        intermediate_size=64,
        norm_class_name="RMSNorm",
        bias=mlp == "GptNeoxMLP",
    )
    return litgpt.Config(**{**options, **overrides})


def gpt(mlp: str = "LLaMAMLP", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(config(mlp, **overrides)).eval()


def prune(model: nn.Module, sparsity: float = 0.5, scope: str = "layer", **options):
    structure = HeadStructure(**options)
    masks = structure.bind(model)
    structure.prune_(masks, L2, sparsity, scope=scope)
    return masks


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / a.detach().norm())


def zero_rows(t: torch.Tensor, dim: int = 0) -> list[int]:
    flat = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1)
    return [i for i in range(flat.shape[0]) if bool((flat[i] == 0).all())]


def tiny_attention(scale: dict[int, float], mlp: str = "LLaMAMLP", columns: bool = False) -> GPT:
    """One layer, 4 query heads of width 2 sharing 2 key/value heads (qkv rows: q 0-7, k 8-11, v 12-15), 8 MLP
    neurons; every weight in [1, 2), the ``qkv`` rows in ``scale`` (and with ``columns`` the same ``proj``
    columns) shrunk by their factor."""
    model = gpt(mlp, n_layer=1, n_embd=8, intermediate_size=8)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape) + 1.0)
        for row, factor in scale.items():
            attn.qkv.weight[row].mul_(factor)
            if columns:
                attn.proj.weight[:, row].mul_(factor)
    return model


def test_gqa_kv_mode_removes_a_key_value_head_with_the_query_heads_that_share_it():
    # key/value head 1 (k rows 10-11, v rows 14-15) is the weakest: its group goes, query heads 2 and 3 (rows 4-7).
    model = tiny_attention({10: 0.01, 11: 0.01, 14: 0.01, 15: 0.01})
    masks = prune(model, units="heads")
    assert [(u.group.name, u.group.channels, u.per_unit) for u in masks.units] == [("transformer.h.0.attn", 2, 2)]
    attn = model.transformer.h[0].attn
    assert zero_rows(attn.qkv.weight) == [4, 5, 6, 7, 10, 11, 14, 15]
    assert zero_rows(attn.proj.weight, dim=1) == [4, 5, 6, 7]
    assert masks.sparsity() == pytest.approx(0.5)


def test_gqa_query_mode_removes_one_query_head_from_every_group():
    # query heads 0 (rows 0-1, group 0) and 3 (rows 6-7, group 1) are the weakest of their groups; head 1 is
    # weaker than head 3, but group 0 cannot lose both while group 1 keeps two. Keys and values stay.
    model = tiny_attention({0: 0.01, 1: 0.01, 2: 0.1, 3: 0.1, 6: 0.5, 7: 0.5}, columns=True)
    masks = prune(model, units="heads", gqa="query")
    assert [(u.group.channels, u.query_units) for u in masks.units] == [(4, True)]
    attn = model.transformer.h[0].attn
    assert zero_rows(attn.qkv.weight) == [0, 1, 6, 7]
    assert zero_rows(attn.proj.weight, dim=1) == [0, 1, 6, 7]


@pytest.mark.parametrize("mlp", MLPS)
def test_mlp_neurons_own_their_up_rows_and_down_column(mlp):
    model = tiny_attention({}, mlp)
    block = model.transformer.h[0].mlp
    ups = [block.fc_1, block.fc_2] if mlp != "GptNeoxMLP" else [block.fc]
    with torch.no_grad():
        ups[0].weight[[1, 5, 6, 7]] *= 0.01
    masks = prune(model, units="neurons")
    assert [(u.group.name, u.kind, u.style) for u in masks.units] == [
        ("transformer.h.0.mlp", "neurons", "fc" if mlp == "GptNeoxMLP" else "gated")
    ]
    for up in ups:
        assert zero_rows(up.weight) == [1, 5, 6, 7]
        assert up.bias is None or zero_rows(up.bias) == [1, 5, 6, 7]
    assert zero_rows(block.proj.weight, dim=1) == [1, 5, 6, 7]


@pytest.mark.parametrize("mlp", MLPS)
@pytest.mark.parametrize(("gqa", "heads"), [("kv", (2, 1)), ("query", (2, 2))])
def test_compact_model_gives_the_masked_outputs_with_its_configs_rewritten(mlp, gqa, heads):
    model = gpt(mlp)
    masks = prune(model, gqa=gqa)
    small = compact_heads(model, masks)
    assert relative_error(model(TOKENS), small(TOKENS)) <= 1e-5
    fields = (small.config.n_head, small.config.n_query_groups, small.config.intermediate_size)
    assert fields == (*heads, 32)
    assert (small.config.head_size, small.config.n_embd, small.config.rope_n_elem) == (8, 32, 2)
    for block in small.transformer.h:
        assert block.attn.config is small.config and block.mlp.config is small.config  # still one shared config
        assert block.attn.qkv.out_features == (heads[0] + 2 * heads[1]) * 8
        assert block.mlp.intermediate_size == 32
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters()) - masks.num_pruned()
    assert (model.config.n_head, model.config.n_query_groups, model.config.intermediate_size) == (4, 2, 64)
    # LitGPT's KV-cache path: prefill, then one token at a time
    for m in (model, small):
        m.set_kv_cache(batch_size=2)
    positions = torch.arange(TOKENS.shape[1])
    assert relative_error(model(TOKENS, input_pos=positions), small(TOKENS, input_pos=positions)) <= 1e-5
    step, position = TOKENS[:, :1], torch.tensor([TOKENS.shape[1]])
    assert relative_error(model(step, input_pos=position), small(step, input_pos=position)) <= 1e-5


def test_uniform_widths_reload_the_litgpt_way(tmp_path):
    model = gpt()
    small = compact_heads(model, prune(model, 0.5))
    folder = save_litgpt_compact(small, tmp_path / "checkpoint")
    assert sorted(p.name for p in folder.iterdir()) == ["lit_model.pth", "model_config.yaml"]
    reloaded = GPT(litgpt.Config.from_file(folder / "model_config.yaml")).eval()
    reloaded.load_state_dict(torch.load(folder / "lit_model.pth"))
    assert (reloaded.config.n_head, reloaded.config.n_query_groups, reloaded.config.intermediate_size) == (2, 1, 32)
    assert reloaded.config.head_size == 8
    assert relative_error(model(TOKENS), reloaded(TOKENS)) <= 1e-5


def test_non_uniform_widths_reload_through_load_compact(tmp_path):
    model = gpt("GptNeoxMLP")
    small = compact_heads(model, prune(model, 0.45, scope="global", gqa="query"))
    layers = [
        (b.attn.config.n_head, b.attn.config.n_query_groups, b.mlp.config.intermediate_size)
        for b in small.transformer.h
    ]
    assert layers == [(2, 2, 29), (2, 2, 25)]  # the global ranking gave the MLPs different widths
    assert small.config.intermediate_size == 64  # the model's config keeps the widths it cannot hold
    with pytest.raises(
        ValueError, match=r"^The layers have different widths \(\{'MLP widths': \[25, 29\]\}\); a LitGPT"
    ):
        litgpt_config_widths(small)
    with pytest.raises(ValueError, match=r"; a LitGPT config holds one width for all layers\. Save with"):
        save_litgpt_compact(small, tmp_path / "checkpoint")
    save_compact(small, tmp_path / "small.pt")
    reloaded = load_compact(gpt("GptNeoxMLP", seed=1), tmp_path / "small.pt").eval()
    reloaded_layers = [
        (b.attn.config.n_head, b.attn.config.n_query_groups, b.mlp.intermediate_size) for b in reloaded.transformer.h
    ]
    assert reloaded_layers == layers
    assert relative_error(model(TOKENS), reloaded(TOKENS)) <= 1e-5
    reloaded.set_kv_cache(batch_size=2)  # the cache is sized by each attention module's own config
    positions = torch.arange(TOKENS.shape[1])
    assert relative_error(model(TOKENS), reloaded(TOKENS, input_pos=positions)) <= 1e-5


def test_unstructured_pruning_covers_every_linear_layer():
    model = gpt()
    pruner = Pruner(0.5, importance="magnitude")
    pruner.bind(model)
    pruner.prune(0.5)
    names = set(pruner.layer_sparsity())
    for i in range(2):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc_1", "mlp.fc_2", "mlp.proj"):
            assert f"transformer.h.{i}.{layer}.weight" in names
    weights = [p for n, p in model.named_parameters() if n in names]
    total = sum(p.numel() for p in weights)
    assert sum(int((p == 0).sum()) for p in weights) == round(0.5 * total)


def test_pruning_callback_prunes_heads_and_neurons_in_a_trainer_fit_and_compacts(tmp_path):
    module = LanguageModel(gpt(n_embd=16, intermediate_size=32), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (16, 9), generator=g)
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    pruning = PruningCallback(
        sparsity=0.5, structure="heads", importance="l2", scope="layer", start_epoch=0, end_epoch=1
    )
    checker = ZeroChecker(pruning)
    tiny_trainer(tmp_path, [pruning, checker], max_epochs=2).fit(module, data)
    assert pruning.achieved_sparsity == pytest.approx(0.5)
    assert checker.checked > 0
    assert set(pruning.layer_sparsity()) == {f"model.transformer.h.{i}.{m}" for i in range(2) for m in ("attn", "mlp")}
    net = module.model.eval()
    small = compact_heads(net, pruning.masks)
    assert (small.config.n_head, small.config.n_query_groups, small.config.intermediate_size) == (2, 1, 16)
    x = tokens[:2, :-1]
    with torch.no_grad():
        assert relative_error(net(x), small(x)) <= 1e-5


def test_bad_inputs_are_refused(tmp_path):
    broken = config()
    broken.n_query_groups = 3  # 4 query heads cannot share 3 key/value heads
    with pytest.raises(
        ValueError,
        match=r"^Attention module 'transformer\.h\.0\.attn' \(CausalSelfAttention\) has 4 query heads and 3 key/value "
        r"heads: grouped-query attention needs the key/value heads to divide the query heads\. Add it to `ignore`\.$",
    ):
        find_units(GPT(broken))
    olmo2 = gpt(norm_qk=True, norm_qk_type="olmo2")
    with pytest.raises(
        ValueError,
        match=r"^Attention module 'transformer\.h\.0\.attn' \(CausalSelfAttention\) normalises its queries and keys "
        r"over all heads at once \(norm_qk_type='olmo2'\), so removing a head would change the others\. Prune its "
        r"neurons only \(HeadStructure\(units='neurons'\)\) or add it to `ignore`\.$",
    ):
        HeadStructure().bind(olmo2)
    assert [u.kind for u in find_units(olmo2, units="neurons")] == ["neurons", "neurons"]
    with pytest.raises(
        ValueError,
        match=r"^`head_round_to`=3 would empty 'transformer\.h\.0\.attn', which has 2 heads\. Lower `head_round_to` or "
        r"add it to `ignore`\.$",
    ):
        HeadStructure(head_round_to=3).bind(gpt())
    moe = gpt(mlp_class_name="LLaMAMoE", moe_intermediate_size=48, n_expert=4, n_expert_per_token=2)
    small = compact_heads(moe, prune(moe, units="neurons"))  # 4 experts per layer, each down to 24 neurons
    with pytest.raises(
        ValueError,
        match=r"^A GPT built from the rewritten config would not fit these weights: \['transformer\.h\.0\.mlp\.experts"
        r"\.0\.fc_1\.weight', .*\(mixture-of-experts experts are not rewritten\)\. Save with "
        r"lightning_prune\.save_compact",
    ):
        save_litgpt_compact(small, tmp_path / "moe")
    with pytest.raises(TypeError, match=r"^`model` must be LitGPT's GPT \(with a litgpt\.Config as `config`\), got "):
        save_litgpt_compact(nn.Linear(2, 2), "unused")
