"""Weight rewinding for iterative pruning: after each pruning step, surviving weights restart from an earlier epoch.

Frankle & Carbin (2019, "The Lottery Ticket Hypothesis") reset the weights that survive pruning to their initial
values and retrain; Frankle et al. (2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis") rewind to
the values of an early iteration ``k`` instead, which finds such subnetworks in larger models; Renda et al. (2020,
"Comparing Rewinding and Fine-tuning in Neural Network Pruning") compare it with fine-tuning. :func:`snapshot`
keeps a CPU copy of a module's state at the rewind point; :func:`rewind_` loads it back into the module (every
parameter and buffer, so BatchNorm statistics rewind too), applies the masks and clears the optimizers' state
(momentum, Adam's moments and step counts), as a run restarted from that point with a fresh optimizer would.
The learning-rate schedule is not rewound.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.criteria import MagnitudeImportance
    >>> from lightning_prune.masks import MaskSet, prunable_parameters
    >>> from lightning_prune.structures import Unstructured
    >>> net = nn.Sequential(nn.Linear(4, 4))
    >>> early = snapshot(net)
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(3.0)  # training moves the weights
    >>> masks = MaskSet(prunable_parameters(net))
    >>> Unstructured().prune_(masks, MagnitudeImportance(), sparsity=0.5)
    >>> rewind_(net, early, masks)
    >>> kept = masks.masks[0]
    >>> torch.equal(net[0].weight[kept], early["0.weight"][kept]), bool((net[0].weight[~kept] == 0).all())
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from lightning_prune.masks.maskset import MaskSet

__all__ = ["rewind_", "snapshot"]


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of ``module.state_dict()`` (parameters and buffers), to rewind to later."""
    return {name: value.detach().to("cpu", copy=True) for name, value in module.state_dict().items()}


@torch.no_grad()
def rewind_(
    module: nn.Module,
    state: Mapping[str, Tensor],
    masks: MaskSet,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> None:
    """Load ``state`` (from :func:`snapshot`) into ``module`` in place, zero the masked entries and clear the
    optimizers' state.

    Parameters keep their identity (the masks' hooks and the optimizers still point to them).

    Raises:
        ValueError: ``state`` does not fit ``module`` (other names or shapes).
    """
    current = module.state_dict()
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    wrong = [k for k in current if k in state and state[k].shape != current[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"The rewind point does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, other "
            f"shapes {wrong[:5]}. It was stored from another model."
        )
    module.load_state_dict(dict(state), strict=True)
    masks.apply_()
    for optimizer in optimizers:
        optimizer.state.clear()
