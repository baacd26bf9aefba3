"""Small helpers that several subpackages share: argument checks, eval mode, calling a model, plain-text tables.

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
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn


def is_int(value: object) -> bool:
    """True for an integer (Python's or NumPy's), not a bool.

    Example:
        >>> import numpy as np
        >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
        (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """True for a real number (int or float, Python's or NumPy's, NumPy's float32 included), not a bool.

    Example:
        >>> import numpy as np
        >>> is_number(0.5), is_number(np.float32(0.5)), is_number(False), is_number("0.5")
        (True, True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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
    if not is_number(value) or not 0.0 <= value < 1.0:  # type: ignore[operator]
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
    return float(value)  # type: ignore[arg-type]


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
        >>> import torch
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
        >>> import torch
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


def text_table(
    rows: Sequence[Sequence[str]], title: str | None = None, *, align: str | None = None, rule: bool = True
) -> str:
    """A plain-text table: the first row is the header, a rule under it.

    Args:
        rows: the header, then the rows; every row has as many cells as the header.
        title: a line above the table.
        align: one character per column, ``"l"`` or ``"r"``; default: the first column left, the others right.
        rule: draw a line of dashes under the header.

    Example:
        >>> print(text_table([("a", "b"), ("x", "10")], align="lr"))
        a   b
        -----
        x  10
    """
    columns = len(rows[0])
    align = align or "l" + "r" * (columns - 1)
    widths = [max(len(str(r[i])) for r in rows) for i in range(columns)]
    lines = [
        "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(r, widths, align)) for r in rows
    ]
    if rule:
        lines.insert(1, "-" * len(lines[0]))
    return "\n".join(([title] if title else []) + lines)
