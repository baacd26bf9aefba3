"""Block importance over calibration data: the score of every repeated block, for depth pruning.

:func:`score_blocks` runs the model on calibration batches (read as :mod:`~lightning_prune.oneshot.blocks`
describes), records each block's input and output hidden states with hooks, and averages a
:mod:`~lightning_prune.criteria.depth` score over every calibration token (padding included). Under
``torch.distributed`` the sums are added over the processes, so every process gets the scores of all the samples.
:func:`~lightning_prune.structures.depth.select_blocks` then picks the least important blocks and
:func:`~lightning_prune.deploy.depth.remove_blocks` removes them.

Example:
    >>> import torch
    >>> from lightning_prune.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64))
    >>> scores = score_blocks(model, [torch.randint(0, 256, (2, 16))])
    >>> scores.names, scores.tokens
    (['layers.0', 'layers.1', 'layers.2', 'layers.3'], 32)
    >>> len(scores.least_important(2))
    2
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._helpers import eval_mode, text_table
from lightning_prune.criteria.depth import BlockScore, build_block_score
from lightning_prune.masks.distributed import all_reduce_sum_
from lightning_prune.oneshot.blocks import ForwardFn, call_model, iterate_batches
from lightning_prune.structures.depth import find_block_container, select_blocks

__all__ = ["BlockScores", "score_blocks"]


@dataclass(frozen=True)
class BlockScores:
    """The importance of each block over the calibration tokens.

    Attributes:
        container: the qualified name of the blocks' container (``"model.layers"``).
        names: each block's qualified name, in order.
        scores: each block's mean score (float64), higher meaning more important.
        tokens: how many tokens (hidden-state vectors per block) the means are over, all processes together.
        score: the score's name (or the function's).
    """

    container: str
    names: list[str]
    scores: Tensor
    tokens: int
    score: str

    def least_important(self, num_blocks: int | float) -> list[int]:
        """The indices of the ``num_blocks`` lowest-scored blocks, ascending (see
        :func:`~lightning_prune.structures.depth.select_blocks`)."""
        return select_blocks(self.scores, num_blocks)

    def table(self, removed: Sequence[int] = ()) -> str:
        """A plain-text table of the blocks, their scores and ranks, marking ``removed``."""
        ranks = torch.argsort(torch.argsort(self.scores, stable=True), stable=True)
        rows = [("block", self.score, "rank (0 = least important)", "removed")]
        for i, name in enumerate(self.names):
            rows.append((name, f"{float(self.scores[i]):.6f}", str(int(ranks[i])), "yes" if i in removed else ""))
        return text_table(rows, f"Block importance ({self.score}, {self.tokens} tokens)")


class _Accumulator:
    """Hooks on every block that add its per-token scores to a running sum."""

    def __init__(self, blocks: list[nn.Module], score: BlockScore, names: list[str]) -> None:
        self.score, self.names = score, names
        self.sums = torch.zeros(len(blocks), dtype=torch.float64)
        self.counts = torch.zeros(len(blocks), dtype=torch.float64)
        self.inputs: dict[int, Tensor] = {}
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post(i), with_kwargs=True))

    def _pre(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, Tensor):
                raise ValueError(
                    f"Block {self.names[index]!r} was called without its hidden states as the first positional "
                    "argument or the `hidden_states` keyword, so its input cannot be scored. Pass `blocks` naming "
                    "another container."
                )
            self.inputs[index] = hidden.detach()

        return hook

    def _post(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            hidden = self.inputs.pop(index)
            if not isinstance(out, Tensor) or out.shape != hidden.shape:
                got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"Block {self.names[index]!r} returned {got} for hidden states of shape {tuple(hidden.shape)}: "
                    "depth pruning removes blocks that map hidden states to hidden states of the same shape."
                )
            values = self.score(hidden, out.detach())
            self.sums[index] += float(values.double().sum())
            self.counts[index] += values.numel()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def score_blocks(
    model: nn.Module,
    dataloader: Iterable[Any],
    score: str | BlockScore = "influence",
    blocks: str | None = None,
    num_samples: int | None = 128,
    forward_fn: ForwardFn | None = None,
    device: torch.device | str | None = None,
) -> BlockScores:
    """The mean importance of each of ``model``'s repeated blocks over calibration batches.

    The model runs in eval mode (dropout off), whole, on each batch; every block's input and output hidden states
    are scored as they pass (a block's input is the previous block's output).

    Args:
        model: the model, on its compute device.
        dataloader: calibration batches: tensors, ``(inputs, targets)`` tuples or dicts (``input_ids``, ...), all of
            one shape but for the batch dimension. Under ``torch.distributed`` each process passes its own share.
        score: ``"influence"`` (ShortGPT's Block Influence), ``"angular"``, ``"relative_norm"`` (see
            :mod:`~lightning_prune.criteria.depth`) or a function ``score(inputs, outputs)`` giving one score per
            token.
        blocks: the blocks' container by name (``"model.layers"``); None to find it
            (:func:`~lightning_prune.structures.depth.find_block_container`).
        num_samples: calibration samples (per process); None for every batch.
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch (default:
            :func:`~lightning_prune.oneshot.blocks.call_model`).
        device: where the batches go; None for the device of the model's first parameter.

    Returns:
        The :class:`BlockScores`.

    Raises:
        ValueError: an unknown score, no repeated blocks, an empty loader or batches of other shapes, a block
            whose output is not hidden states of its input's shape, or a model that never called its blocks.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> with torch.no_grad():
        ...     _ = net[1].weight.copy_(torch.eye(4)), net[1].bias.zero_()  # block 1 is the identity
        >>> found = score_blocks(net, [torch.randn(8, 4)])
        >>> round(float(found.scores[1]), 9), found.least_important(1)
        (0.0, [1])
    """
    function = build_block_score(score)
    name = score if isinstance(score, str) else getattr(score, "__name__", type(score).__name__)
    container_name, container = find_block_container(model, blocks)
    named = [(n, m) for n, m in container._modules.items() if m is not None]
    names = [f"{container_name}.{n}" if container_name else n for n, _ in named]
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    run = forward_fn or call_model
    accumulator = _Accumulator([module for _, module in named], function, names)
    try:
        with eval_mode(model):
            for batch, _ in iterate_batches(dataloader, num_samples, torch.device(device)):
                run(model, batch)
    finally:
        accumulator.remove()
    sums = torch.stack([accumulator.sums, accumulator.counts])
    all_reduce_sum_(sums)
    if bool((sums[1] == 0).any()):
        missing = [names[i] for i in range(len(names)) if sums[1, i] == 0]
        raise ValueError(
            f"The model never called blocks {missing} on the calibration batches, so they cannot be scored. Check "
            "`blocks` (the container of the blocks the model runs) or `forward_fn`."
        )
    return BlockScores(container_name, names, sums[0] / sums[1], int(sums[1, 0]), str(name))
