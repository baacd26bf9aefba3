"""Weight-only criteria: the magnitude ``|w|`` and the Lp norms that score groups of weights.

Example:
    >>> import torch
    >>> MagnitudeImportance()("fc.weight", torch.tensor([-3.0, 0.5])).tolist()
    [3.0, 0.5]
    >>> LpNormImportance(p=2)("fc.weight", torch.tensor([-3.0, 0.5])).tolist()
    [9.0, 0.25]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import Tensor

from lightning_prune.criteria.base import Importance

if TYPE_CHECKING:
    pass


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
