"""A small convolutional classifier for low-resolution images such as the 8x8 digits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_prune._helpers import check_positive_ints

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """``Conv3x3 -> BatchNorm -> ReLU -> MaxPool`` blocks, then ``Linear -> ReLU -> Linear head``.

    Each block halves the spatial size (rounding up, so a 1x1 map stays 1x1); an adaptive average pool
    then brings the last feature map to ``pool_size x pool_size``. The network therefore accepts any
    image size: on 8x8 digits with two blocks the maps go 8 -> 4 -> 2 and the adaptive pool is the
    identity.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output logits.
        channels: Output channels of each convolutional block.
        hidden: Width of the fully connected layer before the head.
        pool_size: Side of the feature map fed to the fully connected layers.

    Example:
        >>> net = SmallCNN(in_channels=1, num_classes=10)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        pool_size: int = 2,
    ) -> None:
        super().__init__()
        (in_channels,) = check_positive_ints("in_channels", (in_channels,))
        (num_classes,) = check_positive_ints("num_classes", (num_classes,))
        widths = check_positive_ints("channels", channels)
        (hidden,) = check_positive_ints("hidden", (hidden,))
        (pool_size,) = check_positive_ints("pool_size", (pool_size,))
        blocks: list[nn.Module] = []
        for width in widths:
            blocks += [
                nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, ceil_mode=True),
            ]
            in_channels = width
        blocks.append(nn.AdaptiveAvgPool2d(pool_size))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * pool_size * pool_size, hidden), nn.ReLU(inplace=True)
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, num_classes)`` for images of shape ``(batch, in_channels, H, W)``."""
        return self.head(self.classifier(self.features(x)))
