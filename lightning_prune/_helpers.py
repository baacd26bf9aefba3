"""Small helpers that several subpackages share: argument checks, eval mode, calling a model, timing, plain-text
and markdown tables.

Private to the package: users get them through the public functions that use them.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    >>> with eval_mode(net):
    ...     net[1].training
    False
    >>> net[1].training
    True
    >>> print(text_table([("layer", "pruned"), ("fc", "50.00%")], title="Summary"))
    Summary
    layer  pruned
    -------------
    fc     50.00%
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeGuard, TypeVar

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- checks
def is_int(value: object) -> TypeGuard[int]:
    """True for an integer (Python's or NumPy's), not a bool.

    Example:
        >>> import numpy as np
        >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
        (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object, *, finite: bool = False) -> TypeGuard[float]:
    """True for a real number (int or float, Python's or NumPy's, NumPy's float32 included), not a bool; with
    ``finite``, not an infinity or NaN either.

    Example:
        >>> import numpy as np
        >>> is_number(0.5), is_number(np.float32(0.5)), is_number(False), is_number("0.5")
        (True, True, False, False)
        >>> is_number(float("nan")), is_number(float("nan"), finite=True)
        (True, False)
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    return not finite or math.isfinite(value)


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int when it is an integer ``>= minimum`` (not a bool); else a ``ValueError`` naming ``name``.

    Example:
        >>> check_int("batch_size", 64, 1)
        64
        >>> check_int("batch_size", 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: `batch_size` must be an integer >= 1, got 0.
    """
    if not is_int(value) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_positive_ints(name: str, values: Sequence[int], allow_empty: bool = False) -> tuple[int, ...]:
    """``values`` as a tuple when every one is an integer >= 1 (and there is one, unless ``allow_empty``); else a
    ``ValueError`` naming ``name``.

    Example:
        >>> check_positive_ints("hidden", [300, 100])
        (300, 100)
        >>> check_positive_ints("hidden", [300, 0])
        Traceback (most recent call last):
        ...
        ValueError: `hidden` must be a sequence of integers >= 1, got [300, 0].
    """
    out = tuple(values)
    if (not out and not allow_empty) or any(not is_int(v) or v < 1 for v in out):
        what = "a sequence of integers >= 1" + (" (possibly empty)" if allow_empty else "")
        raise ValueError(f"`{name}` must be {what}, got {values!r}.")
    return out


def check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    """``batch_sizes`` as a tuple when it is a non-empty sequence of integers >= 1; else a ``ValueError``.

    Example:
        >>> check_batch_sizes([1, 64])
        (1, 64)
    """
    sizes = tuple(batch_sizes) if not isinstance(batch_sizes, (str, bytes)) else ()
    if not sizes or not all(is_int(b) and b >= 1 for b in sizes):
        raise ValueError(
            f"`batch_sizes` must be a non-empty sequence of integers >= 1, e.g. (1, 64), got {batch_sizes!r}."
        )
    return sizes


def check_flag(name: str, value: object) -> bool:
    """``value`` when it is True or False; else a ``TypeError`` naming ``name``.

    Example:
        >>> check_flag("check", "yes")
        Traceback (most recent call last):
        ...
        TypeError: `check` must be True or False, got 'yes'.
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_sparsity(value: object, name: str = "sparsity") -> float:
    """``value`` as a float when it is a sparsity, a number in [0, 1); else a ``ValueError`` naming ``name``.

    Example:
        >>> check_sparsity(0.5)
        0.5
        >>> check_sparsity(1.0, "final_sparsity")
        Traceback (most recent call last):
        ...
        ValueError: `final_sparsity` must be a number in [0, 1), got 1.0.
    """
    if not is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
    return float(value)


# ---------------------------------------------------------------------------------------------- models
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` in eval mode inside the block (no BatchNorm statistics updates, no dropout);
    each module's own mode restored after, even when only some were training."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def forward(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs``: a mapping as keyword arguments, a tuple or list as positional arguments,
    anything else as the single argument.

    Example:
        >>> forward(nn.Linear(2, 1), (torch.zeros(3, 2),)).shape
        torch.Size([3, 1])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_tensors(output: Any) -> list[Tensor]:
    """Every tensor in a model's output, in order, through nested tuples, lists and mappings.

    Example:
        >>> len(output_tensors({"logits": torch.zeros(2), "aux": (torch.ones(1), None)}))
        2
    """
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in output_tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in output_tensors(v)]
    return []


def positional_tensors(example_inputs: object, *, batch_first: bool = False) -> tuple[Tensor, ...]:
    """``example_inputs`` as the tuple of a forward's positional inputs: a tensor alone or a non-empty tuple of
    tensors, else a ``TypeError``; with ``batch_first``, the first one must hold at least one sample along its
    first dimension, else a ``ValueError``.

    Example:
        >>> len(positional_tensors(torch.zeros(2, 3))), len(positional_tensors((torch.zeros(2), torch.ones(1))))
        (1, 2)
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError(
            "`example_inputs` must be a tensor or a non-empty tuple of tensors (the positional inputs of one "
            f"forward{', batch first' if batch_first else ''}), got {type(example_inputs).__name__}."
        )
    if batch_first and (inputs[0].dim() == 0 or inputs[0].shape[0] < 1):
        raise ValueError(
            f"`example_inputs` must be batched (first dimension the batch, at least 1), got shape "
            f"{tuple(inputs[0].shape)}."
        )
    return inputs


def batched(inputs: T, size: int, *, reverse: bool = False) -> T:
    """``inputs`` (a tensor, or tensors in tuples, lists and dicts) with every tensor that has the first tensor's
    batch size resized to ``size`` samples, repeating them as needed; in reverse order with ``reverse``.

    Example:
        >>> x, mask = torch.arange(3.0), torch.ones(1)
        >>> batched((x, mask), 5)
        (tensor([0., 1., 2., 0., 1.]), tensor([1.]))
        >>> batched({"x": x}, 2, reverse=True)
        {'x': tensor([2., 1.])}
    """
    leaves = [x for x in pytree.tree_leaves(inputs) if isinstance(x, Tensor) and x.dim() > 0]
    if not leaves:
        return inputs
    batch = leaves[0].shape[0]

    def resize(x: Any) -> Any:
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != batch:
            return x
        index = torch.arange(size, device=x.device) % batch
        return x.index_select(0, batch - 1 - index if reverse else index).contiguous()

    return pytree.tree_map(resize, inputs)


# ---------------------------------------------------------------------------------------------- timing
@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (``None`` keeps the current setting); the previous
    count is restored after.

    Example:
        >>> before = torch.get_num_threads()
        >>> with num_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(previous)


def time_call(call: Callable[[], object]) -> float:
    """Wall-clock seconds of one ``call()``, with ``time.perf_counter``.

    Example:
        >>> 0.0 <= time_call(lambda: sum(range(10))) < 1.0
        True
    """
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def rotated(items: Sequence[T], shift: int) -> list[T]:
    """``items`` rotated left by ``shift`` places: the order of block or round ``shift`` when the order rotates,
    so that the machine's drifts hit every item alike.

    Example:
        >>> rotated(["a", "b", "c"], 4)
        ['b', 'c', 'a']
    """
    start = shift % len(items)
    return [*items[start:], *items[:start]]


# ---------------------------------------------------------------------------------------------- tables
def _widths(rows: Sequence[Sequence[str]]) -> list[int]:
    return [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]


def text_table(
    rows: Sequence[Sequence[str]],
    title: str | None = None,
    *,
    align: str | None = None,
    rule: bool = True,
    strip: bool = False,
    indent: str = "",
) -> str:
    """A plain-text table: the first row is the header, columns two spaces apart.

    Args:
        rows: the header, then the rows; every row has as many cells as the header.
        title: a line above the table (none when empty).
        align: one character per column, ``"l"`` or ``"r"``; default: the first column left, the others right.
        rule: draw a line of dashes under the header, as long as the header's line.
        strip: remove the spaces at the end of each line.
        indent: put in front of every line of the table (not the title).

    Example:
        >>> print(text_table([("a", "b"), ("x", "10")], align="lr"))
        a   b
        -----
        x  10
        >>> print(text_table([("name", "kind"), ("fc", "")], align="ll", rule=False, strip=True, indent="> "))
        > name  kind
        > fc
    """
    align = align or "l" + "r" * (len(rows[0]) - 1)
    widths = _widths(rows)
    lines = [
        "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(r, widths, align)) for r in rows
    ]
    if rule:
        lines.insert(1, "-" * len(lines[0]))
    lines = [indent + (line.rstrip() if strip else line) for line in lines]
    return "\n".join(([title] if title else []) + lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with padded columns; ``|`` inside a cell of the rows is escaped.

    Example:
        >>> print(markdown_table(["a", "b"], [["1", "x|y"]]))
        | a | b    |
        |---|------|
        | 1 | x\\|y |
    """
    cells = [list(header), *[[c.replace("|", "\\|") for c in row] for row in rows]]
    widths = _widths(cells)
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
