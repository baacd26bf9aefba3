"""Transformer compaction: remove pruned attention heads and MLP neurons for a smaller dense model.

:func:`compact_heads` takes the masks of a :class:`~lightning_prune.structures.heads.HeadStructure` and returns a
copy of the model whose projections hold only the kept heads and neurons, with each module's head bookkeeping
(``num_heads``, ``num_kv_heads``, ``num_key_value_groups``, GPT-2's ``split_size``, BERT's ``all_head_size``) rewritten,
so its outputs equal the masked model's. :func:`save_pretrained_compact` saves a Hugging Face model whose layers were
pruned alike with ``save_pretrained``, its config rewritten (``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``), so that ``from_pretrained`` reloads it; layers of different widths reload through
:func:`~lightning_prune.deploy.compact.load_compact`.

Example:
    >>> import torch
    >>> from lightning_prune.criteria import build_importance
    >>> from lightning_prune.models import GPT, GPTConfig
    >>> from lightning_prune.structures import HeadStructure
    >>> model = GPT(GPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    >>> structure = HeadStructure()
    >>> masks = structure.bind(model)
    >>> structure.prune_(masks, build_importance("l2"), 0.5, scope="layer")
    >>> small = compact_heads(model, masks)
    >>> small.layer_widths()
    [{'num_heads': 2, 'num_kv_heads': 2, 'head_dim': 8, 'intermediate_size': 32}]
    >>> x = torch.randint(0, 256, (1, 8))
    >>> bool(torch.allclose(small(x), model(x), atol=1e-5))
    True
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.masks.maskset import MaskSet
from lightning_prune.structures.heads import HeadMaskSet, UnitGroup

__all__ = ["compact_heads", "pretrained_config_widths", "save_pretrained_compact"]


@torch.no_grad()
def compact_heads(model: nn.Module, masks: MaskSet) -> nn.Module:
    """A copy of ``model`` without the heads and neurons that ``masks`` prune; ``model`` is left as it is.

    Args:
        model: the model the masks were bound to (:meth:`HeadStructure.bind`), pruned weights zero, or a submodule
            holding every masked parameter (the network inside the ``LightningModule`` a ``PruningCallback``
            pruned: ``compact_heads(module.model, callback.masks)``).
        masks: the :class:`~lightning_prune.structures.heads.HeadMaskSet`.

    Returns:
        The smaller dense model: same outputs, fewer parameters.

    Raises:
        TypeError: ``masks`` are not head masks.
        ValueError: the masks are not ``model``'s, or a layout whose head count cannot shrink in place
            (``nn.MultiheadAttention`` checks ``num_heads * head_dim == embed_dim``): ignore its attention or prune
            its neurons only.
    """
    if not isinstance(masks, HeadMaskSet):
        raise TypeError(f"`masks` must be a HeadMaskSet (from HeadStructure.bind), got {type(masks).__name__}.")
    prefix = _prefix(model, masks)
    cut = len(prefix)
    for unit in masks.units:
        if unit.style == "mha" and not bool(masks.kept(unit.group).all()):
            raise ValueError(
                f"nn.MultiheadAttention {unit.group.name!r} has pruned heads, but it requires num_heads * head_dim == "
                "embed_dim, so its heads cannot be removed in place. Keep its heads (HeadStructure(units='neurons') or "
                "`ignore` it); its zeroed heads stay as zeros."
            )
    small = copy.deepcopy(model)
    small_params = dict(small.named_parameters())
    modules = dict(small.named_modules())
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    kept_units: dict[str, Tensor] = {}
    for unit in masks.units:
        kept = masks.kept(unit.group)
        kept_units[unit.group.name[cut:]] = kept
        for s in unit.group.slices:
            removed[(s.param[cut:], s.dim)].update(s.index[~kept[s.root]].tolist())
    for (name, dim), drop in removed.items():
        if not drop:
            continue
        param = small_params[name]
        keep = torch.tensor([i for i in range(param.shape[dim]) if i not in drop], dtype=torch.long)
        owner_name, _, attr = name.rpartition(".")
        owner = modules[owner_name]
        new = nn.Parameter(param.detach().index_select(dim, keep.to(param.device)).clone(), param.requires_grad)
        setattr(owner, attr, new)
    for m in small.modules():
        _refresh_widths(m)
    for unit in masks.units:
        _rewrite_heads(unit, modules[unit.group.name[cut:]], kept_units[unit.group.name[cut:]])
    return small


def _prefix(model: nn.Module, masks: MaskSet) -> str:
    """The prefix of the masks' names that ``model``'s parameter names lack (``"model."`` for the network inside a
    LightningModule; ``""`` when the masks are the model's own)."""
    named = dict(model.named_parameters())
    first = masks.names[0]
    parts = first.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[:i]) + "." if i else ""
        if all(n.startswith(prefix) and named.get(n[len(prefix) :]) is p for n, p in zip(masks.names, masks.params)):
            return prefix
    strangers = [n for n, p in zip(masks.names, masks.params) if named.get(n) is not p]
    raise ValueError(f"The masks are not this model's: {strangers[:3]} are not its parameters.")


def _refresh_widths(m: nn.Module) -> None:
    """A layer's width attributes from its (possibly sliced) weight."""
    weight = getattr(m, "weight", None)
    if not isinstance(weight, Tensor):
        return
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = int(weight.shape[0]), int(weight.shape[1])
    elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
        _set(m, nf=int(weight.shape[1]))
        if hasattr(m, "nx"):
            _set(m, nx=int(weight.shape[0]))


def _rewrite_heads(unit: UnitGroup, m: nn.Module, kept: Tensor) -> None:
    """Rewrite the head bookkeeping of an attention module after its heads were removed."""
    if unit.kind != "heads":
        return
    units_left = int(kept.sum())
    if unit.query_units:
        heads, kv = units_left, unit.num_kv_heads
    else:
        heads, kv = units_left * unit.per_unit, units_left * unit.num_kv_heads // unit.group.channels
    if unit.style == "qkvo":
        for attr, value in (("num_heads", heads), ("num_kv_heads", kv), ("num_key_value_heads", kv)):
            if hasattr(m, attr):
                setattr(m, attr, value)
        if hasattr(m, "num_key_value_groups"):
            _set(m, num_key_value_groups=heads // kv)
    elif unit.style == "gpt2":
        _set(m, num_heads=heads, split_size=heads * unit.head_dim)
    elif unit.style == "bert":
        _set(getattr(m, "self"), num_attention_heads=heads, all_head_size=heads * unit.head_dim)  # noqa: B009


def _set(m: object, **values: int) -> None:
    """Set plain attributes (Hugging Face modules' untyped bookkeeping)."""
    for attr, value in values.items():
        setattr(m, attr, value)


def pretrained_config_widths(model: nn.Module, masks: MaskSet | None = None) -> dict[str, int]:
    """The Hugging Face config fields a compact model's widths set, when every layer has the same widths.

    Reads the layers of ``model`` (a compact model from :func:`compact_heads`): attention modules with
    ``q_proj``/``k_proj`` and a ``head_dim``, gated MLPs; returns ``num_attention_heads``, ``num_key_value_heads`` and
    ``intermediate_size`` for what it found.

    Raises:
        ValueError: layers of different widths (a config holds one width for all layers; save with
            :func:`~lightning_prune.deploy.compact.save_compact` and reload with ``load_compact``).
    """
    heads, kv, inter = set(), set(), set()
    for m in model.modules():
        q, k = getattr(m, "q_proj", None), getattr(m, "k_proj", None)
        d = getattr(m, "head_dim", None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(d, int):
            heads.add(q.out_features // d)
            kv.add(k.out_features // d)
        for up_name in ("up_proj", "fc1"):
            up = getattr(m, up_name, None)
            if isinstance(up, nn.Linear) and isinstance(getattr(m, "down_proj", getattr(m, "fc2", None)), nn.Linear):
                inter.add(up.out_features)
    uneven = {n: sorted(v) for n, v in (("heads", heads), ("key/value heads", kv), ("MLP widths", inter)) if len(v) > 1}
    if uneven:
        raise ValueError(
            f"The layers have different widths ({uneven}); a Hugging Face config holds one width for all layers. Save "
            "with lightning_prune.save_compact and reload with load_compact, or prune with scope='layer' for uniform "
            "widths."
        )
    widths: dict[str, int] = {}
    if heads:
        widths["num_attention_heads"] = heads.pop()
        widths["num_key_value_heads"] = kv.pop()
    if inter:
        widths["intermediate_size"] = inter.pop()
    return widths


def save_pretrained_compact(model: Any, path: str | Path, **kwargs: Any) -> Path:
    """Save a compact Hugging Face model with ``save_pretrained``, its config rewritten to its widths.

    The config's ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size`` (and ``head_dim``, kept as it
    was) are set from the layers, so ``AutoModel.from_pretrained(path)`` rebuilds the compact model. Every layer must
    have the same widths (:func:`pretrained_config_widths`). A model that lost whole blocks
    (:func:`~lightning_prune.deploy.depth.remove_blocks`) already has its ``num_hidden_layers`` (and ``layer_types``)
    rewritten, so it saves here too, before or after its heads were compacted.

    Args:
        model: a ``transformers.PreTrainedModel`` from :func:`compact_heads`.
        path: the folder to write.
        kwargs: passed to ``save_pretrained``.

    Returns:
        The folder.

    Raises:
        TypeError: ``model`` has no ``save_pretrained`` and ``config``.
        ValueError: layers of different widths.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"`model` must be a Hugging Face PreTrainedModel (with `config` and `save_pretrained`), got "
            f"{type(model).__name__}. Save other models with lightning_prune.save_compact."
        )
    widths = pretrained_config_widths(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for key, value in widths.items():
        setattr(config, key, value)
    if "num_attention_heads" in widths:
        config.head_dim = head_dim  # keep the head width: it no longer follows hidden_size // num_attention_heads
    path = Path(path)
    model.save_pretrained(path, **kwargs)
    return path
