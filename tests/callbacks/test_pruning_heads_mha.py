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
from lightning_prune.criteria import ActivationImportance, APoZImportance
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
