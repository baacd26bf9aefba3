"""VGG-style networks with batch normalisation, sized for small images such as CIFAR-10."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from lightning_prune._helpers import check_positive_ints, is_int

__all__ = ["VGG", "VGG_PRESETS", "vgg11", "vgg16"]

VGGPreset = Literal["vgg11", "vgg13", "vgg16", "vgg19", "tiny"]

#: Layer plans: an integer is a ``Conv3x3 -> BatchNorm -> ReLU`` with that many channels, ``"M"`` a 2x2 max pool.
VGG_PRESETS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
    "tiny": (8, "M", 16, "M", 32, "M"),
}


def _layer_plan(cfg: str | Sequence[int | str]) -> tuple[int | str, ...]:
    if isinstance(cfg, str):
        if cfg not in VGG_PRESETS:
            raise ValueError(
                f"`cfg` must be one of {tuple(VGG_PRESETS)} or a sequence of channel counts and 'M', got {cfg!r}."
            )
        return VGG_PRESETS[cfg]
    plan = tuple(cfg)
    valid = all(v == "M" or (is_int(v) and v >= 1) for v in plan)
    if not valid or not any(is_int(v) for v in plan):
        raise ValueError(
            "`cfg` must be a preset name or a sequence of integers >= 1 (conv channels) and 'M' (max pool) with "
            f"at least one conv, e.g. [64, 'M', 128, 'M'], got {cfg!r}."
        )
    return plan


class VGG(nn.Module):
    """Simonyan & Zisserman's VGG ("Very Deep Convolutional Networks", ICLR 2015) in its CIFAR form.

    ``Conv3x3 -> BatchNorm -> ReLU`` layers and 2x2 max pools as ``cfg`` lists them (Ioffe & Szegedy's batch
    normalisation, as in Liu et al.'s "Network Slimming", ICCV 2017, and Li et al.'s "Pruning Filters for
    Efficient ConvNets", ICLR 2017), then a global average pool and a linear ``head``: the usual CIFAR-10
    variant, without the 4096-wide ImageNet classifier. Pools round up (``ceil_mode``) so that small images
    (e.g. 8x8 through five pools) keep a 1x1 map.

    Args:
        cfg: A name from :data:`VGG_PRESETS` (``"vgg11"``, ``"vgg13"``, ``"vgg16"``, ``"vgg19"``, ``"tiny"``)
            or a layer plan such as ``(64, "M", 128, "M")``.
        in_channels: Channels of the input images.
        num_classes: Number of output logits.

    Example:
        >>> net = VGG("tiny", in_channels=3, num_classes=10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, cfg: VGGPreset | Sequence[int | str] = "vgg11", in_channels: int = 3, num_classes: int = 10
    ) -> None:
        super().__init__()
        plan = _layer_plan(cfg)
        (in_channels,) = check_positive_ints("in_channels", (in_channels,))
        (num_classes,) = check_positive_ints("num_classes", (num_classes,))
        layers: list[nn.Module] = []
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, ceil_mode=True))
                continue
            width = int(item)
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, num_classes)`` for images of shape ``(batch, in_channels, H, W)``."""
        return self.head(self.pool(self.features(x)))


def vgg11(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-11 with batch normalisation (about 9.2M parameters for 10 classes).

    Example:
        >>> vgg11(num_classes=10).head.in_features
        512
    """
    return VGG("vgg11", in_channels=in_channels, num_classes=num_classes)


def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with batch normalisation (about 14.7M parameters for 10 classes).

    Example:
        >>> sum(isinstance(m, torch.nn.Conv2d) for m in vgg16().modules())
        13
    """
    return VGG("vgg16", in_channels=in_channels, num_classes=num_classes)
