"""LeNet-5, the convolutional network of LeCun et al. (1998), for small grey-scale or colour images."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune._helpers import check_positive_ints

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """``conv5x5(6) -> pool -> conv5x5(16) -> pool -> fc(120) -> fc(84) -> head``, with ReLU and max pooling.

    LeCun et al., "Gradient-based learning applied to document recognition" (Proc. IEEE, 1998); the
    pruning benchmark of Han et al., "Learning both Weights and Connections for Efficient Neural Networks"
    (NeurIPS 2015). Two modernisations make it accept any image size: both convolutions pad to keep the
    size, and an adaptive average pool brings the last map to 5x5, so the first fully connected layer sees
    the original's 16 x 5 x 5 = 400 features on 28x28 (7x7 -> 5x5), 32x32 (8x8 -> 5x5) and 8x8 (2x2 -> 5x5)
    images alike. Pools round up (``ceil_mode``) so a 1x1 map stays 1x1.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output logits.

    Example:
        >>> net = LeNet5(in_channels=1, num_classes=10)
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        (in_channels,) = check_positive_ints("in_channels", (in_channels,))
        (num_classes,) = check_positive_ints("num_classes", (num_classes,))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, ceil_mode=True),
            nn.Conv2d(6, 16, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, num_classes)`` for images of shape ``(batch, in_channels, H, W)``."""
        return self.head(self.classifier(self.features(x)))
