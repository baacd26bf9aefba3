"""A fully connected classifier in the style of LeNet-300-100."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lightning_prune._helpers import check_positive_ints

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` per hidden width, then a linear ``head``.

    With the default ``hidden=(300, 100)`` this is LeNet-300-100, the fully connected network of
    LeCun et al., "Gradient-based learning applied to document recognition" (1998), used as a pruning
    benchmark by Han et al., "Learning both Weights and Connections for Efficient Neural Networks"
    (NeurIPS 2015).

    Args:
        input_shape: Shape of one input sample, e.g. ``(1, 8, 8)``; it is flattened.
        num_classes: Number of output logits.
        hidden: Widths of the hidden layers (may be empty: a linear classifier).

    Example:
        >>> net = MLP(input_shape=(1, 8, 8), num_classes=10)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        hidden: Sequence[int] = (300, 100),
    ) -> None:
        super().__init__()
        self.input_shape = check_positive_ints("input_shape", input_shape)
        (num_classes,) = check_positive_ints("num_classes", (num_classes,))
        widths = check_positive_ints("hidden", hidden, allow_empty=True)
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = math.prod(self.input_shape)
        for width in widths:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            in_features = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, num_classes)`` for inputs of shape ``(batch, *input_shape)``."""
        return self.head(self.features(x))
