"""``prune_one_shot(..., sequential=True)``: each block runs once on all calibration samples, each layer pruned
when the inputs reach it. Equal to pruning layer after layer, each from the outputs of the layers already pruned;
equal to the default on blocks of a single layer; exact masks and counts; N:M, OWL and bad input; and the masks
packed one bit per weight while pruning, in both modes."""

from __future__ import annotations

import pytest
import torch
from _oneshot_models import TinyTransformer, token_batches
from torch import nn

from lightning_prune.oneshot import OWL, SparseGPT, build_method, prune_one_shot
from lightning_prune.oneshot.base import build_oneshot_structure


def _method(name: str):
    return SparseGPT(blocksize=16, dtype=torch.float64) if name == "sparsegpt" else build_method(name)


@torch.no_grad()
def sequential_reference(model, blocks, batches, method, structure, sparsity):
    """Prune the linear layers one at a time in the order the model calls them, each from a statistic gathered
    by running the whole model (the layers before it already pruned) on every batch."""
    structure = build_oneshot_structure(structure)
    keeps = {}
    for block in blocks:
        for name, layer in [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]:
            stat = method.statistic(layer.in_features, torch.device("cpu"))
            hook = None
            if stat is not None:
                hook = layer.register_forward_pre_hook(
                    lambda mod, args, s=stat: s.add_(args[0].reshape(-1, mod.in_features))
                )
            for batch in batches:
                model(batch["input_ids"], attention_mask=batch["attention_mask"])
            if hook is not None:
                hook.remove()
            keeps[layer] = method.prune_(name, layer.weight.data, stat, structure, sparsity)
    return keeps


CASES = [
    ("wanda", "unstructured", 0.6),
    ("wanda", "2:4", None),
    ("sparsegpt", "unstructured", 0.6),
    ("sparsegpt", "4:8", None),
]


@pytest.mark.parametrize(("method", "structure", "sparsity"), CASES)
def test_sequential_equals_pruning_each_layer_after_the_ones_before_it(method, structure, sparsity):
    batches = token_batches()
    model, ref = TinyTransformer(), TinyTransformer()
    masks, report = prune_one_shot(
        model, batches, method=_method(method), structure=structure, sparsity=sparsity, sequential=True
    )
    target = 0.5 if sparsity is None else sparsity
    keeps = sequential_reference(ref.eval(), ref.blocks, batches, _method(method), structure, target)
    by_name = dict(ref.named_modules())
    for name, mask in zip(masks.names, masks.masks):
        assert torch.equal(mask, keeps[by_name[name.removesuffix(".weight")]]), name
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert report.samples == 16 and len(report.layers) == 21
    assert all(r.error is not None and 0 < r.error < 1 for r in report.layers)


def test_sequential_differs_from_the_default_where_a_layer_follows_a_pruned_one():
    batches = token_batches()
    a, b = TinyTransformer(), TinyTransformer()
    two_pass, _ = prune_one_shot(a, batches, method="wanda", error_batches=0)
    one_pass, _ = prune_one_shot(b, batches, method="wanda", error_batches=0, sequential=True)
    same = {n: torch.equal(x, y) for n, x, y in zip(two_pass.names, two_pass.masks, one_pass.masks)}
    assert same["blocks.0.q.weight"] and same["blocks.0.k.weight"] and same["blocks.0.v.weight"]  # dense inputs
    assert not same["blocks.0.o.weight"]  # its input comes from the pruned q, k and v


class OneLinear(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class OneLinearNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Linear(6, 16)
            self.blocks = nn.ModuleList([OneLinear(16) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sequential_equals_the_default_on_blocks_of_one_layer(method, structure):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 5, 6, generator=g) for n in (4, 3, 4)]
    a, b = OneLinearNet(), OneLinearNet()
    sparsity = 0.6 if structure == "unstructured" else None
    ma, ra = prune_one_shot(a, batches, method=_method(method), structure=structure, sparsity=sparsity)
    mb, rb = prune_one_shot(b, batches, method=_method(method), structure=structure, sparsity=sparsity, sequential=True)
    assert ma.names == mb.names == [f"blocks.{i}.fc.weight" for i in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(ma.masks, mb.masks))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # both measure the error on the first batch's 4 samples
    assert [r.error for r in ra.layers] == pytest.approx([r.error for r in rb.layers], rel=1e-5)
    assert [r.sparsity for r in ra.layers] == [r.sparsity for r in rb.layers]


@pytest.mark.parametrize("sequential", [False, True])
def test_masks_mark_the_pruned_entries_not_the_weights_that_were_zero_before(sequential):
    model = TinyTransformer()
    zeroed = {}
    with torch.no_grad():
        for name, module in model.blocks.named_modules():
            if isinstance(module, nn.Linear):
                g = torch.Generator().manual_seed(len(zeroed))
                hit = torch.rand(module.weight.shape, generator=g) < 0.3
                module.weight[hit] = 0.0
                zeroed[f"blocks.{name}.weight"] = hit
    masks, report = prune_one_shot(model, token_batches(), method="wanda", sparsity=0.2, sequential=sequential)
    for name, param, mask in zip(masks.names, masks.params, masks.masks):
        assert int((~mask).sum()) == round(0.2 * mask.numel()), name  # exactly the method's count
        assert torch.equal(param == 0, zeroed[name] | ~mask), name  # the zeros: those before, and the pruned
        assert bool(mask[zeroed[name]].any())  # zeros the method did not prune are not marked
    assert report.sparsity == pytest.approx(0.2, abs=1e-3)


def test_sequential_nm_prunes_n_of_every_m():
    model = TinyTransformer()
    masks, _ = prune_one_shot(model, token_batches(), method="sparsegpt", structure="4:8", sequential=True)
    for name, param, mask in zip(masks.names, masks.params, masks.masks):
        assert bool(((~mask).view(mask.shape[0], -1, 8).sum(-1) == 4).all()), name
        assert torch.equal(param == 0, ~mask), name


def test_sequential_owl_keeps_each_layers_target_and_the_total():
    model = TinyTransformer(layers=4)
    masks, report = prune_one_shot(
        model, token_batches(), method="wanda", sparsity=0.7, allocation=OWL(lam=0.1), sequential=True
    )
    assert masks.num_pruned() == round(0.7 * masks.numel())
    for r, mask in zip(report.layers, masks.masks):
        assert int((~mask).sum()) == round(r.target * mask.numel()), r.name
    assert len({round(r.target, 6) for r in report.layers}) > 1


class SeqFirst(nn.Module):
    """Runs its blocks on (sequence, batch, features) hidden states."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([OneLinear(6) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)
        for block in self.blocks:
            x = block(x)
        return x


def test_sequential_refuses_hidden_states_without_the_batch_first():
    batches = [torch.randn(2, 5, 6), torch.randn(2, 5, 6)]
    with pytest.raises(ValueError) as error:
        prune_one_shot(SeqFirst(), batches, method="wanda", sequential=True)
    assert str(error.value) == (
        "sequential=True runs block 'blocks.0' once on all calibration samples, concatenated along the first "
        "dimension, but its hidden states have shape (5, 2, 6) for a batch of 2 samples. Pass sequential=False "
        "to run the block batch by batch."
    )
    prune_one_shot(SeqFirst(), batches, method="wanda")  # the default runs batch by batch


class WithScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([ScaledBlock() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.detach().abs().amax(dim=(0, 1))  # (features,): differs from batch to batch
        for block in self.blocks:
            x = block(x, scale)
        return x


class ScaledBlock(OneLinear):
    def __init__(self) -> None:
        super().__init__(6)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x if scale is None else x / scale)


def test_sequential_refuses_an_argument_that_differs_between_batches_without_a_batch_dimension():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 6, generator=g), torch.randn(3, 5, 6, generator=g)]
    with pytest.raises(ValueError) as error:
        prune_one_shot(WithScale(), batches, method="wanda", sequential=True)
    assert str(error.value) == (
        "sequential=True concatenates the calibration batches, but block 'blocks.0' received a tensor of shape "
        "(6,) that neither leads with the batch's sample count nor is the same in every batch. Pass "
        "sequential=False to run the block batch by batch."
    )


def test_sequential_must_be_a_bool():
    with pytest.raises(TypeError, match=r"^`sequential` must be True or False, got 'yes'\.$"):
        prune_one_shot(TinyTransformer(), token_batches(), sequential="yes")  # type: ignore[arg-type]


def test_sequential_runs_each_block_once():
    calls = []
    model = TinyTransformer()
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[0] if a else None), with_kwargs=True)
    prune_one_shot(model, token_batches(), method="wanda", sequential=True, error_batches=None)
    # the capture stops each batch at block 0 (4 x 4 samples), then each block runs once on the 16 samples
    assert calls == [4, 4, 4, 4, 16, 16, 16]


@pytest.mark.parametrize("chunk", [8, 24])
def test_masks_held_packed_in_many_chunks_come_back_exact(chunk, monkeypatch):
    import lightning_prune.oneshot._bits as bits

    monkeypatch.setattr(bits, "_CHUNK", chunk)  # chunks that split the rows of every layer
    model = TinyTransformer()
    masks, _ = prune_one_shot(model, token_batches(), method="wanda", sparsity=0.37, error_batches=0)
    for name, param, mask in zip(masks.names, masks.params, masks.masks):
        assert torch.equal(param == 0, ~mask), name
        assert int((~mask).sum()) == round(0.37 * mask.numel()), name
