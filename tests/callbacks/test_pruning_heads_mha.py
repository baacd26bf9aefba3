"""Heads of ``nn.MultiheadAttention`` scored from data: activation criteria measure a head's output (which
``nn.MultiheadAttention`` computes without calling ``out_proj``), Taylor and Fisher its weights' gradients; a real
``Trainer`` fit prunes whole heads and the compact model equals the masked one."""

import lightning.pytorch as pl
import pytest
import torch
from _checks import ZeroChecker, tiny_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import PruningCallback
from lightning_prune.criteria import ActivationImportance, APoZImportance, build_importance
from lightning_prune.deploy import CompactMultiheadAttention
from lightning_prune.deploy.transformer import compact_heads
from lightning_prune.structures import HeadStructure

pytestmark = pytest.mark.usefixtures("one_thread")


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]


@pytest.mark.parametrize("criterion", [ActivationImportance, APoZImportance])
def test_activation_criteria_score_a_head_by_its_output(criterion):
    # q and k zero: every query attends uniformly; v = its bias, so head h outputs the constant values[h]
    model = SelfAttention()
    values = torch.tensor([0.5, -2.0, 0.0, 1.0])
    with torch.no_grad():
        model.attn.in_proj_weight.zero_()
        model.attn.in_proj_bias.zero_()
        model.attn.in_proj_bias[16:].copy_(values.repeat_interleave(2))
    masks = HeadStructure(units="heads").bind(model)
    importance = criterion(batches=1)
    importance.start(model, masks)
    padding = torch.tensor([[False, False, True], [False, False, False]])
    model(torch.randn(2, 3, 8), padding)
    assert importance.observe(masks)
    importance.stop()
    assert importance.readers == {"attn": ["attn"]}
    scores = importance.channel_scores(masks, masks.groups[0])
    expected = values.abs() if criterion is ActivationImportance else (values != 0).double()
    assert torch.allclose(scores, expected.double(), atol=1e-6)


class Encoder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.model = nn.TransformerEncoder(layer, num_layers=2)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.model(x) - x.flip(1)).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("importance", ["activation", "taylor", "fisher"])
def test_fit_prunes_whole_heads_and_the_compact_model_equals_the_masked_one(tmp_path, importance):
    pruning = PruningCallback(
        sparsity=0.5,
        structure=HeadStructure(units="heads"),
        importance=importance,
        scope="layer",
        start_epoch=1,
        end_epoch=2,
    )
    checker = ZeroChecker(pruning)
    module = Encoder()
    data = DataLoader(TensorDataset(torch.randn(24, 5, 16, generator=torch.Generator().manual_seed(1))), batch_size=8)
    tiny_trainer(tmp_path, [pruning, checker], max_epochs=3).fit(module, data)
    assert checker.checked > 0
    assert pruning.layer_sparsity() == {"model.layers.0.self_attn": 0.5, "model.layers.1.self_attn": 0.5}
    for layer in module.model.layers:
        attention = layer.self_attn
        dead = [h for h in range(4) if bool((attention.out_proj.weight[:, 4 * h : 4 * h + 4] == 0).all())]
        assert len(dead) == 2
        rows = [r + 4 * h for h in dead for r in range(4)]
        for third in attention.in_proj_weight.chunk(3):
            assert bool((third[rows] == 0).all())
    model = module.model.eval()
    small = compact_heads(model, pruning.masks)
    assert all(isinstance(layer.self_attn, CompactMultiheadAttention) for layer in small.layers)
    assert [layer.self_attn.num_heads for layer in small.layers] == [2, 2]
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(x), small(x)
    assert float((a - b).norm() / a.norm()) <= 1e-5


def test_gpt2_heads_and_neurons_are_measured_where_their_conv1d_projections_read_them():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=4, n_positions=8, vocab_size=20))
    masks = HeadStructure().bind(model)
    importance = ActivationImportance(batches=1)
    importance.start(model, masks)
    model(torch.randint(0, 20, (2, 6)))
    assert importance.observe(masks)
    assert importance.readers == {"h.0.attn": ["h.0.attn.c_proj"], "h.0.mlp": ["h.0.mlp.c_proj"]}
    assert [tuple(importance.channel_scores(masks, g).shape) for g in masks.groups] == [(4,), (32,)]


def test_a_compact_attention_prunes_and_compacts_again():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()
    structure = HeadStructure(units="heads")
    importance = build_importance("l2")
    first = structure.bind(model)
    structure.prune_(first, importance, 0.25, scope="layer")
    small = compact_heads(model, first)
    second = structure.bind(small)
    assert [g.channels for g in second.groups] == [3]
    structure.prune_(second, importance, 1 / 3, scope="layer")
    smaller = compact_heads(small, second)
    attention = smaller.layers[0].self_attn
    assert (attention.num_heads, attention.source_num_heads, len(attention.heads)) == (2, 4, 2)
    assert set(attention.heads) < set(small.layers[0].self_attn.heads)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = small(x), smaller(x)
    assert float((a - b).norm() / a.norm()) <= 1e-5
