"""Masks that keep pruned weights exactly zero, in plain PyTorch.

A :class:`MaskSet` owns one boolean keep-mask per prunable parameter (one byte per weight) and the three
mechanisms that keep pruned entries at zero while training goes on:

1. a gradient hook on each parameter multiplies its gradient by the mask, so no gradient ever reaches a
   pruned entry (this also holds under gradient accumulation and DDP, whose reduction sees masked grads);
2. a post-step hook on each optimizer re-applies the masks to the weights, which catches anything that moves
   a weight without a gradient (decoupled weight decay, custom optimizers);
3. the same hook zeroes the optimizer state of pruned entries (SGD momentum, Adam moments), so no stale
   momentum pushes a pruned weight once it is pruned.

The model is never reparametrised: parameters keep their names and the model's ``state_dict()`` stays plain.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.criteria import MagnitudeImportance
    >>> from lightning_prune.masks.params import prunable_parameters
    >>> from lightning_prune.structures import Unstructured
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> masks = MaskSet(prunable_parameters(model))
    >>> masks.names
    ['0.weight', '2.weight']
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> Unstructured().prune_(masks, MagnitudeImportance(), sparsity=0.5)
    >>> masks.attach([opt])
    >>> model(torch.randn(3, 4)).sum().backward(); opt.step()
    >>> masks.sparsity()
    0.5
    >>> all(bool((p[~m] == 0).all()) for p, m in zip(masks.params, masks.masks))
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune._helpers import text_table

_APPLY_CHUNK = 1 << 20


class MaskSet:
    """Boolean keep-masks for named parameters, and the hooks that enforce them.

    Args:
        params: the parameters to mask, by name (see :func:`prunable_parameters`).
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        if not params:
            raise ValueError("MaskSet needs at least one parameter to mask.")
        self.names: list[str] = list(params)
        self.params: list[nn.Parameter] = list(params.values())
        # Contiguous whatever the parameter's memory format (e.g. channels_last), so they can be streamed.
        self.masks: list[Tensor] = [torch.ones(p.shape, dtype=torch.bool, device=p.device) for p in self.params]
        self._grad_handles: list[RemovableHandle] = []
        self._step_handles: list[RemovableHandle] = []
        self._multipliers: list[Tensor] = []  # the masks in each parameter's dtype, while attached

    # ------------------------------------------------------------------ statistics
    def numel(self) -> int:
        return sum(m.numel() for m in self.masks)

    def num_pruned(self) -> int:
        return sum(m.numel() - int(torch.count_nonzero(m)) for m in self.masks)

    def sparsity(self) -> float:
        """Fraction of masked (pruned) entries over all masked tensors."""
        return self.num_pruned() / self.numel()

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries per parameter name."""
        return {n: (m.numel() - int(torch.count_nonzero(m))) / m.numel() for n, m in zip(self.names, self.masks)}

    def entry_counts(self) -> tuple[list[int], list[int]]:
        """Per masked tensor: its entries and its pruned entries, over the whole tensor (summed over the ranks that
        hold its shards, for a :class:`~lightning_prune.masks.sharded.ShardedMaskSet`)."""
        return [m.numel() for m in self.masks], [m.numel() - int(torch.count_nonzero(m)) for m in self.masks]

    def local_tensors(self) -> list[Tensor]:
        """The masked entries this process holds, shaped like :attr:`masks`: the parameters themselves (detached),
        or their local shards when sharded."""
        return [p.detach() for p in self.params]

    def selection_args(self, indices: Sequence[int]) -> dict[str, Any]:
        """Keyword arguments that make :func:`~lightning_prune.masks.selection.prune_lowest_` select over the whole
        tensors ``indices`` when :meth:`local_tensors` are shards (``group``, ``offsets``); none here."""
        return {}

    # ------------------------------------------------------------------ enforcement
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every pruned weight. Call it after changing :attr:`masks`: it also refreshes the hooks."""
        for mult, m in zip(self._multipliers, self.masks):
            mult.copy_(m)
        if self._multipliers:
            _mul_(self.params, self._multipliers)
        else:  # in slices: multiplying by a bool tensor can make a full-size float copy of it
            for p, m in zip(self.params, self.masks):
                if not p.is_contiguous():  # e.g. channels_last: multiply by logical index
                    p.mul_(m)
                    continue
                flat_p, flat_m = p.view(-1), m.view(-1)
                for start in range(0, flat_p.numel(), _APPLY_CHUNK):
                    flat_p[start : start + _APPLY_CHUNK].mul_(flat_m[start : start + _APPLY_CHUNK])

    @torch.no_grad()
    def zero_optimizer_state_(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer state (momentum, moments) of pruned entries of the masked parameters."""
        factors = self._multipliers or self.masks
        tensors: list[Tensor] = []
        masks: list[Tensor] = []
        for p, m in zip(self.params, factors):
            state = optimizer.state.get(p)
            if not state:
                continue
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    tensors.append(value)
                    masks.append(m if value.dtype == m.dtype else m.to(value.dtype))
        if tensors:
            _mul_(tensors, masks)

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Install the gradient hooks and, on each optimizer, a post-step hook that re-masks weights and
        optimizer state; zero the pruned weights, their pending gradients and optimizer state now.

        While attached, each mask is also held in its parameter's dtype: multiplying by a float mask is about
        ten times faster than by a bool one on CPU, which keeps the per-step cost small. Idempotent: hooks
        already installed are replaced.
        """
        self.detach()
        self._multipliers = [m.to(p.dtype) for p, m in zip(self.params, self.masks)]
        for p, mult in zip(self.params, self._multipliers):
            self._grad_handles.append(p.register_hook(_GradMask(mult)))
            if p.grad is not None:  # a gradient already accumulated before the masks grew
                with torch.no_grad():
                    p.grad.mul_(mult)
        for opt in optimizers:
            self._step_handles.append(opt.register_step_post_hook(self._after_step))
            self.zero_optimizer_state_(opt)
        self.apply_()

    def detach(self) -> None:
        """Remove every hook installed by :meth:`attach` (the masks stay)."""
        for handle in self._grad_handles + self._step_handles:
            handle.remove()
        self._grad_handles.clear()
        self._step_handles.clear()
        self._multipliers = []

    @property
    def attached(self) -> bool:
        return bool(self._grad_handles)

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        _mul_(self.params, self._multipliers)
        self.zero_optimizer_state_(optimizer)

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Tensor]:
        """The masks by parameter name, as CPU bool tensors."""
        return {n: m.detach().cpu().clone() for n, m in zip(self.names, self.masks)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore masks saved by :meth:`state_dict` (in place, so installed hooks see them) and zero the
        pruned weights.

        Raises:
            ValueError: the saved masks name other parameters or have other shapes.
        """
        missing = [n for n in self.names if n not in state]
        unexpected = [n for n in state if n not in self.names]
        if missing or unexpected:
            raise ValueError(
                "Saved pruning masks do not match the model's prunable parameters: "
                f"missing {missing}, unexpected {unexpected}. Was the checkpoint written for another model or "
                "another `ignore` setting?"
            )
        for n, m in zip(self.names, self.masks):
            saved = state[n]
            if saved.shape != m.shape:
                raise ValueError(
                    f"Saved pruning mask of {n!r} has shape {tuple(saved.shape)}, the parameter {tuple(m.shape)}."
                )
            m.copy_(saved.to(device=m.device, dtype=torch.bool))
        self.apply_()


@torch.no_grad()
def non_finite_parameters(masks: MaskSet) -> list[str]:
    """The names of the masked parameters that hold a NaN or an infinite value (one pass over each).

    Example:
        >>> from torch import nn
        >>> from lightning_prune.masks.params import prunable_parameters
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> masks = MaskSet(prunable_parameters(net))
        >>> with torch.no_grad():
        ...     net[1].weight[0, 0] = float("nan")
        >>> non_finite_parameters(masks)
        ['1.weight']
    """
    return [n for n, p in zip(masks.names, masks.params) if p.is_floating_point() and not bool(torch.isfinite(p).all())]


def sparsity_rows(masks: MaskSet) -> list[tuple[str, str, str, str]]:
    """Per masked tensor, then ``total``: the name, the shape, pruned / total entries and the fraction pruned
    (the rows of :func:`sparsity_table`)."""
    rows = []
    numel, pruned_counts = masks.entry_counts()  # whole tensors, also when sharded
    for name, param, total, pruned in zip(masks.names, masks.params, numel, pruned_counts):
        rows.append((name, "x".join(map(str, param.shape)), f"{pruned} / {total}", f"{pruned / total:.2%}"))
    rows.append(("total", "", f"{masks.num_pruned()} / {masks.numel()}", f"{masks.sparsity():.2%}"))
    return rows


#: The header of :func:`sparsity_rows`.
SPARSITY_HEADER = ("parameter", "shape", "pruned / total", "sparsity")


def sparsity_table(masks: MaskSet) -> str:
    """A plain-text per-layer table: parameter, shape, pruned / total, sparsity."""
    return text_table([SPARSITY_HEADER, *sparsity_rows(masks)], "Pruning summary")


def _mul_(tensors: Sequence[Tensor], factors: Sequence[Tensor]) -> None:
    """``tensors[i] *= factors[i]`` for all i, in one fused call."""
    torch._foreach_mul_(list(tensors), list(factors))


class _GradMask:
    """Gradient hook: multiplies the gradient by the keep-mask (a picklable callable, not a lambda)."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask

    def __call__(self, grad: Tensor) -> Tensor:
        return grad * self.mask
