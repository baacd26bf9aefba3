"""Expert pruning of mixture-of-experts blocks: the choice from hand-computed router statistics, the routing mask (a
pruned expert is never routed to, the softmax is over what is left), the weight-norm fallback, bad inputs, and a real
Trainer run through PruningCallback."""

import math

import pytest
import torch
import transformers
from _checks import ZeroChecker, tiny_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from lightning_prune import Pruner, PruningCallback
from lightning_prune.models import LanguageModel
from lightning_prune.structures import ExpertStructure, build_structure, prune_experts_
from lightning_prune.structures.experts import choose_experts, find_experts

pytestmark = pytest.mark.usefixtures("one_thread")

#: Five tokens whose router logits are the tokens themselves (the router weight is the identity).
TOKENS = [[0.5, 0.0, 3.0, 0.0], [0.5, 0.0, 3.0, 0.0], [2.0, 0.0, 0.0, 1.6], [2.0, 0.0, 0.0, 1.6], [0.0, 1.0, 0.2, 0.9]]


def softmax(logits: list[float]) -> list[float]:
    e = [math.exp(v) for v in logits]
    return [v / sum(e) for v in e]


def zero(t: torch.Tensor) -> bool:
    return bool((t.detach() == 0).all())


def identity_block(cls=MixtralSparseMoeBlock, **config) -> nn.Module:
    """A block of 4 experts, 2 per token, hidden size 4, whose router logits equal its inputs."""
    if cls is MixtralSparseMoeBlock:
        cfg = transformers.MixtralConfig(hidden_size=4, intermediate_size=2, num_local_experts=4, num_experts_per_tok=2)
    else:
        cfg = transformers.Qwen3MoeConfig(
            hidden_size=4, moe_intermediate_size=2, num_experts=4, num_experts_per_tok=2, **config
        )
    block = cls(cfg).eval()
    torch.manual_seed(0)
    for p in block.parameters():
        nn.init.normal_(p)
    with torch.no_grad():
        block.gate.weight.copy_(torch.eye(4))
    return block


def test_router_statistics_and_the_experts_they_choose_are_computed_by_hand():
    mass = [sum(col) for col in zip(*(softmax(t) for t in TOKENS))]  # [1.3045, 0.5911, 1.9971, 1.1074]
    selected = [4.0, 1.0, 2.0, 3.0]  # top-2 of each token: [2, 0], [2, 0], [0, 3], [0, 3], [1, 3]
    x = torch.tensor([TOKENS])

    by_mass = identity_block()
    masks = prune_experts_(by_mass, drop=2, batches=[x], score="mass")
    assert masks.kept_experts() == {"": [0, 2]}  # the least mass: experts 1 and 3

    by_frequency = identity_block()
    masks = prune_experts_(by_frequency, drop=2, batches=[x], score="frequency")
    assert masks.kept_experts() == {"": [0, 3]}  # the fewest tokens: experts 1 and 2

    recorder = identity_block()
    masks = ExpertStructure().bind(recorder)
    recorder(x)
    recorded = masks.routing_statistics()[""]
    assert recorded["mass"] == pytest.approx(mass, rel=1e-6)
    assert recorded["selected"] == selected
    assert recorded["tokens"] == 5


def test_choose_experts_drops_the_lowest_kept_scores_ties_to_the_lower_index():
    scores = torch.tensor([0.3, 0.1, 0.4, 0.1, 0.05])
    kept = torch.tensor([True, True, True, True, False])
    assert choose_experts(scores, kept, 2).tolist() == [False, True, False, True, False]
    assert choose_experts(scores, kept, 3).tolist() == [True, True, False, True, False]


def test_a_pruned_expert_is_never_routed_to_and_the_softmax_is_over_what_is_left():
    block = identity_block()
    prune_experts_(block, drop=2, batches=[torch.tensor([TOKENS])])  # keeps experts 0 and 2
    probabilities, weights, chosen = block.gate(torch.tensor([TOKENS[4]]))
    p0, p2 = softmax([0.0, 0.2])  # the logits of experts 0 and 2 for the last token; 1 and 3 are -inf
    assert probabilities.tolist()[0] == pytest.approx([p0, 0.0, p2, 0.0], rel=1e-6)
    assert chosen.tolist() == [[2, 0]]
    assert weights.tolist()[0] == pytest.approx([p2, p0], rel=1e-6)
    assert zero(block.experts.gate_up_proj[[1, 3]])
    assert zero(block.experts.down_proj[[1, 3]])
    assert zero(block.gate.weight[[1, 3]])


def test_without_top_k_renormalisation_the_weights_are_the_softmax_over_the_experts_left():
    block = identity_block(Qwen3MoeSparseMoeBlock, norm_topk_prob=False)
    masks = prune_experts_(block, drop=1, batches=[torch.tensor([TOKENS])])
    assert masks.kept_experts() == {"": [0, 2, 3]}  # expert 1 has the least mass
    probabilities, weights, chosen = block.gate(torch.tensor([TOKENS[4]]))
    p0, p2, p3 = softmax([0.0, 0.2, 0.9])
    assert chosen.tolist() == [[3, 2]]
    assert weights.tolist()[0] == pytest.approx([p3, p2], rel=1e-6)  # not renormalised to sum to one
    assert probabilities.tolist()[0] == pytest.approx([p0, 0.0, p2, p3], rel=1e-6)


def test_without_calibration_batches_the_weight_norm_scores_the_experts():
    block = identity_block()
    with torch.no_grad():
        for e, scale in enumerate([3.0, 0.1, 2.0, 0.2]):
            block.experts.gate_up_proj[e].mul_(scale)
            block.experts.down_proj[e].mul_(scale)
    assert prune_experts_(block, drop=2).kept_experts() == {"": [0, 2]}
    weighted = identity_block()
    with torch.no_grad():
        weighted.experts.down_proj[2].mul_(0.01)
    masks = prune_experts_(weighted, drop=1, batches=[torch.tensor([TOKENS])], score="weight", importance="l1")
    assert masks.kept_experts() == {"": [0, 1, 3]}


def tiny_mixtral(experts: int = 4, layers: int = 2) -> transformers.MixtralForCausalLM:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=experts,
        num_experts_per_tok=2,
        vocab_size=32,
        max_position_embeddings=16,
    )
    return transformers.MixtralForCausalLM(config)


def test_pruner_prunes_a_uniform_count_per_layer_and_global_scope_lets_layers_compete():
    model = tiny_mixtral(experts=8)
    pruner = Pruner(0.25, structure="experts", importance="l2", scope="layer")
    pruner.bind(model)
    model(torch.randint(0, 32, (2, 8)))
    pruner.prune(0.25)
    assert pruner.layer_sparsity() == {"model.layers.0.mlp": 0.25, "model.layers.1.mlp": 0.25}
    assert "Expert pruning summary" in pruner.summary()

    model = tiny_mixtral(experts=8)
    with torch.no_grad():
        weak = model.model.layers[1].mlp  # the second block's first four experts are weak
        for param in (weak.gate.weight, weak.experts.gate_up_proj, weak.experts.down_proj):
            param[:4].mul_(1e-3)
    pruner = Pruner(0.25, structure=ExpertStructure(score="weight"), importance="l2")
    pruner.bind(model)
    pruner.prune(0.25)
    assert pruner.achieved_sparsity == 0.25
    assert pruner.layer_sparsity() == {"model.layers.0.mlp": 0.0, "model.layers.1.mlp": 0.5}


class Logits(nn.Module):
    """A Hugging Face causal LM as a plain ``tokens -> logits`` network."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(tokens).logits


class RoutingChecker(ZeroChecker):
    """After pruning, every batch: no token is routed to a pruned expert."""

    def __init__(self, pruning: PruningCallback) -> None:
        super().__init__(pruning)
        self.routed: dict[str, set[int]] = {}

    def on_fit_start(self, trainer, pl_module):
        for name, m in pl_module.named_modules():
            if isinstance(m, MixtralSparseMoeBlock):
                m.experts.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, args, output):
            self.routed.setdefault(name, set()).update(args[1].flatten().tolist())

        return hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.routed = {}

    def check(self, pl_module, masks) -> None:
        for block, kept in masks.kept_experts().items():
            assert self.routed[block] <= set(kept), f"a pruned expert of {block} received tokens"


def test_pruning_callback_prunes_experts_that_then_receive_no_tokens(tmp_path):
    module = LanguageModel(Logits(tiny_mixtral(experts=4)), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (16, 9), generator=g)
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    pruning = PruningCallback(
        sparsity=0.5, structure="experts", importance="l2", scope="layer", start_epoch=0, end_epoch=1
    )
    checker = RoutingChecker(pruning)
    tiny_trainer(tmp_path, [pruning, checker], max_epochs=3).fit(module, data)
    assert pruning.achieved_sparsity == 0.5
    assert checker.checked > 0
    kept = pruning.masks.kept_experts()
    assert [len(k) for k in kept.values()] == [2, 2]
    for block, experts in kept.items():
        layer = module.get_submodule(block)
        pruned = [e for e in range(4) if e not in experts]
        assert zero(layer.experts.gate_up_proj[pruned])
        assert zero(layer.gate.weight[pruned])


class OtherRouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4))
        self.top_k = 2


class OtherMoe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = OtherRouter()
        self.experts = identity_block().experts


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: prune_experts_(identity_block(), drop=3),
            r"^`drop`: drop=3 would leave 1 of the 4 experts of 'MixtralSparseMoeBlock', fewer than the 2 experts each "
            r"token is routed to \(`num_experts_per_tok`=2\)\. Prune at most 2 experts per block, or lower "
            r"`num_experts_per_tok` first\.$",
        ),
        (
            lambda: Pruner(0.75, structure="experts", importance="l2", scope="layer").bind(tiny_mixtral()),
            r"^`sparsity`: sparsity=0\.75 would leave 1 of the 4 experts of 'model\.layers\.0\.mlp', fewer than the 2 "
            r"experts each token is routed to \(`num_experts_per_tok`=2\)\.",
        ),
        (
            lambda: Pruner(0.75, structure="experts", importance="l2").bind(tiny_mixtral()),
            r"^Cannot prune 6 of the 8 experts: every block keeps at least the experts it routes each token to "
            r"\(`num_experts_per_tok`\), so at most 4 can go\. Lower the sparsity to at most 0\.5\.$",
        ),
        (
            lambda: prune_experts_(identity_block(), drop=-1),
            r"^`drop` must be a non-negative integer \(experts per block\), got -1\.$",
        ),
        (
            lambda: ExpertStructure(score="tokens"),
            r"^`score` must be 'mass' \(router-probability mass\), 'frequency' \(tokens routed to the expert\) or "
            r"'weight' \(the weight norm\), got 'tokens'\.$",
        ),
        (
            lambda: Pruner(0.5, structure="experts", importance="taylor"),
            r"^structure='experts' scores experts by their routing statistics and falls back to a norm of their "
            r"weights: it supports importance 'l1', 'l2' or 'magnitude' \(= 'l1'\), not ",
        ),
        (
            lambda: find_experts(nn.Sequential(nn.Linear(4, 4))),
            r"^Found no mixture-of-experts block to prune in Sequential: ExpertStructure knows blocks with a `gate` "
            r"router and `experts` holding fused `gate_up_proj`",
        ),
        (
            lambda: find_experts(nn.Sequential(OtherMoe())),
            r"^MoE block '0' \(OtherMoe\) routes with OtherRouter, whose rule the routing mask does not know "
            r"\(ExpertStructure knows the softmax top-k routers of Mixtral, MiniMax, Qwen2-MoE, Qwen3-MoE, Qwen3-Next "
            r"and OLMoE\)\. Add it to `ignore`\.$",
        ),
    ],
    ids=[
        "drop-too-many",
        "layer-target-below-top-k",
        "global-target-too-high",
        "negative-drop",
        "bad-score",
        "bad-importance",
        "no-moe",
        "unknown-router",
    ],
)
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_ignored_blocks_stay_whole_and_the_structure_is_registered_by_name():
    model = tiny_mixtral()
    assert [g.group.name for g in find_experts(model, ignore=["layers.0"])] == ["model.layers.1.mlp"]
    built = build_structure("experts", score="frequency")
    assert isinstance(built, ExpertStructure) and built.score == "frequency"
    with pytest.raises(ValueError, match=r"^`score` applies to structure='experts' only, got structure='channel'\.$"):
        build_structure("channel", score="mass")


def test_restored_masks_route_the_fresh_model_like_the_saved_one():
    x = torch.randint(0, 32, (2, 8))
    model = tiny_mixtral(experts=8)
    pruner = Pruner(0.5, structure="experts", importance="l2", scope="layer")
    pruner.bind(model)
    model(x)
    pruner.prune(0.5)
    state = pruner.state_dict()
    with torch.no_grad():
        expected = model(x).logits

    fresh = tiny_mixtral(experts=8)  # the same seed: the same dense weights
    restored = Pruner(0.5, structure="experts", importance="l2", scope="layer")
    restored.bind(fresh)
    restored.load_state_dict(state)
    assert restored.masks.kept_experts() == pruner.masks.kept_experts()
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, expected)
