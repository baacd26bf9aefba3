"""The interface of one-shot pruning methods: prune one layer's weight matrix from its calibration statistic.

A :class:`OneShotMethod` says which :class:`~lightning_prune.oneshot.statistics.Statistic` of a layer's inputs
it needs (none for magnitude), checks that it can reach a layer's target, and prunes the layer: it returns the
keep-mask and leaves the pruned entries of the weight exactly zero (SparseGPT also updates the kept ones). The
runner (:func:`~lightning_prune.oneshot.prune_one_shot`) collects the statistics block by block and calls it.

A target is one of two *structures* of the package, the same objects the training-time pruner uses:
:class:`~lightning_prune.structures.Unstructured` (exactly ``round(sparsity * numel)`` zeros per layer) or
:class:`~lightning_prune.structures.NMStructure` (exactly ``n`` zeros in every ``m`` consecutive input weights of
each row: ``sparsity`` is then ``n / m``, or 0 for a layer left dense).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from lightning_prune.oneshot.statistics import Statistic
from lightning_prune.structures import Unstructured, build_structure
from lightning_prune.structures.nm import NMStructure

__all__ = ["Allocation", "OneShotMethod", "OneShotStructure", "build_oneshot_structure", "check_layer_target"]

#: The structures one-shot pruning supports.
OneShotStructure = Unstructured | NMStructure


def build_oneshot_structure(structure: str | OneShotStructure) -> OneShotStructure:
    """Resolve ``"unstructured"``, an ``"N:M"`` pattern or a structure object; refuse other structures.

    Example:
        >>> build_oneshot_structure("4:8")
        NMStructure(n=4, m=8)
    """
    built = build_structure(structure)
    if not isinstance(built, (NMStructure, Unstructured)):
        raise ValueError(
            f"One-shot pruning supports structure='unstructured' or an 'N:M' pattern such as '2:4', got {structure!r}."
        )
    return built


def check_layer_target(layer: str, shape: tuple[int, int], structure: OneShotStructure, sparsity: float) -> None:
    """Raise ``ValueError`` when ``sparsity`` is not a valid target of ``structure`` for a ``(out, in)`` layer.

    Example:
        >>> check_layer_target("mlp.fc", (8, 6), NMStructure(2, 4), 0.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: 2:4 sparsity groups every 4 consecutive input weights, but 'mlp.fc' has 6 input features, ...
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"The target sparsity of {layer!r} must be a number in [0, 1), got {sparsity!r}.")
    if isinstance(structure, NMStructure):
        n, m = structure.n, structure.m
        if shape[1] % m:
            raise ValueError(
                f"{n}:{m} sparsity groups every {m} consecutive input weights, but {layer!r} has {shape[1]} input "
                f"features, not a multiple of {m}. Add {layer!r} to `ignore`, or choose an m that divides {shape[1]}."
            )
        if sparsity != 0.0 and abs(sparsity - n / m) > 1e-9:
            raise ValueError(
                f"{n}:{m} one-shot pruning zeroes exactly {n} of every {m} weights ({n / m:.4g} of {layer!r}), "
                f"so it cannot reach a target of {sparsity!r} there. Use sparsity={n / m:.4g} (or None), 0 for a "
                "layer left dense, or structure='unstructured' for other targets."
            )


class OneShotMethod(ABC):
    """Base class: prunes one layer from its calibration statistic (see the module docstring)."""

    #: The registry name.
    name: ClassVar[str] = ""
    #: True when :meth:`statistic` gives a statistic: the layer's calibration inputs are needed.
    needs_calibration: ClassVar[bool] = False

    def statistic(self, in_features: int, device: torch.device) -> Statistic | None:
        """A fresh statistic of a layer's inputs, or None when the method needs no calibration data."""
        return None

    def check_target(self, layer: str, shape: tuple[int, int], structure: OneShotStructure, sparsity: float) -> None:
        """Raise ``ValueError`` (naming ``layer`` and what to change) when the target cannot be reached."""
        check_layer_target(layer, shape, structure, sparsity)

    @abstractmethod
    def prune_(
        self, layer: str, weight: Tensor, statistic: Statistic | None, structure: OneShotStructure, sparsity: float
    ) -> Tensor:
        """Prune the ``(out, in)`` matrix ``weight`` in place to ``sparsity`` and return its bool keep-mask.

        Pruned entries are exactly zero afterwards. ``statistic`` is what :meth:`statistic` made, accumulated
        over the calibration inputs of the layer and summed over processes.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Allocation(ABC):
    """Base class of non-uniform layer sparsity: turns per-block observations of the dense model into one target
    per layer with the same total sparsity.

    The runner calls :meth:`reset`, then :meth:`observe_block` once per block (in order, on the dense model,
    with each pruned layer's ``(out, in)`` weight and the ``||X_j||_2`` of its calibration inputs, summed over
    processes), then :meth:`targets`.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def reset(self) -> None:
        """Forget what was observed."""

    @abstractmethod
    def observe_block(self, block: int, layers: list[tuple[str, Tensor, Tensor]]) -> None:
        """Record block ``block``'s layers: ``(name, weight, input norms)``."""

    @abstractmethod
    def targets(self, sizes: dict[str, int], sparsity: float) -> dict[str, float]:
        """One sparsity per layer (``sizes``: the number of weights of each observed layer) whose weighted mean is
        ``sparsity``."""
