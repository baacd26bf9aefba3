"""Checks and constants shared by the tests."""

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from lightning_prune import PruningCallback

#: The repository's root (``tests/`` holds one folder per subpackage, so no test finds it relative to itself).
ROOT = Path(__file__).resolve().parents[1]
#: The Hydra configs.
CONF = ROOT / "conf"


class ZeroChecker(Callback):
    """After every batch (so after every optimizer step) masked entries and their optimizer state must be exactly
    zero; subclasses add checks in :meth:`check`."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.pruning.masks
        if masks is None or masks.num_pruned() == 0:
            return
        opt = trainer.optimizers[0]
        for name, p, m in zip(masks.names, masks.params, masks.masks):
            assert bool((p[~m] == 0).all()), f"a pruned entry of {name} moved"
            for value in opt.state[p].values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert bool((value[~m] == 0).all()), f"optimizer state of a pruned entry of {name} is not zero"
        self.check(pl_module, masks)
        self.checked += 1

    def check(self, pl_module, masks) -> None:
        """Further checks after every batch (none here)."""
