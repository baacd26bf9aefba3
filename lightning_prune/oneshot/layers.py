"""How the one-shot engine sees a layer that is a linear map: its weight as an ``(out, in)`` matrix and its
inputs as ``(tokens, in)`` rows.

Wanda and SparseGPT only need two things from a layer: the weight matrix ``W`` of ``y = W x`` and the inputs
``x`` it was called with. A :class:`LinearMap` adapter gives both for one layer type; :class:`LinearAdapter`
covers ``nn.Linear``. Another layer type that computes a linear map (a Hugging Face ``Conv1D``, whose weight
is stored transposed, or an unfolded convolution) is added by writing an adapter and passing
``layer_types={ThatType: ThatAdapter()}`` to :func:`~lightning_prune.oneshot.prune_one_shot`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(3, 2)
    >>> adapter = LinearAdapter()
    >>> adapter.matrix(layer).shape, adapter.rows((torch.zeros(4, 5, 3),)).shape
    (torch.Size([2, 3]), torch.Size([20, 3]))
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

__all__ = ["LinearAdapter", "LinearMap"]


class LinearMap(ABC):
    """Adapter base: the weight matrix and the input rows of one layer type that computes ``y = W x (+ b)``."""

    @abstractmethod
    def matrix(self, module: nn.Module) -> Tensor:
        """The weight as an ``(out, in)`` matrix that *shares storage* with the parameter (the engine prunes and
        updates it in place)."""

    @abstractmethod
    def rows(self, args: tuple[Any, ...]) -> Tensor:
        """The layer's inputs from the positional arguments of one call, as ``(tokens, in)`` rows (a view
        where possible: the engine only reads them)."""

    def parameter_name(self) -> str:
        """The name of the pruned parameter on the module (``"weight"``)."""
        return "weight"


class LinearAdapter(LinearMap):
    """``nn.Linear``: the weight is already ``(out_features, in_features)``; every leading input dimension
    (batch, sequence) is a token."""

    def matrix(self, module: nn.Module) -> Tensor:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"LinearAdapter handles nn.Linear layers, got {type(module).__name__}.")
        return module.weight.data

    def rows(self, args: tuple[Any, ...]) -> Tensor:
        x = args[0]
        return x.reshape(-1, x.shape[-1])
