"""torchvision's ResNet-18 and MobileNetV2, randomly initialised, for any number of classes and channels."""

from __future__ import annotations

import importlib
from typing import Literal, get_args

from torch import nn

from lightning_prune._helpers import check_positive_ints

__all__ = ["TORCHVISION_MODELS", "torchvision_model"]

TorchvisionName = Literal["resnet18", "mobilenet_v2"]
#: The names :func:`torchvision_model` accepts.
TORCHVISION_MODELS: tuple[str, ...] = get_args(TorchvisionName)


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                return parent, name, child
    raise ValueError(f"{type(model).__name__} has no Conv2d.")  # pragma: no cover - both models have one


def torchvision_model(
    name: TorchvisionName,
    num_classes: int = 10,
    in_channels: int = 3,
    small_inputs: bool = False,
) -> nn.Module:
    """``torchvision.models.<name>(weights=None, num_classes=num_classes)``, adapted to the input.

    ResNet-18 (He et al., CVPR 2016) and MobileNetV2 (Sandler et al., CVPR 2018) as torchvision builds them,
    with random initialisation: nothing is downloaded. Their classifiers keep torchvision's names
    (``fc`` and ``classifier.1``). With ``in_channels != 3`` the first convolution is replaced by a fresh one
    with that many input channels. With ``small_inputs=True`` the stem stops downsampling, as is usual for
    32x32 images: ResNet-18's first convolution becomes 3x3 with stride 1 and its max pool is dropped, and
    MobileNetV2's first convolution gets stride 1 (so a 32x32 image ends at 4x4 instead of 1x1).

    Args:
        name: ``"resnet18"`` or ``"mobilenet_v2"``.
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        small_inputs: Use a stem that keeps the resolution, for small images such as CIFAR-10's.

    Returns:
        The ``nn.Module``.

    Example:
        >>> import torch
        >>> net = torchvision_model("resnet18", num_classes=10, in_channels=1)
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"`name` must be one of {TORCHVISION_MODELS}, got {name!r}.")
    (num_classes,) = check_positive_ints("num_classes", (num_classes,))
    (in_channels,) = check_positive_ints("in_channels", (in_channels,))
    if not isinstance(small_inputs, bool):
        raise ValueError(f"`small_inputs` must be a bool, got {small_inputs!r}.")
    try:
        models = importlib.import_module("torchvision.models")
    except ImportError as error:  # pragma: no cover - torchvision is installed in the test environment
        raise ImportError(
            f"`torchvision_model({name!r})` needs torchvision: `pip install 'lightning-prune[vision]'`."
        ) from error
    model: nn.Module = getattr(models, name)(weights=None, num_classes=num_classes)
    parent, attribute, conv = _first_conv(model)
    if in_channels != conv.in_channels or small_inputs:
        small_resnet = small_inputs and name == "resnet18"
        replacement = nn.Conv2d(
            in_channels,
            conv.out_channels,
            kernel_size=3 if small_resnet else conv.kernel_size,  # type: ignore[arg-type]
            stride=1 if small_inputs else conv.stride,  # type: ignore[arg-type]
            padding=1 if small_resnet else conv.padding,  # type: ignore[arg-type]
            bias=conv.bias is not None,
        )
        # torchvision initialises every convolution with Kaiming normal (fan_out); so does the replacement.
        nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
        setattr(parent, attribute, replacement)
    if small_inputs and name == "resnet18":
        model.maxpool = nn.Identity()
    return model
