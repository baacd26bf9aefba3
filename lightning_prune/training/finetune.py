"""Fine-tuning after pruning at a lower learning rate: scaling every rate an optimizer and its schedulers hold.

Han et al. (2015, "Learning both Weights and Connections for Efficient Neural Networks") retrained the pruned
network at a tenth of the original rate. Scaling only ``optimizer.param_groups[i]["lr"]`` is not enough when a
learning-rate scheduler runs: it recomputes the rate from its base rates at the next step and undoes the change.
:func:`scale_learning_rates` scales both.

Example:
    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    >>> scale_learning_rates([opt], [sched], 0.1)
    >>> round(opt.param_groups[0]["lr"], 6), [round(lr, 6) for lr in sched.base_lrs]
    (0.01, [0.01])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_prune._helpers import is_number

#: Per-group keys holding a learning rate that schedulers read back: torch schedulers' ``initial_lr`` (their
#: ``base_lrs`` on construction), and ``OneCycleLR``'s ``max_lr`` and ``min_lr``.
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


#: Scheduler attributes holding per-group learning rates: ``base_lrs`` (every LRScheduler), ``max_lrs``
#: (CyclicLR) and ``_last_lr`` (what ``get_last_lr()`` and LearningRateMonitor report).
_SCHEDULER_LR_ATTRS = ("base_lrs", "max_lrs", "_last_lr")


def scale_learning_rates(optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any], scale: float) -> None:
    """Multiply every optimizer group's learning rate by ``scale``, and the base rates that ``schedulers`` (and the
    schedulers they chain, e.g. in ``SequentialLR``) compute their rates from, so that they keep the new scale."""

    def scaled(value: Any) -> Any:
        # Out of place: a scheduler's `_last_lr` may hold the very tensor that is a group's `lr`.
        return value * scale if is_number(value) or isinstance(value, torch.Tensor) else value

    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for key in _GROUP_LR_KEYS:
                if key in group:
                    group[key] = scaled(group[key])
    seen: set[int] = set()
    stack = list(schedulers)
    while stack:
        scheduler = stack.pop()
        if id(scheduler) in seen:
            continue
        seen.add(id(scheduler))
        for attr in _SCHEDULER_LR_ATTRS:
            values = getattr(scheduler, attr, None)
            if isinstance(values, list):
                setattr(scheduler, attr, [scaled(v) for v in values])
        stack.extend(getattr(scheduler, "_schedulers", None) or [])
