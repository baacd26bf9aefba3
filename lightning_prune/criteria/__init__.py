"""Importance criteria: a score per prunable entry (or channel), higher meaning more important.

The base class and the statistics protocol are in :mod:`~lightning_prune.criteria.base`; the criteria are
``magnitude``, ``l1`` and ``l2`` (:mod:`~lightning_prune.criteria.magnitude`), ``taylor`` and ``fisher`` from
gradients (:mod:`~lightning_prune.criteria.gradient`), ``apoz`` and ``activation`` from activations
(:mod:`~lightning_prune.criteria.activation`). :data:`IMPORTANCES` maps each name to a factory.

Example:
    >>> sorted(IMPORTANCES)
    ['activation', 'apoz', 'fisher', 'l1', 'l2', 'magnitude', 'taylor']
    >>> build_importance("taylor"), build_importance("magnitude").collects
    (TaylorImportance(batches=16), 'nothing')
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_prune.criteria.activation import ActivationImportance, ActivationStatistics, APoZImportance
from lightning_prune.criteria.base import STATE_VERSION, AllReduce, Collects, Importance, StatisticsImportance
from lightning_prune.criteria.gradient import FisherImportance, GradientImportance, TaylorImportance
from lightning_prune.criteria.magnitude import LpNormImportance, MagnitudeImportance

__all__ = [
    "IMPORTANCES",
    "STATE_VERSION",
    "APoZImportance",
    "ActivationImportance",
    "ActivationStatistics",
    "AllReduce",
    "Collects",
    "FisherImportance",
    "GradientImportance",
    "Importance",
    "LpNormImportance",
    "MagnitudeImportance",
    "StatisticsImportance",
    "TaylorImportance",
    "build_importance",
]

#: The criteria by name: each value builds the criterion with its default options.
IMPORTANCES: dict[str, Callable[[], Importance]] = {
    "magnitude": MagnitudeImportance,
    "l1": lambda: LpNormImportance(p=1),
    "l2": lambda: LpNormImportance(p=2),
    "taylor": TaylorImportance,
    "fisher": FisherImportance,
    "apoz": APoZImportance,
    "activation": ActivationImportance,
}


def build_importance(importance: str | Importance) -> Importance:
    """Resolve an importance given by name or as an object.

    Example:
        >>> build_importance("magnitude")
        MagnitudeImportance()
    """
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str) and importance in IMPORTANCES:
        return IMPORTANCES[importance]()
    raise ValueError(
        f"Unknown importance {importance!r}; expected one of {sorted(IMPORTANCES)} or an Importance object."
    )
