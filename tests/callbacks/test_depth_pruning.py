"""DepthPruning in a real Trainer: the least important blocks of a GPT leave the LightningModule before the optimizer
is built, the fit trains the shallower model, a checkpoint resumes into a fresh full-depth module, and bad
arguments are refused with the argument named."""

import lightning.pytorch as pl
import pytest
import torch
from _checks import tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import DepthPruning
from lightning_prune.models import GPT, GPTConfig, LanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")


def module(seed: int = 0, identity: int | None = 2) -> LanguageModel:
    torch.manual_seed(seed)
    net = GPT(GPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48))
    if identity is not None:  # a block that writes nothing to the residual stream: the one to remove
        with torch.no_grad():
            net.layers[identity].self_attn.o_proj.weight.mul_(1e-4)
            net.layers[identity].mlp.down_proj.weight.mul_(1e-4)
    return LanguageModel(net, lr=1e-3)


class Tokens(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, 256, (16, 9), generator=g)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.data[:, :-1], self.data[:, 1:]), batch_size=4)


class OptimizedParameters(Callback):
    def on_train_start(self, trainer, pl_module):
        self.count = sum(p.numel() for group in trainer.optimizers[0].param_groups for p in group["params"])


def test_the_least_important_block_leaves_before_the_optimizer_is_built(tmp_path):
    model, depth, seen = module(), DepthPruning(num_blocks=1, num_samples=8), OptimizedParameters()
    before = [layer.mlp.up_proj.weight.detach().clone() for layer in model.model.layers]
    tiny_trainer(tmp_path, [depth, seen], max_epochs=1).fit(model, datamodule=Tokens())
    assert depth.removed == [2] and depth.scores is not None and depth.scores.tokens == 8 * 8
    assert len(model.model.layers) == model.model.config.num_hidden_layers == 3
    assert seen.count == sum(p.numel() for p in model.parameters())  # the optimizer holds the kept blocks only
    kept = [layer.mlp.up_proj.weight for layer in model.model.layers]
    assert [bool((k - before[i]).abs().max() > 0) for k, i in zip(kept, (0, 1, 3))] == [True] * 3  # trained


def test_a_checkpoint_resumes_into_a_fresh_full_depth_module(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    first, depth = module(), DepthPruning(num_blocks=0.5, num_samples=8)
    tiny_trainer(tmp_path, [depth, checkpoint], max_epochs=1, enable_checkpointing=True).fit(first, datamodule=Tokens())
    assert len(depth.removed) == 2 and 2 in depth.removed
    resumed, again = module(seed=5, identity=None), DepthPruning(num_blocks=0.5, num_samples=8)
    trainer = tiny_trainer(tmp_path, [again], max_epochs=1)
    trainer.fit(resumed, datamodule=Tokens(), ckpt_path=tmp_path / "last.ckpt")  # nothing left to train: restores
    assert again.removed == depth.removed  # the first run's choice, from the checkpoint
    assert len(resumed.model.layers) == 2
    for a, b in zip(first.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_blocks": 0}, r"^DepthPruning: `num_blocks` must be an integer >= 1 \(blocks to remove\) or a fraction"),
        ({"num_blocks": 1.0}, r"^DepthPruning: `num_blocks` must be an integer >= 1"),
        ({"num_blocks": 1, "score": "cos"}, r"^DepthPruning: Unknown block `score` 'cos'; expected one of"),
        ({"num_blocks": 1, "num_samples": None}, r"^DepthPruning: `num_samples=None` reads every calibration batch"),
        ({"num_blocks": 1, "blocks": ["layers"]}, r"^DepthPruning: `blocks` must be the name of the blocks' container"),
    ],
)
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(MisconfigurationException, match=message):
        DepthPruning(**arguments)


def test_bad_fits_are_refused_with_the_model_left_whole(tmp_path):
    model = module()
    with pytest.raises(
        MisconfigurationException,
        match=r"^DepthPruning: `num_blocks`=4 would remove all 4 blocks: at least one must stay\. Use num_blocks <= 3",
    ):
        tiny_trainer(tmp_path, [DepthPruning(num_blocks=4)], max_epochs=1).fit(model, datamodule=Tokens())
    loader = Tokens().train_dataloader()
    with pytest.raises(MisconfigurationException, match=r"^DepthPruning: no `calibration` batches and no datamodule"):
        tiny_trainer(tmp_path, [DepthPruning(num_blocks=1)], max_epochs=1).fit(model, loader)
    with pytest.raises(MisconfigurationException, match=r"^DepthPruning: `blocks`='trunk' names no module of Lang"):
        tiny_trainer(tmp_path, [DepthPruning(num_blocks=1, blocks="trunk")], max_epochs=1).fit(model, loader)
    assert len(model.model.layers) == 4
    depth = DepthPruning(num_blocks=1, calibration=list(loader))  # explicit calibration needs no datamodule
    tiny_trainer(tmp_path, [depth], max_epochs=1).fit(model, loader)
    assert depth.removed == [2] and len(model.model.layers) == 3
