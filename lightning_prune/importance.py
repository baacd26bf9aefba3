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
from collections.abc import Callable
from typing import Literal

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


class LpNormImportance(Importance):
    """``|w|^p``: with ``p=1`` the magnitude, with ``p=2`` its square (the same ranking of single weights).

    Structures that prune groups of weights score a group by its Lp norm, ``(sum |w|^p)^(1/p)``: the L1 or
    L2 norm of a filter (Li et al., 2017, "Pruning Filters for Efficient ConvNets").

    Args:
        p: 1 or 2.

    Example:
        >>> import torch
        >>> LpNormImportance(p=2)("fc.weight", torch.tensor([-3.0, 0.5])).tolist()
        [9.0, 0.25]
    """

    pointwise = True

    def __init__(self, p: Literal[1, 2] = 1) -> None:
        if p not in (1, 2):
            raise ValueError(f"`p` must be 1 or 2, got {p!r}.")
        self.p = p

    def __call__(self, name: str, param: Tensor) -> Tensor:
        return param.detach().abs() if self.p == 1 else param.detach().square()

    def transform_(self, values: Tensor) -> object:
        return values.abs_() if self.p == 1 else values.square_()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class MagnitudeImportance(LpNormImportance):
    """Weight magnitude ``|w|`` (Han et al., 2015, "Learning both Weights and Connections"); for channels,
    the L1 norm."""

    def __init__(self) -> None:
        super().__init__(p=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


IMPORTANCES: dict[str, Callable[[], Importance]] = {
    "magnitude": MagnitudeImportance,
    "l1": lambda: LpNormImportance(p=1),
    "l2": lambda: LpNormImportance(p=2),
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
