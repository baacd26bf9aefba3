"""Depth pruning: whole blocks of a model's repeated block list, chosen by a block-importance score.

The blocks are the children of one container: by default the largest ``nn.ModuleList`` (else ``nn.Sequential``)
whose children are at least two modules of one type (largest: holding the most weights), such as
``model.layers`` of a Hugging Face Llama or Qwen2, ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT,
``layers`` of this package's :class:`~lightning_prune.models.GPT` or of an ``nn.TransformerEncoder``. A block
maps hidden states to hidden states of the same shape (its output, or the first element of a tuple output).

This module finds the container (:func:`find_block_container`), turns a number or a fraction of blocks into a count
(:func:`resolve_num_blocks`), picks the least important blocks from their scores (:func:`select_blocks`), and
runs a model with some blocks bypassed (:func:`skip_blocks`): what the model computes once they are removed. The
scores are :mod:`lightning_prune.criteria.depth`'s, measured over calibration data by
:func:`lightning_prune.oneshot.depth.score_blocks`; :func:`lightning_prune.deploy.depth.remove_blocks` removes the
blocks for a shallower model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)]))
    >>> find_block_container(net)[0]
    '1'
    >>> select_blocks(torch.tensor([0.9, 0.1, 0.5, 0.1]), 2)
    [1, 3]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._helpers import is_int, is_number

__all__ = ["count_blocks", "find_block_container", "resolve_num_blocks", "select_blocks", "skip_blocks"]


def _repeated(model: nn.Module, kind: type[nn.Module]) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        children = list(module.children())
        if type(module) is kind and len(children) >= 2 and len({type(c) for c in children}) == 1:
            found.append((name, module))
    return found


def find_block_container(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.Module]:
    """The container of ``model``'s repeated blocks, as ``(qualified name, container)``.

    Args:
        model: the model.
        blocks: the container's qualified name (``"model.layers"``); None to find it (see the module docstring).

    Raises:
        TypeError: ``blocks`` is not a string or None.
        ValueError: ``blocks`` names no module or a module without children; no container of repeated blocks.

    Example:
        >>> from torch import nn
        >>> layer = nn.TransformerEncoderLayer(8, 2, 16)
        >>> encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
        >>> name, layers = find_block_container(encoder)
        >>> name, len(layers)
        ('layers', 3)
    """
    if blocks is not None:
        if not isinstance(blocks, str):
            raise TypeError(
                f"`blocks` must be the name of the blocks' container (e.g. 'model.layers'), got {blocks!r}."
            )
        container = dict(model.named_modules()).get(blocks)
        if container is None:
            raise ValueError(
                f"`blocks`={blocks!r} names no module of {type(model).__name__}. Name the container of the "
                "repeated blocks (e.g. 'model.layers')."
            )
        if not list(container.children()):
            raise ValueError(f"`blocks`={blocks!r} names a module without children; name the container of the blocks.")
        return blocks, container
    for kind in (nn.ModuleList, nn.Sequential):
        found = _repeated(model, kind)
        if found:
            # The container holding the most weights: a model's layers rather than the experts of one layer.
            return max(found, key=lambda item: (sum(p.numel() for p in item[1].parameters()), -len(item[0])))
    raise ValueError(
        f"Found no repeated blocks in {type(model).__name__}: no nn.ModuleList (or nn.Sequential) holds two or more "
        "modules of one type. Name them with `blocks`: the container (blocks='model.layers') or the blocks "
        "themselves (blocks=['layer1', 'layer2'])."
    )


def count_blocks(container: nn.Module) -> int:
    """How many blocks ``container`` holds (an ``nn.ModuleList`` or ``nn.Sequential``: its length).

    Example:
        >>> count_blocks(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))
        2
    """
    return sum(child is not None for child in container._modules.values())


def resolve_num_blocks(num_blocks: int | float, total: int) -> int:
    """How many of ``total`` blocks to remove: ``num_blocks`` itself (an integer), or ``round(num_blocks * total)``
    for a fraction in (0, 1); at least one block must stay.

    Raises:
        ValueError: not a positive integer or a fraction in (0, 1), a fraction that rounds to 0 blocks, or as many
            blocks as there are or more.

    Example:
        >>> resolve_num_blocks(2, 8), resolve_num_blocks(0.25, 8)
        (2, 2)
        >>> resolve_num_blocks(8, 8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `num_blocks`=8 would remove all 8 blocks: at least one must stay. Use num_blocks <= 7 (or a ...
    """
    if is_int(num_blocks):
        count = int(num_blocks)
        if count < 1:
            raise ValueError(
                f"`num_blocks` must be an integer >= 1 (blocks to remove) or a fraction in (0, 1), got {num_blocks!r}."
            )
    elif is_number(num_blocks, finite=True) and 0.0 < num_blocks < 1.0:
        count = round(float(num_blocks) * total)
        if count < 1:
            raise ValueError(
                f"`num_blocks`={num_blocks!r} of {total} blocks rounds to 0 blocks: use a larger fraction "
                f"(at least {0.5 / total:.3g}) or an integer."
            )
    else:
        raise ValueError(
            f"`num_blocks` must be an integer >= 1 (blocks to remove) or a fraction in (0, 1), got {num_blocks!r}."
        )
    if count >= total:
        raise ValueError(
            f"`num_blocks`={num_blocks!r} would remove all {total} blocks: at least one must stay. Use "
            f"num_blocks <= {total - 1} (or a fraction below 1)."
        )
    return count


def select_blocks(scores: Tensor | Sequence[float], num_blocks: int | float) -> list[int]:
    """The indices of the ``num_blocks`` lowest-scored blocks (the least important), ascending; ties go to the
    earliest block.

    Args:
        scores: one score per block, higher meaning more important (e.g. Block Influence).
        num_blocks: how many to remove, or a fraction of the blocks (:func:`resolve_num_blocks`).

    Raises:
        ValueError: a bad ``num_blocks`` (see :func:`resolve_num_blocks`), or scores that are not finite.

    Example:
        >>> select_blocks([0.30, 0.02, 0.05, 0.40], 0.5)
        [1, 2]
    """
    values = torch.as_tensor(scores, dtype=torch.float64).flatten()
    count = resolve_num_blocks(num_blocks, values.numel())
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"Block scores must be finite, got {values.tolist()}: check the calibration data.")
    order = torch.sort(values, stable=True).indices
    return sorted(order[:count].tolist())


def _bypass(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("src"))
    if not isinstance(hidden, Tensor):
        raise ValueError(
            f"A bypassed {type(module).__name__} was called without its hidden states as the first positional "
            "argument or the `hidden_states` keyword."
        )
    if isinstance(output, tuple) and output:
        return (hidden, *output[1:])
    return hidden


@contextlib.contextmanager
def skip_blocks(model: nn.Module, indices: Sequence[int], blocks: str | None = None) -> Iterator[nn.Module]:
    """Inside the block, the blocks at ``indices`` return their input hidden states unchanged: ``model`` computes
    what it will once they are removed (:func:`~lightning_prune.deploy.depth.remove_blocks`), without changing it.

    The bypassed blocks still run (their outputs are discarded); use it to measure a choice before removing.

    Raises:
        ValueError: an index outside the blocks, or no repeated blocks (see :func:`find_block_container`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> x = torch.randn(3, 2)
        >>> with skip_blocks(net, [0]):
        ...     torch.equal(net(x), net[1](x))
        True
    """
    _, container = find_block_container(model, blocks)
    children = [child for child in container._modules.values() if child is not None]
    bad = [i for i in indices if not is_int(i) or not 0 <= i < len(children)]
    if bad:
        raise ValueError(f"`indices` {bad} are not blocks: there are {len(children)} (0 to {len(children) - 1}).")
    handles = [children[i].register_forward_hook(_bypass, with_kwargs=True) for i in indices]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
