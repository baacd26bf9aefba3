"""Model statistics: multiply-accumulates (MACs) of one forward pass, dense and counting only nonzero weights.

A pruned weight that is exactly zero costs nothing on hardware or kernels that skip zeros; :func:`count_macs`
counts what such a kernel would do. Only Linear and Conv layers are counted (biases, norms, activations and
pooling are left out, as in most MAC counts).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(4, 3)
    >>> with torch.no_grad():
    ...     net.weight[0] = 0.0
    >>> count_macs(net, torch.zeros(1, 4))
    MacCount(macs=8, dense_macs=12)
"""

from __future__ import annotations

import math
from typing import NamedTuple, cast

import torch
from torch import nn

__all__ = ["MacCount", "count_macs"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MacCount(NamedTuple):
    """MACs of one forward pass, per sample."""

    macs: int
    """Counting only nonzero weights."""
    dense_macs: int
    """Counting every weight."""


def count_macs(model: nn.Module, example: torch.Tensor) -> MacCount:
    """Multiply-accumulates of ``model(example)`` per sample, with forward hooks on Linear and Conv layers.

    A convolution's weight is applied once per output position, so it costs (nonzero) weights x output spatial
    size (e.g. ``H_out * W_out``); grouped and depthwise convolutions are covered since each weight sees
    one input channel. A linear layer costs its (nonzero) weights once per input row: once for ``(batch,
    features)`` inputs, once per token for ``(batch, tokens, features)``. The model runs in eval mode under
    ``torch.no_grad()``; its training mode is restored afterwards.

    Args:
        model: The network.
        example: One input batch; the counts are divided by its first dimension (the batch size).

    Returns:
        ``MacCount(macs, dense_macs)``.

    Example:
        >>> conv = nn.Conv2d(1, 2, kernel_size=3, padding=1)  # 18 weights, 8x8 output positions
        >>> count_macs(conv, torch.zeros(2, 1, 8, 8)).dense_macs
        1152
    """
    if example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(f"`example` must be a batch with at least one sample, got shape {tuple(example.shape)}.")
    batch = example.shape[0]
    totals = [0, 0]

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        weight = cast(torch.Tensor, module.weight)
        nonzero, dense = int(torch.count_nonzero(weight)), weight.numel()
        # Conv: once per output position of (batch, channels, *spatial); Linear: once per row of the leading dims.
        uses = math.prod(output.shape[2:]) if isinstance(module, _CONVS) else math.prod(output.shape[:-1]) // batch
        totals[0] += nonzero * uses
        totals[1] += dense * uses

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, *_CONVS))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return MacCount(macs=totals[0], dense_macs=totals[1])
