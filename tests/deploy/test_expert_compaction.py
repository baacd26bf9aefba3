"""Compaction of expert-pruned mixtures of experts: outputs equal to the masked model's, Hugging Face round trips
(``save_pretrained`` / ``from_pretrained`` with the expert count rewritten) and ``load_compact`` for different counts
per block."""

import pytest
import torch
import transformers
from torch import nn

from lightning_prune import Pruner
from lightning_prune.deploy import compact_experts, load_compact, save_compact
from lightning_prune.deploy.transformer import expert_counts, pretrained_config_widths, save_pretrained_compact
from lightning_prune.structures import ExpertStructure, prune_experts_

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
CALIBRATION = [torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))]

#: Tiny configs of the Hugging Face families whose MoE blocks share Mixtral's fused layout, and their expert-count key.
FAMILIES = {
    "Mixtral": ({"intermediate_size": 8, "num_local_experts": 6}, "num_local_experts"),
    "Qwen2Moe": (
        {"moe_intermediate_size": 8, "shared_expert_intermediate_size": 8, "num_experts": 6, "norm_topk_prob": False},
        "num_experts",
    ),
    "Qwen3Moe": ({"moe_intermediate_size": 8, "num_experts": 6, "norm_topk_prob": True}, "num_local_experts"),
    "Olmoe": ({"intermediate_size": 8, "num_experts": 6}, "num_experts"),
}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    options, _ = FAMILIES[family]
    config = getattr(transformers, f"{family}Config")(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts_per_tok=2,
        vocab_size=50,
        max_position_embeddings=32,
        **options,
    )
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def logits(model: nn.Module, x: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compact_model_equals_the_masked_one_and_round_trips_through_from_pretrained(tmp_path, family):
    model = build(family)
    dense = logits(model)
    ExpertStructure().bind(model)  # the routing mask with nothing pruned is the router's own rule
    assert torch.equal(logits(model), dense)
    masks = prune_experts_(model, drop=3, batches=CALIBRATION)
    masked = logits(model)
    assert relative_error(dense, masked) > 1e-3  # pruning changed the model: the comparison below can fail
    small = compact_experts(model, masks).eval()
    assert expert_counts(small) == [3, 3]
    assert relative_error(masked, logits(small)) <= 1e-5
    assert count(small) == count(model) - masks.num_pruned()
    assert expert_counts(model) == [6, 6] and masks.routing  # the masked model is left as it was

    save_pretrained_compact(small, tmp_path)
    reloaded = getattr(transformers, f"{family}ForCausalLM").from_pretrained(tmp_path).eval()
    key = FAMILIES[family][1]
    assert reloaded.config.to_dict()[key] == 3
    assert reloaded.config.num_experts_per_tok == 2
    assert count(reloaded) == count(small)
    assert torch.equal(logits(reloaded), logits(small))


def test_the_compact_model_trains_with_the_auxiliary_loss_over_its_experts():
    model = build("Mixtral")
    small = compact_experts(model, prune_experts_(model, drop=2, batches=CALIBRATION))
    assert small.num_experts == 4
    out = small(TOKENS, labels=TOKENS, output_router_logits=True)
    assert tuple(out.router_logits[0].shape) == (TOKENS.numel(), 4)
    out.loss.backward()
    assert small.model.layers[0].mlp.gate.weight.grad.shape == (4, 16)


def test_different_counts_per_block_reload_through_load_compact(tmp_path):
    model = build("Mixtral")
    with torch.no_grad():
        weak = model.model.layers[1].mlp
        for param in (weak.gate.weight, weak.experts.gate_up_proj, weak.experts.down_proj):
            param[:3].mul_(1e-3)
    pruner = Pruner(0.25, structure=ExpertStructure(score="weight"), importance="l2")
    masks = pruner.bind(model)
    pruner.prune(0.25)
    small = compact_experts(model, masks).eval()
    assert expert_counts(small) == [6, 3]
    assert not hasattr(small, "num_experts") or small.num_experts == 6  # one count for all blocks cannot be set
    with pytest.raises(
        ValueError, match=r"^The layers have different widths \(\{'experts': \[3, 6\]\}\); a Hugging Face config holds"
    ):
        pretrained_config_widths(small)
    assert relative_error(logits(model), logits(small)) <= 1e-5
    save_compact(small, tmp_path / "small.pt")
    reloaded = load_compact(build("Mixtral", seed=1), tmp_path / "small.pt").eval()
    assert expert_counts(reloaded) == [6, 3]
    assert reloaded.model.layers[1].mlp.gate.num_experts == 3
    assert torch.equal(logits(reloaded), logits(small))


def test_compaction_refuses_other_masks():
    from lightning_prune.structures import HeadStructure

    model = build("Mixtral")
    with pytest.raises(TypeError, match=r"^`masks` must be an ExpertMaskSet \(from ExpertStructure\.bind\), got "):
        compact_experts(model, HeadStructure().bind(model))
    with pytest.raises(ValueError, match=r"^The masks are not this model's: \['model\.layers\.0\.mlp\.gate\.weight'"):
        compact_experts(build("Mixtral"), prune_experts_(model, drop=1))
