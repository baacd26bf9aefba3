"""Finding a model's repeated blocks, reading calibration batches, and capturing the first block's inputs.

**Blocks.** By default the blocks are the children of the largest ``nn.ModuleList`` (else ``nn.Sequential``)
whose children are at least two modules of one type (largest: holding the most weights), such as a
transformer's layers (``model.layers`` of a Hugging Face Llama, ``transformer.h`` of a GPT).
``blocks="model.layers"`` names that container;
``blocks=["encoder.0", "encoder.1"]`` names the blocks themselves, in the order the model runs them. Each
block must map the hidden states to hidden states of the same shape: its output (or the first element of a
tuple output) is fed to the next block.

**Calibration batches.** The runner calls the model on each batch, by default as follows (pass ``forward_fn``
to do anything else):

=========================================  ==================================================================
batch                                      call
=========================================  ==================================================================
a tensor                                   ``model(batch)``
a tuple or list ``(inputs, targets, ...)``  ``model(batch[0])``: the first element is the input
a mapping (``input_ids``, ...)             ``model(**batch)`` without its ``labels`` key
=========================================  ==================================================================

Tensors are moved to the compute device first. A batch's sample count is the size of the first dimension of
its first tensor (``input_ids`` first for mappings); ``num_samples`` truncates the last batch to reach
exactly that many. Every batch must have the same structure as the first one (type, keys) and the same shapes
but for the first (batch) dimension: sequences of other lengths are refused (pad or chunk them to one length).
Every position counts as a calibration token, padding included, as in the reference implementations.

**Capture.** The model runs on each batch until block 0 is called; a forward pre-hook records the block's
positional and keyword arguments (attention masks, position ids and embeddings, as Hugging Face models pass
them) and stops the model there. The hidden states are the block's first positional argument, or its
``hidden_states`` keyword argument when it has none. Key-value caches passed to the block (``cache``,
``past_key_values``, ``past_key_value``, ``layer_past``) are replaced by None and ``use_cache`` by False, so
that running a block several times does not append to a cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_prune.structures.depth import find_block_container

__all__ = ["CapturedInputs", "call_model", "capture_block_inputs", "find_blocks", "iterate_batches", "merge_captured"]

ForwardFn = Callable[[nn.Module, Any], object]
"""``forward_fn(model, batch)``: runs the model on one calibration batch (its result is ignored)."""

_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")


# ------------------------------------------------------------------------------------------------ blocks
def find_blocks(model: nn.Module, blocks: str | Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks, as ``(qualified name, module)`` in order (see the module docstring).

    Raises:
        ValueError: no container of repeated blocks (and none named), or names that match no module.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
        >>> [name for name, _ in find_blocks(net)]
        ['1.0', '1.1', '1.2']
    """
    if blocks is None or isinstance(blocks, str):
        name, container = find_block_container(model, blocks)
        return [(f"{name}.{n}" if name else n, c) for n, c in container.named_children()]
    if not isinstance(blocks, Sequence) or not blocks or not all(isinstance(b, str) for b in blocks):
        raise TypeError(f"`blocks` must be a module name or a non-empty list of module names, got {blocks!r}.")
    named = dict(model.named_modules())
    missing = [b for b in blocks if b not in named]
    if missing:
        raise ValueError(f"`blocks` names {missing}, which are not modules of {type(model).__name__}.")
    return [(b, named[b]) for b in blocks]


# ------------------------------------------------------------------------------------------------ batches
def call_model(model: nn.Module, batch: Any) -> object:
    """Run ``model`` on one calibration batch, as the table of the module docstring says.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> call_model(nn.Identity(), (torch.ones(1), torch.zeros(1)))
        tensor([1.])
    """
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    raise TypeError(
        f"Calibration batches must be tensors, (inputs, targets) tuples or dicts of tensors, got "
        f"{type(batch).__name__}. Pass `forward_fn=lambda model, batch: ...` to call the model on other batches."
    )


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if isinstance(batch.get("input_ids"), Tensor):
            return batch["input_ids"]
        values = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        return None
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested in tuples, lists and dicts) on ``device``."""
    return _map_tensors(obj, lambda t: t.to(device))


def _layout(obj: Any) -> Any:
    """What two batches must share: types, keys, and tensor shapes but for the first dimension."""
    if isinstance(obj, Tensor):
        return ("tensor", tuple(obj.shape[1:]), obj.dtype)
    if isinstance(obj, Mapping):
        return ("mapping", tuple((k, _layout(v)) for k, v in obj.items()))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(_layout(v) for v in obj))
    return (type(obj).__name__,)


def _take(obj: Any, size: int, n: int) -> Any:
    """The first ``n`` samples of a batch of ``size``: tensors whose first dimension is ``size`` are sliced."""
    return _map_tensors(obj, lambda t: t[:n] if t.dim() and t.shape[0] == size else t)


def iterate_batches(
    dataloader: Iterable[Any], num_samples: int | None, device: torch.device
) -> Iterator[tuple[Any, int]]:
    """Yield ``(batch on device, sample count)`` until ``num_samples`` samples (all when None).

    Raises:
        ValueError: the loader yields nothing, a batch has no tensor, or a batch differs from the first in
            structure or in shape beyond its first dimension.
    """
    first: Any = None
    seen = 0
    for index, batch in enumerate(dataloader):
        tensor = _first_tensor(batch)
        if tensor is None or tensor.dim() == 0:
            raise ValueError(
                f"Calibration batch {index} holds no tensor with a batch dimension (got {type(batch).__name__}): "
                "the dataloader must yield tensors, (inputs, targets) tuples or dicts of tensors."
            )
        layout = _layout(batch)
        if first is None:
            first = layout
        elif layout != first:
            raise ValueError(
                f"Calibration batch {index} differs from batch 0: {_describe(layout)} instead of {_describe(first)}. "
                "All calibration batches must have the same structure and the same shapes but for the batch "
                "dimension: pad or chunk the samples to one sequence length."
            )
        size = int(tensor.shape[0])
        if num_samples is not None and seen + size > num_samples:
            batch, size = _take(batch, size, num_samples - seen), num_samples - seen
        yield to_device(batch, device), size
        seen += size
        if num_samples is not None and seen >= num_samples:
            return
    if first is None:
        raise ValueError(
            "The calibration dataloader yielded no batch: one-shot pruning needs calibration samples. Check the "
            "dataset's length, `drop_last`, and that each process's share is not empty."
        )


def _describe(layout: Any) -> str:
    kind = layout[0]
    if kind == "tensor":
        return f"a tensor of shape (batch, {', '.join(map(str, layout[1]))}) and dtype {layout[2]}"
    if kind == "mapping":
        return "a mapping {" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in layout[1]) + "}"
    if kind in ("tuple", "list"):
        return f"a {kind} of (" + ", ".join(_describe(v) for v in layout[1]) + ")"
    return f"a {kind}"


# ------------------------------------------------------------------------------------------------ capture
@dataclass
class CapturedInputs:
    """The inputs block 0 received on one calibration batch: the hidden states, where they go, and the rest."""

    hidden: Tensor
    position: int | str  # 0: the first positional argument; else the keyword
    args: tuple[Any, ...]  # the positional arguments besides the hidden states
    kwargs: dict[str, Any] = field(default_factory=dict)
    samples: int = 0

    def call(self, block: nn.Module, hidden: Tensor, device: torch.device, name: str) -> Tensor:
        """Run ``block`` on ``hidden`` with the other captured arguments; return its hidden-state output."""
        args = to_device(self.args, device)
        kwargs = to_device(self.kwargs, device)
        if self.position == 0:
            out = block(hidden, *args, **kwargs)
        else:
            kwargs[str(self.position)] = hidden
            out = block(*args, **kwargs)
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, Tensor) or out.shape != hidden.shape:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"Block {name!r} returned {got} for hidden states of shape {tuple(hidden.shape)}: the runner feeds a "
                "block's output (or the first element of a tuple output) to the next block. Pass `blocks` naming "
                "modules that map hidden states to hidden states of the same shape."
            )
        return out


class _Captured(Exception):
    """Raised by the capture hook to stop the model at block 0."""


def capture_block_inputs(
    model: nn.Module,
    block: nn.Module,
    name: str,
    batches: Iterable[tuple[Any, int]],
    forward_fn: ForwardFn,
    store: torch.device,
) -> list[CapturedInputs]:
    """Run ``model`` on each batch until ``block`` is called and record its inputs (kept on ``store``).

    Raises:
        ValueError: the model returns without calling ``block`` on a batch.
    """
    captured: list[CapturedInputs] = []
    pending: list[CapturedInputs] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        position: int | str
        if args:
            hidden, position, rest = args[0], 0, tuple(args[1:])
        elif isinstance(kwargs.get("hidden_states"), Tensor):
            hidden, position, rest = kwargs.pop("hidden_states"), "hidden_states", ()
        else:
            raise ValueError(
                f"Block {name!r} was called without a positional input or a `hidden_states` keyword, so the runner "
                "cannot tell which argument carries the hidden states. Pass `blocks` naming other modules."
            )
        if not isinstance(hidden, Tensor):
            raise ValueError(f"Block {name!r} received {type(hidden).__name__} as its first input, not a tensor.")
        for key in _CACHE_KEYS:
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        detach = lambda t: t.detach().to(store)  # noqa: E731
        pending.append(
            CapturedInputs(detach(hidden), position, _map_tensors(rest, detach), _map_tensors(kwargs, detach))
        )
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for index, (batch, samples) in enumerate(batches):
            with contextlib.suppress(_Captured):
                forward_fn(model, batch)
            if not pending:
                raise ValueError(
                    f"The model returned from calibration batch {index} without calling block {name!r}. Check "
                    "`blocks` (they must be the modules the model runs), or `forward_fn`."
                )
            entry = pending.pop()
            entry.samples = samples
            captured.append(entry)
    finally:
        handle.remove()
    return captured


def merge_captured(captured: Sequence[CapturedInputs], name: str) -> CapturedInputs:
    """The inputs of all calibration batches as one batch: tensors whose first dimension is each batch's sample
    count (the hidden states, attention masks, position ids) are concatenated along it; other tensors must be
    equal in every batch (rotary tables shared by the batch) and are taken once.

    Raises:
        ValueError: the hidden states do not lead with the batch's sample count, the batches' other arguments
            differ in structure, or a tensor without the batch dimension differs between batches. The message
            names block ``name``.

    Example:
        >>> import torch
        >>> parts = [CapturedInputs(torch.zeros(n, 3), 0, (torch.ones(3),), samples=n) for n in (2, 1)]
        >>> merged = merge_captured(parts, "layers.0")
        >>> merged.hidden.shape, merged.args[0].shape, merged.samples
        (torch.Size([3, 3]), torch.Size([3]), 3)
    """
    first = captured[0]
    if len(captured) == 1:
        return first
    sizes = [c.samples for c in captured]
    hint = "Pass sequential=False to run the block batch by batch."
    for c in captured:
        if c.hidden.dim() == 0 or c.hidden.shape[0] != c.samples:
            raise ValueError(
                f"sequential=True runs block {name!r} once on all calibration samples, concatenated along the first "
                f"dimension, but its hidden states have shape {tuple(c.hidden.shape)} for a batch of {c.samples} "
                f"samples. {hint}"
            )
    rest, spec = pytree.tree_flatten((first.args, first.kwargs))
    columns = [rest]
    for c in captured[1:]:
        leaves, other = pytree.tree_flatten((c.args, c.kwargs))
        if other != spec:
            raise ValueError(
                f"sequential=True concatenates the calibration batches, but block {name!r} received other "
                f"arguments on one batch than on the first ({other} instead of {spec}). {hint}"
            )
        columns.append(leaves)
    merged = []
    for column in zip(*columns):
        head = column[0]
        if not isinstance(head, Tensor):
            merged.append(head)
        elif all(isinstance(t, Tensor) and t.dim() and t.shape[0] == n for t, n in zip(column, sizes)):
            merged.append(torch.cat(column))
        elif all(isinstance(t, Tensor) and t.shape == head.shape and torch.equal(t, head) for t in column):
            merged.append(head)
        else:
            raise ValueError(
                f"sequential=True concatenates the calibration batches, but block {name!r} received a tensor of "
                f"shape {tuple(head.shape)} that neither leads with the batch's sample count nor is the same in "
                f"every batch. {hint}"
            )
    args, kwargs = pytree.tree_unflatten(merged, spec)
    hidden = torch.cat([c.hidden for c in captured])
    return CapturedInputs(hidden, first.position, args, kwargs, sum(sizes))
