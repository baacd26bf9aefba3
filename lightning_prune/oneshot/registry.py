"""The one-shot methods, allocations and layer types by name, and the functions that resolve them.

Example:
    >>> sorted(METHODS), sorted(ALLOCATIONS)
    (['magnitude', 'sparsegpt', 'wanda'], ['owl'])
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_prune.oneshot.base import Allocation, OneShotMethod
from lightning_prune.oneshot.layers import LinearAdapter, LinearMap
from lightning_prune.oneshot.magnitude import Magnitude
from lightning_prune.oneshot.owl import OWL
from lightning_prune.oneshot.sparsegpt import SparseGPT
from lightning_prune.oneshot.wanda import Wanda

#: One-shot methods by name (each built with its defaults).
METHODS: dict[str, Callable[[], OneShotMethod]] = {
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
}

#: Non-uniform layer-sparsity allocations by name.
ALLOCATIONS: dict[str, Callable[[], Allocation]] = {"owl": OWL}

#: Layer types pruned by default, with the adapter that reads their weight matrix and inputs.
LAYER_TYPES: dict[type[nn.Module], LinearMap] = {nn.Linear: LinearAdapter()}


def build_method(method: str | OneShotMethod) -> OneShotMethod:
    """Resolve a method given by name or as an object.

    Example:
        >>> build_method("sparsegpt")
        SparseGPT(blocksize=128, damping=0.01, dtype=torch.float32)
    """
    if isinstance(method, OneShotMethod):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]()
    raise ValueError(f"Unknown one-shot `method` {method!r}; expected one of {sorted(METHODS)} or a OneShotMethod.")


def build_allocation(allocation: str | Allocation | None) -> Allocation | None:
    """Resolve an allocation given by name, as an object, or None (uniform).

    Example:
        >>> build_allocation("owl")
        OWL(m=5.0, lam=0.08, granularity='block')
    """
    if allocation is None or isinstance(allocation, Allocation):
        return allocation
    if isinstance(allocation, str) and allocation in ALLOCATIONS:
        return ALLOCATIONS[allocation]()
    raise ValueError(
        f"Unknown `allocation` {allocation!r}; expected None (uniform), one of {sorted(ALLOCATIONS)}, or an "
        "Allocation object."
    )
