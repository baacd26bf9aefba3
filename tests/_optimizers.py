"""Every optimizer class of ``torch.optim``, found by enumeration (a class added to torch is tested without a change
here), with arguments that exercise its state: momentum, weight decay, AMSGrad, centred statistics.

``SparseAdam`` is left out: it only accepts sparse gradients (``nn.Embedding(sparse=True)``), while the prunable
layers (linear and convolution weights) always get dense ones, so it cannot train a prunable weight.
"""

import inspect
from collections.abc import Iterable

import torch
from torch import nn

#: Optimizers that cannot train a prunable weight, and why.
NOT_APPLICABLE = {"SparseAdam": "accepts sparse gradients only; linear and convolution weights get dense ones"}

#: Arguments per optimizer (any other class is built with its defaults).
ARGUMENTS: dict[str, dict] = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    "Adam": {"lr": 3e-3, "weight_decay": 1e-3, "amsgrad": True},
    "AdamW": {"lr": 3e-3, "weight_decay": 0.1},
    "NAdam": {"lr": 3e-3, "weight_decay": 1e-3, "decoupled_weight_decay": True},
    "RAdam": {"lr": 3e-3, "weight_decay": 1e-3},
    "RMSprop": {"lr": 1e-3, "momentum": 0.5, "centered": True, "weight_decay": 1e-3},
    "Adagrad": {"lr": 1e-2, "initial_accumulator_value": 0.1, "weight_decay": 1e-3},
    "Adadelta": {"lr": 1.0, "weight_decay": 1e-3},
    "Adamax": {"lr": 2e-3, "weight_decay": 1e-3},
    "ASGD": {"lr": 1e-2, "t0": 1.0, "weight_decay": 1e-3},
    "Rprop": {"lr": 1e-3},
    "LBFGS": {"lr": 0.1, "max_iter": 3, "history_size": 4},
    "Adafactor": {"lr": 1e-2, "weight_decay": 1e-2},
    "Muon": {"lr": 1e-2, "weight_decay": 0.1},
}


def optimizer_names() -> list[str]:
    """The names of ``torch.optim``'s optimizer classes, minus :data:`NOT_APPLICABLE`."""
    found = [
        name
        for name, cls in vars(torch.optim).items()
        if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    ]
    return sorted(set(found) - set(NOT_APPLICABLE))


def build_optimizer(name: str, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, name)
    return cls(list(params), **ARGUMENTS.get(name, {}))


def mlp(seed: int = 0) -> nn.Sequential:
    """A small MLP whose parameters are all 2-D weights (``Muon`` trains nothing else), from an explicit seed."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU()
    )
    net.append(nn.Linear(32, 4, bias=False))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return net


def assert_pruned_entries_zero(masks, optimizer: torch.optim.Optimizer, where: str) -> None:
    """Pruned weights and every optimizer state entry shaped like its parameter are exactly zero."""
    for name, p, m in zip(masks.names, masks.params, masks.masks):
        assert bool((p[~m] == 0).all()), f"{where}: a pruned weight of {name} moved under {type(optimizer).__name__}"
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert bool((value[~m] == 0).all()), (
                    f"{where}: optimizer state {key!r} of a pruned entry of {name} is not zero under "
                    f"{type(optimizer).__name__}"
                )
