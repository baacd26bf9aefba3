"""The CIFAR ResNets of He et al. (2016): ResNet-20, -32, -44, -56, -110."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune._helpers import check_positive_ints, is_int

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet56"]


class BasicBlock(nn.Module):
    """Two ``Conv3x3 -> BatchNorm`` layers and an identity or projection shortcut, then ReLU.

    The shortcut is a ``Conv1x1 -> BatchNorm`` projection (He et al.'s option B) whenever the block changes
    the stride or the width, and the identity otherwise. A projection rather than option A's zero padding
    keeps every channel of the sum owned by a convolution, which channel pruning can then shrink.

    Args:
        in_channels: Channels entering the block.
        out_channels: Channels leaving it.
        stride: Stride of the first convolution and of the shortcut.

    Example:
        >>> BasicBlock(16, 32, stride=2)(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32x32 images, from He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016).

    A ``Conv3x3(width) -> BatchNorm -> ReLU`` stem, three stages of ``n = (depth - 2) / 6`` :class:`BasicBlock`
    with ``width``, ``2 width`` and ``4 width`` channels (the second and third halve the spatial size), a
    global average pool and a linear ``head``. ``depth=20`` and ``depth=56`` give ResNet-20 (about 0.27M
    parameters) and ResNet-56 (about 0.86M), the usual CIFAR-10 pruning benchmarks (e.g. Li et al., "Pruning
    Filters for Efficient ConvNets", ICLR 2017). Shortcuts that change shape are 1x1 projections (option B).

    Args:
        depth: ``6 n + 2`` for an integer ``n >= 1``: 8, 14, 20, 32, 44, 56, 110, ...
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        width: Channels of the stem and the first stage.

    Example:
        >>> net = CifarResNet(depth=20, num_classes=10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if not is_int(depth) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"`depth` must be 6 n + 2 for an integer n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth!r}."
            )
        (num_classes,) = check_positive_ints("num_classes", (num_classes,))
        (in_channels,) = check_positive_ints("in_channels", (in_channels,))
        (width,) = check_positive_ints("width", (width,))
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels = width
        for index, stage_width in enumerate((width, 2 * width, 4 * width)):
            blocks: list[nn.Module] = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, stage_width, stride=stride))
                channels = stage_width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, num_classes)`` for images of shape ``(batch, in_channels, H, W)``."""
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.pool(x))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 for CIFAR (three stages of three blocks; about 0.27M parameters for 10 classes).

    Example:
        >>> round(sum(p.numel() for p in resnet20().parameters()) / 1e6, 2)
        0.27
    """
    return CifarResNet(depth=20, num_classes=num_classes, in_channels=in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 for CIFAR (three stages of nine blocks; about 0.86M parameters for 10 classes).

    Example:
        >>> round(sum(p.numel() for p in resnet56().parameters()) / 1e6, 2)
        0.86
    """
    return CifarResNet(depth=56, num_classes=num_classes, in_channels=in_channels)
