"""PruningCallback on attention: every matrix weight of an ``nn.TransformerEncoderLayer`` (its in-projection
included) reaches the target, stays zero through training, and resumes exactly from a checkpoint."""

import lightning.pytorch as pl
import pytest
import torch
from _checks import ZeroChecker, tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import PruningCallback

pytestmark = pytest.mark.usefixtures("one_thread")


class Encoder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        with torch.no_grad():
            for p in self.layer.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.layer(x) - x.flip(1)).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)


def sequences(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 5, 16, generator=g)), batch_size=8)


def matrices(model: Encoder) -> list[torch.Tensor]:
    return [p for p in model.layer.parameters() if p.dim() == 2]


def test_transformer_layer_reaches_the_target_over_all_matrix_weights(tmp_path):
    pruning = PruningCallback(sparsity=0.9, schedule="linear", start_epoch=0, end_epoch=1)
    checker = ZeroChecker(pruning)
    model = Encoder()
    tiny_trainer(tmp_path, [pruning, checker], max_epochs=3).fit(model, sequences())
    weights = matrices(model)
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * total)
    assert pruning.layer_sparsity()["layer.self_attn.in_proj_weight"] > 0.5
    assert checker.checked > 0
    assert "layer.self_attn.in_proj_weight" in pruning.pruner.summary()


def test_transformer_layer_resumes_exactly(tmp_path):
    def callback():
        return PruningCallback(sparsity=0.9, schedule="cubic", start_epoch=1, end_epoch=3)

    full, full_cb = Encoder(), callback()
    tiny_trainer(tmp_path / "a", [full_cb], max_epochs=4).fit(full, sequences())

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tiny_trainer(tmp_path / "b", [callback(), ckpt], max_epochs=2, enable_checkpointing=True).fit(
        Encoder(), sequences()
    )
    resumed, resumed_cb = Encoder(), callback()
    seen: list[float] = []

    class FirstBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not seen:
                seen.append(resumed_cb.achieved_sparsity)

    tiny_trainer(tmp_path / "c", [resumed_cb, FirstBatch()], max_epochs=4).fit(
        resumed, sequences(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert seen[0] > 0.0, "masks were dropped on resume"
    assert resumed_cb.masks.names == full_cb.masks.names
    for a, b in zip(full_cb.masks.masks, resumed_cb.masks.masks):
        assert torch.equal(a, b)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
