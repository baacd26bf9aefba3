"""One-shot pruning from calibration data, in plain PyTorch: magnitude, Wanda and SparseGPT, unstructured or
N:M, with OWL's non-uniform layer sparsity, block by block in bounded memory, and across processes.

The methods and allocations are small objects behind one interface each
(:class:`~lightning_prune.oneshot.base.OneShotMethod`, :class:`~lightning_prune.oneshot.base.Allocation`),
registered by name in :mod:`~lightning_prune.oneshot.registry`; :func:`prune_one_shot` runs them over a model's
repeated blocks. For depth pruning, :func:`score_blocks` measures each block's importance over calibration data
(:mod:`~lightning_prune.oneshot.depth`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
    ...     def forward(self, x):
    ...         return x + self.down(torch.relu(self.up(x)))
    >>> model = nn.Sequential(nn.Embedding(50, 8), nn.ModuleList([Block() for _ in range(3)]))
    >>> model.forward = lambda ids: [b := model[0](ids)] and [b := blk(b) for blk in model[1]][-1]
    >>> data = [torch.randint(0, 50, (4, 16)) for _ in range(4)]
    >>> masks, report = prune_one_shot(model, data, method="sparsegpt", structure="2:4")
    >>> sorted(set(masks.layer_sparsity().values())), report.samples
    ([0.5], 16)
    >>> sorted(METHODS), sorted(ALLOCATIONS)
    (['magnitude', 'sparsegpt', 'wanda'], ['owl'])
"""

from __future__ import annotations

from lightning_prune.oneshot.base import Allocation, OneShotMethod, OneShotStructure
from lightning_prune.oneshot.blocks import call_model, find_blocks
from lightning_prune.oneshot.depth import BlockScores, score_blocks
from lightning_prune.oneshot.layers import LinearAdapter, LinearMap
from lightning_prune.oneshot.magnitude import Magnitude
from lightning_prune.oneshot.owl import OWL
from lightning_prune.oneshot.registry import ALLOCATIONS, LAYER_TYPES, METHODS, build_allocation, build_method
from lightning_prune.oneshot.report import BlockProgress, LayerReport, OneShotReport
from lightning_prune.oneshot.runner import prune_one_shot
from lightning_prune.oneshot.sparsegpt import SparseGPT
from lightning_prune.oneshot.statistics import ColumnSquares, InputCovariance, Statistic
from lightning_prune.oneshot.wanda import Wanda

__all__ = [
    "ALLOCATIONS",
    "LAYER_TYPES",
    "METHODS",
    "OWL",
    "Allocation",
    "BlockProgress",
    "BlockScores",
    "ColumnSquares",
    "InputCovariance",
    "LayerReport",
    "LinearAdapter",
    "LinearMap",
    "Magnitude",
    "OneShotMethod",
    "OneShotReport",
    "OneShotStructure",
    "SparseGPT",
    "Statistic",
    "Wanda",
    "build_allocation",
    "build_method",
    "call_model",
    "find_blocks",
    "prune_one_shot",
    "score_blocks",
]
