"""The block-by-block runner: equal to pruning each block with its true (already pruned) upstream activations,
masks that match the zeros, batch formats, targets, OWL, offloading, progress, errors, and a Hugging Face Llama."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _oneshot_models import TinyTransformer, token_batches
from torch import nn

from lightning_prune.oneshot import OWL, SparseGPT, build_method, prune_one_shot
from lightning_prune.oneshot.base import build_oneshot_structure


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def reference_prune(model, blocks, batches, method, structure, sparsity, call=None):
    """Prune block after block, each from statistics gathered by running the whole model (earlier blocks already
    pruned) on every batch, with a separate statistic per layer: no capture, no propagation, no sharing."""
    call = call or (lambda m, b: m(**model_inputs(b)))
    structure = build_oneshot_structure(structure)
    keeps = {}
    for block in blocks:
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        stats = {n: method.statistic(m.in_features, torch.device("cpu")) for n, m in linears}
        hooks = []
        if method.needs_calibration:
            for n, m in linears:
                hooks.append(
                    m.register_forward_pre_hook(
                        lambda mod, args, s=stats[n]: s.add_(args[0].reshape(-1, mod.in_features))
                    )
                )
        for batch in batches:
            call(model, batch)
        for h in hooks:
            h.remove()
        for n, m in linears:
            keeps[m] = method.prune_(n, m.weight.data, stats[n], structure, sparsity)
    return keeps


LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]

CASES = [
    ("magnitude", "unstructured", 0.6),
    ("wanda", "unstructured", 0.6),
    ("wanda", "4:8", None),
    ("sparsegpt", "unstructured", 0.6),
    ("sparsegpt", "2:4", None),
]


@pytest.mark.parametrize(("method", "structure", "sparsity"), CASES)
def test_runner_equals_pruning_each_block_with_its_true_upstream_activations(method, structure, sparsity):
    batches = token_batches()
    model, ref = TinyTransformer(), TinyTransformer()
    made = (lambda: SparseGPT(blocksize=16)) if method == "sparsegpt" else (lambda: build_method(method))
    masks, report = prune_one_shot(
        model, batches, method=made(), structure=structure, sparsity=sparsity, error_batches=0
    )
    target = 0.5 if sparsity is None else sparsity
    keeps = reference_prune(ref.eval(), ref.blocks, batches, made(), structure, target)
    by_name = dict(ref.named_modules())
    for name, mask in zip(masks.names, masks.masks):
        assert torch.equal(mask, keeps[by_name[name.removesuffix(".weight")]]), name
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert report.samples == (0 if method == "magnitude" else 16)  # magnitude reads no data here
    assert report.blocks == 3 and len(report.layers) == 21


def test_masks_mark_exactly_the_zeros_and_keep_them_during_fine_tuning():
    model, dense = TinyTransformer(), TinyTransformer()
    masks, report = prune_one_shot(model, token_batches(), method="sparsegpt", sparsity=0.55)
    assert masks.names == [f"blocks.{i}.{n}.weight" for i in range(3) for n in LINEARS]
    for name, param, mask in zip(masks.names, masks.params, masks.masks):
        assert torch.equal(param == 0, ~mask), name
        assert int((~mask).sum()) == round(0.55 * mask.numel())
    assert torch.equal(model.head.weight, dense.head.weight) and torch.equal(model.embed.weight, dense.embed.weight)
    assert report.sparsity == pytest.approx(0.55, abs=1e-3)
    assert all(0 < r.error < 1 for r in report.layers)
    assert "blocks.2.down.weight" in report.table()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masks.attach([opt])  # what PruningCallback does during recovery fine-tuning
    batch = token_batches(1)[0]
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p[~m], torch.zeros_like(p[~m])) for p, m in zip(masks.params, masks.masks))


def test_tensor_tuple_and_dict_batches_give_the_same_masks():
    ids = [b["input_ids"] for b in token_batches()]
    results = []
    for batches in (ids, [(x, x) for x in ids], [{"input_ids": x, "labels": x} for x in ids]):
        masks, _ = prune_one_shot(TinyTransformer(), batches, method="wanda", error_batches=0)
        results.append(masks.state_dict())
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_num_samples_truncates_the_last_batch():
    _, report = prune_one_shot(TinyTransformer(), token_batches(), method="wanda", num_samples=6)
    assert report.samples == 6


def test_per_layer_targets_and_ignore():
    model = TinyTransformer()
    masks, _ = prune_one_shot(
        model, token_batches(), method="wanda", sparsity={"*": 0.5, "down": 0.7}, ignore=["blocks.*.q"]
    )
    sparsity = masks.layer_sparsity()
    assert not any(".q." in n for n in sparsity)
    assert (
        sparsity["blocks.1.down.weight"] == round(0.7 * 32 * 64) / (32 * 64) and sparsity["blocks.1.up.weight"] == 0.5
    )
    assert not bool((model.blocks[0].q.weight == 0).any())


def test_owl_keeps_the_total_and_prunes_blocks_with_more_outliers_less():
    model = TinyTransformer(layers=4)
    with torch.no_grad():  # plant outlier weights in blocks 1 and 3, more in 3
        for i, count in ((1, 40), (3, 160)):
            for lin in (model.blocks[i].gate, model.blocks[i].up):
                lin.weight.view(-1)[torch.randperm(lin.weight.numel())[:count]] *= 60.0
    owl = OWL(lam=0.1)
    masks, report = prune_one_shot(model, token_batches(), method="wanda", sparsity=0.7, allocation=owl)
    assert masks.num_pruned() == round(0.7 * masks.numel())
    ratios = owl.ratios()
    per_block = {}
    for r in report.layers:
        per_block.setdefault(r.block, []).append(r.target)
    targets = [sum(v) / len(v) for _, v in sorted(per_block.items())]
    block_ratio = [ratios[f"blocks.{i}.q.weight"] for i in range(4)]
    assert block_ratio[3] > block_ratio[1] > min(block_ratio[0], block_ratio[2])
    assert targets[3] < targets[1] < max(targets[0], targets[2])
    assert max(targets) - min(targets) == pytest.approx(0.2, abs=0.01)


def test_offloading_activations_gives_the_same_result():
    a, b = TinyTransformer(), TinyTransformer()
    ma, _ = prune_one_shot(a, token_batches(), method="sparsegpt", error_batches=0)
    mb, _ = prune_one_shot(b, token_batches(), method="sparsegpt", error_batches=0, offload="blocks", device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(ma.masks, mb.masks))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_progress_is_reported_per_block_and_logged(caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="lightning_prune.oneshot.runner"):
        prune_one_shot(TinyTransformer(), token_batches(), method="wanda", progress=seen.append)
    assert [p.index for p in seen] == [0, 1, 2] and seen[0].name == "blocks.0" and len(seen[0].layers) == 7
    assert "block 3/3 (blocks.2)" in caplog.text


@torch.no_grad()
def test_the_reported_error_is_the_relative_error_on_the_calibration_inputs():
    model, dense = TinyTransformer(), TinyTransformer()
    batches = token_batches()
    _, report = prune_one_shot(model, batches, method="wanda", sparsity=0.5, error_batches=None)
    x = torch.cat([dense.blocks[0].norm1(dense.embed(b["input_ids"])).reshape(-1, 32) for b in batches])
    w, w_pruned, bias = dense.blocks[0].q.weight, model.blocks[0].q.weight, dense.blocks[0].q.bias
    expected = torch.linalg.matrix_norm(x @ (w - w_pruned).t()) / torch.linalg.matrix_norm(x @ w.t() + bias)
    assert report.layers[0].name == "blocks.0.q.weight"
    assert report.layers[0].error == pytest.approx(float(expected), rel=1e-4)


def test_the_error_on_the_first_batch_only_costs_no_pass_over_the_others():
    calls = []
    model = TinyTransformer()
    model.blocks[2].register_forward_pre_hook(lambda m, a: calls.append(1))
    _, report = prune_one_shot(model, token_batches(), method="magnitude")  # error_batches=1: 1 of 4 batches
    assert len(calls) == 1 and all(r.error is not None and r.error > 0 for r in report.layers)


def test_the_model_is_left_in_its_training_mode():
    model = TinyTransformer().train()
    prune_one_shot(model, token_batches(1), method="wanda")
    assert all(m.training for m in model.modules())


# ------------------------------------------------------------------------------------------------ bad input
def test_an_empty_loader_is_refused():
    with pytest.raises(ValueError, match="calibration dataloader yielded no batch"):
        prune_one_shot(TinyTransformer(), [], method="wanda")


def test_batches_of_another_shape_are_refused():
    batches = token_batches(2) + token_batches(1, seq=12)
    with pytest.raises(
        ValueError, match=r"Calibration batch 2 differs from batch 0: .*\(batch, 12\).*one sequence length"
    ):
        prune_one_shot(TinyTransformer(), batches, method="wanda")


def test_a_model_without_repeated_blocks_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"Found no repeated blocks in Sequential.*blocks='model.layers'"):
        prune_one_shot(model, [torch.randn(2, 4)], method="wanda")
    masks, _ = prune_one_shot(model, [torch.randn(8, 4)], method="wanda", blocks=["0", "2"], error_batches=0)
    assert masks.names == ["0.weight", "2.weight"]


def test_nm_on_a_layer_whose_width_is_not_a_multiple_of_m_names_it():
    with pytest.raises(ValueError, match=r"'blocks.0.down.weight' has 36 input features, not a multiple of 8"):
        prune_one_shot(TinyTransformer(ff=36), token_batches(), method="wanda", structure="4:8")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "obs"}, r"Unknown one-shot `method` 'obs'"),
        ({"structure": "channel"}, r"supports structure='unstructured' or an 'N:M'"),
        ({"method": "sparsegpt", "structure": "2:4", "sparsity": 0.6}, r"cannot reach a target of 0\.6"),
        ({"structure": "2:4", "allocation": "owl"}, r"fixes every layer at 0\.5"),
        ({"allocation": "uniformish"}, r"Unknown `allocation` 'uniformish'"),
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\), got 1\.0"),
        ({"num_samples": 0}, r"`num_samples` must be a positive integer"),
        ({"offload": "disk"}, r"`offload` must be"),
        ({"error_batches": -1}, r"`error_batches` must be an integer >= 0"),
        ({"blocks": "trunk"}, r"`blocks`='trunk' names no module"),
        ({"ignore": ["nothing"]}, r"`ignore` pattern 'nothing' matches no module"),
    ],
)
def test_bad_arguments_are_refused_with_the_argument_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_one_shot(TinyTransformer(), token_batches(1), **kwargs)


def test_an_allocation_refuses_a_loader_it_cannot_read_twice():
    with pytest.raises(ValueError, match=r"reads the calibration batches twice.*Pass a list or a DataLoader"):
        prune_one_shot(TinyTransformer(), iter(token_batches(1)), method="wanda", allocation="owl")


def test_blocks_that_do_not_map_hidden_states_to_hidden_states_are_refused():
    class Widen(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Widen(), Widen()])

        def forward(self, x):
            return self.layers[0](x)

    with pytest.raises(
        ValueError, match=r"Block 'layers.0' returned shape \(8, 6\) for hidden states of shape \(8, 4\)"
    ):
        prune_one_shot(Net(), [torch.randn(8, 4)], method="wanda")


# ------------------------------------------------------------------------------------------------ Hugging Face
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_hugging_face_llama_is_pruned_block_by_block(method):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    batches = token_batches(vocab=128)
    for b in batches:  # right padding in one row
        b["attention_mask"][1, -2:] = 0
    masks, report = prune_one_shot(model, batches, method=method, sparsity=0.5, error_batches=0)
    assert report.blocks == 3 and len(masks.names) == 21 and masks.names[0] == "model.layers.0.self_attn.q_proj.weight"
    keeps = reference_prune(ref, ref.model.layers, batches, build_method(method), "unstructured", 0.5)
    by_name = dict(ref.named_modules())
    for name, mask in zip(masks.names, masks.masks):
        assert torch.equal(mask, keeps[by_name[name.removesuffix(".weight")]]), name
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    out = model(**model_inputs(batches[0]))
    assert torch.isfinite(out.logits).all()
