"""Depth compaction: remove whole blocks from a model's repeated block list, for a shallower dense model.

:func:`remove_blocks` returns a copy of the model without the blocks at the given indices (found by
:func:`~lightning_prune.structures.depth.find_block_container`: ``layers`` of this package's GPT, Hugging Face
Llama/Qwen2's ``model.layers``, GPT-2's ``transformer.h``, BERT's ``encoder.layer``, an ``nn.TransformerEncoder``'s
``layers``). The copy computes what the model computes with those blocks bypassed
(:func:`~lightning_prune.structures.depth.skip_blocks`): each removed block's contribution is gone, nothing else
changes. The bookkeeping that counts or numbers the blocks is rewritten so the copy runs, saves and reloads as a
model of its new depth:

* every ``config`` of the model (Hugging Face's ``PretrainedConfig``, this package's
  :class:`~lightning_prune.models.GPTConfig`): ``num_hidden_layers`` (GPT-2's ``n_layer`` is an alias of it) and the
  per-layer list ``layer_types`` (Qwen2's sliding/full attention), so that ``save_pretrained`` +
  ``from_pretrained`` rebuild the shallower model (:func:`~lightning_prune.deploy.transformer.save_pretrained_compact`
  saves it, head widths included);
* the container's owner's ``num_layers`` (``nn.TransformerEncoder``/``Decoder``) or ``n_layer``/``num_hidden_layers``;
* ``layer_idx`` of every module in a kept block (Hugging Face attention, which indexes the key/value cache by it), so
  that the blocks are numbered 0, 1, ... as a fresh model of that depth numbers them.

A model whose blocks compute with their own index (GPT-2 with ``scale_attn_by_inverse_layer_idx=True`` scales
attention by ``1 / (layer_idx + 1)``) would change its function when renumbered, so it is refused.

Example:
    >>> import torch
    >>> from lightning_prune.models import GPT, GPTConfig
    >>> from lightning_prune.structures.depth import skip_blocks
    >>> model = GPT(GPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64))
    >>> small = remove_blocks(model, [1, 2])
    >>> len(small.layers), small.config.num_hidden_layers
    (2, 2)
    >>> x = torch.randint(0, 256, (1, 8))
    >>> with skip_blocks(model, [1, 2]):
    ...     bool(torch.allclose(small(x), model(x)))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from lightning_prune._helpers import is_int
from lightning_prune.structures.depth import count_blocks, find_block_container

__all__ = ["remove_blocks", "remove_blocks_"]

#: Attributes of a container's owner that count its blocks.
_COUNTS = ("num_layers", "n_layer", "num_hidden_layers")
#: Config fields that hold one entry per block.
_PER_LAYER = ("layer_types",)


def remove_blocks(model: nn.Module, indices: Sequence[int], blocks: str | None = None) -> nn.Module:
    """A copy of ``model`` without the blocks at ``indices``; ``model`` is left as it is.

    Args:
        model: the model (a Hugging Face ``PreTrainedModel``, this package's GPT, an ``nn.TransformerEncoder``, ...).
        indices: positions of the blocks to remove in the block list (e.g. from
            :meth:`~lightning_prune.oneshot.depth.BlockScores.least_important`).
        blocks: the blocks' container by name (``"model.layers"``); None to find it.

    Returns:
        The shallower model (see the module docstring for what is rewritten).

    Raises:
        ValueError: no repeated blocks, indices that are not blocks or repeat, removing every block, a container
            that is neither an ``nn.ModuleList`` nor an ``nn.Sequential``, or blocks that compute with their own
            index (GPT-2's ``scale_attn_by_inverse_layer_idx``).

    Example:
        >>> from torch import nn
        >>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        >>> encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        >>> small = remove_blocks(encoder, [0, 3])
        >>> len(small.layers), small.num_layers
        (2, 2)
    """
    container_name, container = find_block_container(model, blocks)
    _check_indices(container_name, count_blocks(container), indices)
    small = copy.deepcopy(model)
    return remove_blocks_(small, indices, container_name)


def remove_blocks_(model: nn.Module, indices: Sequence[int], blocks: str | None = None) -> nn.Module:
    """:func:`remove_blocks` in place: ``model`` itself loses the blocks (the network inside a ``LightningModule``
    before its optimizer is built). Returns ``model``.

    Raises:
        ValueError: as :func:`remove_blocks` (nothing is changed then).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)]))
        >>> len(remove_blocks_(net, [2])[1])
        2
    """
    container_name, container = find_block_container(model, blocks)
    total = count_blocks(container)
    _check_indices(container_name, total, indices)
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"The blocks' container {container_name!r} is a {type(container).__name__}; depth pruning rebuilds an "
            "nn.ModuleList or nn.Sequential. Name such a container with `blocks`."
        )
    removed = set(indices)
    kept = [i for i in range(total) if i not in removed]
    children = [child for child in container._modules.values() if child is not None]
    for new, old in enumerate(kept):
        if new != old:
            _check_renumbering(container_name, old, children[old])
    for new, old in enumerate(kept):
        for module in children[old].modules():
            if is_int(getattr(module, "layer_idx", None)) and module.layer_idx == old:
                setattr(module, "layer_idx", new)  # noqa: B010  (Hugging Face's untyped bookkeeping)
    # The container itself stays (its class, hooks and anything set on it); only its children change.
    container._modules = {str(new): children[old] for new, old in enumerate(kept)}
    owner_name, _, _ = container_name.rpartition(".")
    owner = model.get_submodule(owner_name) if container_name else None
    if owner is not None:
        for attr in _COUNTS:
            if is_int(getattr(owner, attr, None)) and getattr(owner, attr) == total:
                setattr(owner, attr, len(kept))
    for config in _configs(model):
        _rewrite_config(config, total, kept)
    for module in model.modules():  # Qwen2: whether any sliding-window layer is left
        if isinstance(getattr(module, "has_sliding_layers", None), bool) and hasattr(module, "config"):
            layer_types = getattr(module.config, "layer_types", None)
            if isinstance(layer_types, list):
                setattr(module, "has_sliding_layers", "sliding_attention" in layer_types)  # noqa: B010
    return model


def _check_indices(container: str, total: int, indices: Sequence[int]) -> None:
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
        raise ValueError(f"`indices` must be a non-empty list of block positions, got {indices!r}.")
    bad = [i for i in indices if not is_int(i) or not 0 <= i < total]
    if bad:
        raise ValueError(f"`indices` {bad} are not blocks of {container!r}: it holds {total} (0 to {total - 1}).")
    if len(set(indices)) != len(indices):
        raise ValueError(f"`indices` {list(indices)} repeat a block: give each block to remove once.")
    if len(indices) >= total:
        raise ValueError(
            f"`indices` {sorted(indices)} would remove all {total} blocks of {container!r}: at least one must stay."
        )


def _check_renumbering(container: str, old: int, block: nn.Module) -> None:
    for name, module in block.named_modules():
        if getattr(module, "scale_attn_by_inverse_layer_idx", False) is True:
            raise ValueError(
                f"Block {old} of {container!r} computes with its own index ({type(module).__name__} "
                f"{name or 'itself'} has scale_attn_by_inverse_layer_idx=True: attention scaled by 1 / (layer_idx + "
                "1)), so it would compute something else once renumbered. Remove only blocks after the last one "
                "kept, or use a model built with scale_attn_by_inverse_layer_idx=False."
            )


def _configs(model: nn.Module) -> list[object]:
    """Every distinct ``config`` object of ``model``'s modules."""
    found: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and not isinstance(config, (int, float, str, bool)):
            found.setdefault(id(config), config)
    return list(found.values())


def _rewrite_config(config: object, total: int, kept: list[int]) -> None:
    if is_int(getattr(config, "num_hidden_layers", None)) and config.num_hidden_layers == total:  # type: ignore[attr-defined]
        config.num_hidden_layers = len(kept)  # type: ignore[attr-defined]
    for attr in _PER_LAYER:
        values = getattr(config, attr, None)
        if isinstance(values, (list, tuple)) and len(values) == total:
            setattr(config, attr, type(values)(values[i] for i in kept))
