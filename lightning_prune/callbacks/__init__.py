"""Lightning callbacks: thin adapters that map ``Trainer`` hooks to the plain-PyTorch pieces.

* :class:`PruningCallback` (:mod:`~lightning_prune.callbacks.pruning`): gradual pruning on a schedule, driving a
  :class:`~lightning_prune.pruner.Pruner`;
* :class:`DistillationCallback`: distillation from the dense model while pruning and fine-tuning;
* :class:`DepthPruning`: depth pruning, the least important whole blocks removed when fitting starts;
* :class:`OneShotPruning`: one-shot pruning from calibration data (Wanda, SparseGPT, OWL) when fitting starts,
  handing the masks to a :class:`PruningCallback` for recovery fine-tuning;
* :class:`SensitivityCallback`: per-layer targets from a sensitivity analysis when pruning starts;
* :class:`MaskInvariantChecker`: checks pruning's invariants after every step (tests, soak runs);
* :class:`AtomicCheckpointIO` and :class:`RandomStateCheckpoint`: checkpoints that survive a crash and resume
  exactly.

Example:
    >>> pruning = PruningCallback(sparsity=0.9, start_epoch=2, end_epoch=10)
    >>> callbacks = [pruning, MaskInvariantChecker(pruning=pruning)]
"""

from lightning_prune.callbacks.checkpointing import AtomicCheckpointIO, RandomStateCheckpoint
from lightning_prune.callbacks.depth import DepthPruning
from lightning_prune.callbacks.distillation import DistillationCallback
from lightning_prune.callbacks.invariants import InvariantViolation, MaskInvariantChecker
from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.callbacks.pruning import PruningCallback
from lightning_prune.callbacks.sensitivity import SensitivityCallback

__all__ = [
    "AtomicCheckpointIO",
    "DepthPruning",
    "DistillationCallback",
    "InvariantViolation",
    "MaskInvariantChecker",
    "OneShotPruning",
    "PruningCallback",
    "RandomStateCheckpoint",
    "SensitivityCallback",
]
