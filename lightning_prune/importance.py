"""Importance criteria: a score per prunable entry, higher meaning more important.

An importance is a callable ``importance(name, param) -> scores`` returning a tensor shaped like ``param``
(Torch-Pruning's convention: importance is decoupled from how entries are then selected). A *pointwise*
criterion, whose score of an entry depends only on that entry, also offers :meth:`Importance.transform_`
so that the exact selection can score chunk by chunk without materialising a full copy of the scores.

Example:
    >>> import torch
    >>> MagnitudeImportance()("fc.weight", torch.tensor([-3.0, 0.5])).tolist()
    [3.0, 0.5]
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class Importance(ABC):
    """Base class of importance criteria."""

    #: True when the score of an entry depends only on that entry's value (enables chunked scoring).
    pointwise: bool = False

    @abstractmethod
    def __call__(self, name: str, param: Tensor) -> Tensor:
        """Scores shaped like ``param``; entries with the lowest scores are pruned first."""

    def transform_(self, values: Tensor) -> object:
        """Turn a flat float chunk of parameter values into scores, in place (pointwise criteria only)."""
        raise NotImplementedError(f"{type(self).__name__} is not pointwise")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MagnitudeImportance(Importance):
    """Weight magnitude ``|w|`` (Han et al., 2015, "Learning both Weights and Connections")."""

    pointwise = True

    def __call__(self, name: str, param: Tensor) -> Tensor:
        return param.detach().abs()

    def transform_(self, values: Tensor) -> object:
        return values.abs_()


IMPORTANCES: dict[str, type[Importance]] = {"magnitude": MagnitudeImportance}


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
