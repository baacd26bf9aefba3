"""Block-importance scores for depth pruning: how much a block changes the hidden states that pass through it.

Each function maps a block's input and output hidden states, ``(..., hidden)`` each, to one score per token
(shape ``(...)``), higher meaning the block matters more; a block's score is the mean over the calibration
tokens (:func:`lightning_prune.oneshot.depth.score_blocks` accumulates it batch by batch):

* ``"influence"``: Block Influence, ``1 - cos(x, y)`` (Men et al., 2024, "ShortGPT: Layers in Large Language
  Models are More Redundant Than You Expect"): a block that barely turns the hidden state scores near 0;
* ``"angular"``: the angular distance ``arccos(cos(x, y)) / pi`` in [0, 1] (Gromov et al., 2024, "The
  Unreasonable Ineffectiveness of the Deeper Layers", with a span of one block);
* ``"relative_norm"``: the size of the block's update relative to its input, ``||y - x|| / ||x||``: a magnitude
  alternative that also sees updates along the hidden state's own direction, which the angle ignores.

The cosine is computed in float64; a zero vector has cosine 0 with anything (``torch.cosine_similarity``'s
convention), and a zero input gives ``relative_norm`` 0 when the output is zero too.

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> y = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    >>> [round(v, 4) for v in block_influence(x, y).tolist()]
    [0.2929, 0.0]
    >>> [round(v, 4) for v in angular_distance(x, y).tolist()]
    [0.25, 0.0]
    >>> relative_norm(x, y).tolist()
    [1.0, 0.5]
    >>> sorted(BLOCK_SCORES)
    ['angular', 'influence', 'relative_norm']
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["BLOCK_SCORES", "BlockScore", "angular_distance", "block_influence", "build_block_score", "relative_norm"]

#: ``score(inputs, outputs)``: one score per token from a block's ``(..., hidden)`` input and output hidden states.
BlockScore = Callable[[Tensor, Tensor], Tensor]


def _check(inputs: Tensor, outputs: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(inputs, Tensor) or not isinstance(outputs, Tensor):
        raise TypeError(
            f"Block scores take two tensors (the block's input and output hidden states), got "
            f"{type(inputs).__name__} and {type(outputs).__name__}."
        )
    if inputs.shape != outputs.shape or inputs.dim() < 1:
        raise ValueError(
            f"A block's input and output hidden states must have one shape (..., hidden), got {tuple(inputs.shape)} "
            f"and {tuple(outputs.shape)}: depth pruning removes blocks that map hidden states to hidden states."
        )
    return inputs.detach().double(), outputs.detach().double()


def _cosine(inputs: Tensor, outputs: Tensor) -> Tensor:
    x, y = _check(inputs, outputs)
    return torch.cosine_similarity(x, y, dim=-1).clamp(-1.0, 1.0)


def block_influence(inputs: Tensor, outputs: Tensor) -> Tensor:
    """ShortGPT's Block Influence per token: ``1 - cos(x, y)`` of a block's input ``x`` and output ``y`` (float64).

    Example:
        >>> import torch
        >>> block_influence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).tolist()
        [1.0]
    """
    return 1.0 - _cosine(inputs, outputs)


def angular_distance(inputs: Tensor, outputs: Tensor) -> Tensor:
    """The angle between a block's input and output per token, over pi: ``arccos(cos(x, y)) / pi`` (float64).

    Example:
        >>> import torch
        >>> angular_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])).tolist()
        [1.0]
    """
    return torch.arccos(_cosine(inputs, outputs)) / math.pi


def relative_norm(inputs: Tensor, outputs: Tensor) -> Tensor:
    """The block's update relative to its input per token: ``||y - x|| / ||x||`` (float64; 0 where both are 0).

    Example:
        >>> import torch
        >>> relative_norm(torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]])).tolist()
        [1.0]
    """
    x, y = _check(inputs, outputs)
    update = torch.linalg.vector_norm(y - x, dim=-1)
    size = torch.linalg.vector_norm(x, dim=-1)
    return torch.where(update == 0, torch.zeros_like(update), update / size)


#: The block-importance scores by name.
BLOCK_SCORES: dict[str, BlockScore] = {
    "influence": block_influence,
    "angular": angular_distance,
    "relative_norm": relative_norm,
}


def build_block_score(score: str | BlockScore) -> BlockScore:
    """Resolve a block score given by name (:data:`BLOCK_SCORES`) or as a function ``score(inputs, outputs)``.

    Example:
        >>> build_block_score("influence") is block_influence
        True
        >>> build_block_score("cosine")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Unknown block `score` 'cosine'; expected one of ['angular', 'influence', 'relative_norm'] or a ...
    """
    if isinstance(score, str) and score in BLOCK_SCORES:
        return BLOCK_SCORES[score]
    if callable(score) and not isinstance(score, str):
        return score
    raise ValueError(
        f"Unknown block `score` {score!r}; expected one of {sorted(BLOCK_SCORES)} or a function score(inputs, outputs) "
        "returning one score per token."
    )
