"""Structures: how scores and a target sparsity become masks.

A structure decides *what* is removed together: single weights (``unstructured``) now; channels, blocks and
N:M patterns plug in through the same :meth:`Structure.prune_` without changing the callback.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.importance import MagnitudeImportance
    >>> from lightning_prune.masking import MaskSet, prunable_parameters, sparsity_table
    >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    >>> masks = MaskSet(prunable_parameters(net))
    >>> Unstructured().prune_(masks, MagnitudeImportance(), sparsity=0.3, scope="layer")
    >>> masks.layer_sparsity()
    {'0.weight': 0.3, '1.weight': 0.3}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_prune.importance import Importance
from lightning_prune.masking import MaskSet, prunable_parameters, sparsity_table
from lightning_prune.selection import prune_lowest_

Scope = Literal["global", "layer"]
SCOPES: tuple[str, ...] = ("global", "layer")


def check_scope(scope: object) -> None:
    if scope not in SCOPES:
        raise ValueError(f"Unknown scope {scope!r}; expected one of {list(SCOPES)}.")


def check_sparsity(sparsity: object, name: str = "sparsity") -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {sparsity!r}.")


class Structure(ABC):
    """Base class: grows a :class:`MaskSet` to a target sparsity."""

    name: str = ""
    #: True when :meth:`bind` needs example inputs to trace the model.
    needs_example_inputs: bool = False

    def bind(self, module: nn.Module, ignore: Sequence[str] = (), example_inputs: Any = None) -> MaskSet:
        """The masks this structure prunes in ``module``: by default, the weight of every Linear and Conv
        layer outside ``ignore``."""
        return MaskSet(prunable_parameters(module, ignore))

    def sparsity(self, masks: MaskSet) -> float:
        """The quantity the target sparsity controls; by default the fraction of masked entries."""
        return masks.sparsity()

    def layer_sparsity(self, masks: MaskSet) -> dict[str, float]:
        """:meth:`sparsity` per layer (per masked tensor by default)."""
        return masks.layer_sparsity()

    def check_importance(self, importance: Importance) -> None:
        """Raise ``ValueError`` when this structure cannot use ``importance`` (every one works by default)."""
        return None

    def check_target(self, masks: MaskSet, sparsity: float, scope: Scope = "global") -> None:
        """Raise ``ValueError`` when ``sparsity`` cannot be reached on ``masks`` (any can by default)."""
        return None

    def summary(self, masks: MaskSet) -> str:
        """A plain-text table of what was pruned, printed at the end of fitting."""
        return sparsity_table(masks)

    @abstractmethod
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: float, scope: Scope = "global") -> None:
        """Grow ``masks`` so that ``sparsity`` of the entries are pruned; never revive a pruned entry."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Unstructured(Structure):
    """Prune individual weights: exactly ``round(sparsity * N)`` zeros.

    ``N`` counts every masked entry (``scope="global"``: one threshold across layers) or each tensor's own
    (``scope="layer"``). The lowest-scored kept entries go first, ties to the earliest (tensor order, then flat
    index). A target below the current sparsity changes nothing.
    """

    name = "unstructured"

    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: float, scope: Scope = "global") -> None:
        check_sparsity(sparsity)
        check_scope(scope)
        indices = list(range(len(masks.params)))
        groups = [indices] if scope == "global" else [[i] for i in indices]
        for group in groups:
            total = sum(masks.masks[i].numel() for i in group)
            pruned = sum(masks.masks[i].numel() - int(torch.count_nonzero(masks.masks[i])) for i in group)
            k = round(sparsity * total) - pruned
            if k <= 0:
                continue
            if importance.pointwise:
                scores = [masks.params[i].detach() for i in group]
                transform = importance.transform_
            else:
                scores = [_scores(importance, masks, i) for i in group]
                transform = None
            prune_lowest_(
                [s.contiguous() for s in scores],
                [masks.masks[i] for i in group],
                k,
                transform=transform,
                names=[masks.names[i] for i in group],
            )
        masks.apply_()


def _scores(importance: Importance, masks: MaskSet, i: int) -> torch.Tensor:
    name, param = masks.names[i], masks.params[i]
    scores = importance(name, param)
    if scores.shape != param.shape:
        raise ValueError(
            f"{importance!r} returned scores of shape {tuple(scores.shape)} for {name!r}, "
            f"whose shape is {tuple(param.shape)}."
        )
    return scores


def _channel() -> Structure:
    from lightning_prune.structured import ChannelStructure  # imports Torch-Pruning only when used

    return ChannelStructure()


STRUCTURES: dict[str, Callable[[], Structure]] = {"unstructured": Unstructured, "channel": _channel}


def build_structure(structure: str | Structure) -> Structure:
    """Resolve a structure given by name or as an object.

    Example:
        >>> build_structure("unstructured")
        Unstructured()
    """
    if isinstance(structure, Structure):
        return structure
    if isinstance(structure, str) and structure in STRUCTURES:
        return STRUCTURES[structure]()
    raise ValueError(f"Unknown structure {structure!r}; expected one of {sorted(STRUCTURES)} or a Structure object.")
