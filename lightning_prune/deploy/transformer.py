"""Transformer compaction: remove pruned attention heads and MLP neurons for a smaller dense model.

:func:`compact_heads` takes the masks of a :class:`~lightning_prune.structures.heads.HeadStructure` and returns a
copy of the model whose projections hold only the kept heads and neurons, with each module's head bookkeeping
(``num_heads``, ``num_kv_heads``, ``num_key_value_groups``, GPT-2's ``split_size``, BERT's ``all_head_size``, LitGPT's
``config.n_head``, ``config.n_query_groups`` and ``config.intermediate_size``) rewritten, so its outputs equal the
masked model's. :func:`save_pretrained_compact` saves a Hugging Face model whose layers were
pruned alike with ``save_pretrained``, its config rewritten (``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``), so that ``from_pretrained`` reloads it; :func:`save_litgpt_compact` does the same for LitGPT's
``GPT`` (``model_config.yaml`` with ``n_head``, ``n_query_groups``, ``intermediate_size``, and ``lit_model.pth``);
layers of different widths reload through :func:`~lightning_prune.deploy.compact.load_compact`. Pruned
mixture-of-experts models save the same way (:mod:`lightning_prune.deploy.experts`).

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
import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._files import atomic_save, atomic_write_text
from lightning_prune._helpers import is_int
from lightning_prune.deploy.attention import CompactMultiheadAttention
from lightning_prune.deploy.compact import _config_widths, _set_config_widths
from lightning_prune.deploy.window_attention import CompactRelativeAttention, CompactShiftedWindowAttention
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.structures.heads import HeadMaskSet
from lightning_prune.structures.units import UnitGroup

__all__ = [
    "compact_heads",
    "compact_zero_heads",
    "expert_counts",
    "litgpt_config_widths",
    "pretrained_config_widths",
    "save_litgpt_compact",
    "save_pretrained_compact",
]


@torch.no_grad()
def compact_zero_heads(model: nn.Module, ignore: Sequence[str] = ()) -> nn.Module | None:
    """A copy of ``model`` without the attention heads and MLP neurons whose every entry is zero, or ``None`` when
    ``model`` has no attention heads (:func:`~lightning_prune.structures.units.find_units`) or none of its heads and
    neurons is all zero. ``model`` is left as it is.

    What :func:`compact_heads` does without the masks: for a model whose pruning masks are gone (a checkpoint's
    weights, a model pruned elsewhere). A unit goes only when all its weights and biases are zero (query, key and
    value rows and output columns of a head; gate, up rows and down column of a neuron), so the outputs stay the
    same. Units are bound with ``HeadStructure()``'s defaults: under grouped-query attention a key/value head goes
    with every query head that shares it. ``ignore``: module-name patterns left whole.

    Example:
        >>> from lightning_prune.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
        >>> mlp = model.layers[0].mlp
        >>> for w in (mlp.gate_proj.weight[:16], mlp.up_proj.weight[:16], mlp.down_proj.weight[:, :16]):
        ...     _ = w.data.zero_()
        >>> compact_zero_heads(model).layer_widths()
        [{'num_heads': 4, 'num_kv_heads': 4, 'head_dim': 8, 'intermediate_size': 48}]
    """
    from lightning_prune.structures.heads import HeadStructure

    try:
        masks = HeadStructure().bind(model, ignore)
    except ValueError:  # no attention and no MLP this structure knows
        return None
    if not any(u.kind == "heads" for u in masks.units):
        return None
    for param, mask in zip(masks.params, masks.masks):
        mask.copy_(param.detach() != 0)
    if all(bool(masks.kept(u.group).all()) for u in masks.units):
        return None
    return compact_heads(model, masks)


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
        ValueError: the masks are not ``model``'s.

    An ``nn.MultiheadAttention`` with pruned heads cannot shrink in place (it requires ``num_heads * head_dim ==
    embed_dim``): it is replaced by a :class:`~lightning_prune.deploy.attention.CompactMultiheadAttention` with the
    kept heads, the same ``embed_dim`` and ``head_dim``; an ``nn.TransformerEncoder`` holding one no longer takes the
    nested-tensor fast path (outputs at padded positions are then computed, not zeros). torchvision's Swin (v1, v2)
    and MaxViT attention derive the head width from the residual width, so they are replaced alike, by
    :class:`~lightning_prune.deploy.window_attention.CompactShiftedWindowAttention` and
    :class:`~lightning_prune.deploy.window_attention.CompactRelativeAttention`.
    :func:`~lightning_prune.deploy.compact.load_compact` rebuilds all three.
    """
    if not isinstance(masks, HeadMaskSet):
        raise TypeError(f"`masks` must be a HeadMaskSet (from HeadStructure.bind), got {type(masks).__name__}.")
    prefix = _prefix(model, masks)
    cut = len(prefix)
    small = copy.deepcopy(model)
    small_params = dict(small.named_parameters())
    modules = dict(small.named_modules())
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    kept_units: dict[str, Tensor] = {}
    for unit in masks.units:
        kept = masks.kept(unit.group)
        kept_units[unit.group.name[cut:]] = kept
        if unit.style in _COMPACT_MODULES:
            continue  # replaced as a whole below
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
    layer_widths = {n: w for n, m in small.named_modules() if (w := _litgpt_widths(m))}
    for unit in masks.units:
        name = unit.group.name[cut:]
        _rewrite_heads(unit, modules[name], kept_units[name])
        if unit.style in _COMPACT_MODULES and not bool(kept_units[name].all()):
            small.set_submodule(
                name, _COMPACT_MODULES[unit.style].from_attention(modules[name], _indices(kept_units[name]))
            )
    _rewrite_litgpt_configs(small, layer_widths)
    for m in small.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(layer, nn.Module) and isinstance(getattr(layer, "self_attn", None), CompactMultiheadAttention)
            for layer in m.layers
        ):
            m.use_nested_tensor = False  # the nested-tensor path runs PyTorch's fused kernels, which need full heads
    return small


#: Attention layouts whose head count cannot shrink in place, and the compact module each becomes.
_COMPACT_MODULES: dict[str, Any] = {
    "mha": CompactMultiheadAttention,
    "swin": CompactShiftedWindowAttention,
    "maxvit": CompactRelativeAttention,
}


def _indices(kept: Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(kept).flatten()]


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
    """Rewrite the head bookkeeping of an attention module after its heads were removed, or the stored width of an
    MLP after its neurons were."""
    if unit.kind != "heads":
        if is_int(vars(m).get("intermediate_size")):  # a stored width (LitGPT's MLPs), not a property
            _set(m, intermediate_size=int(kept.sum()))
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


def _litgpt_widths(m: nn.Module) -> dict[str, int]:
    """The LitGPT config fields that ``m``'s weights set: ``n_head`` and ``n_query_groups`` of an attention module
    (fused ``qkv`` and ``proj``), ``intermediate_size`` of an MLP built with its config's width (a mixture-of-experts
    expert has its own); empty for other modules."""
    config = _config_widths(m)
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    if not config or not isinstance(proj, nn.Linear):
        return {}
    if isinstance(qkv, nn.Linear):
        litgpt_config: Any = m.config
        d = int(litgpt_config.head_size)
        return {"n_head": proj.in_features // d, "n_query_groups": (qkv.out_features - proj.in_features) // (2 * d)}
    if getattr(m, "intermediate_size", None) == config.get("intermediate_size"):
        return {"intermediate_size": proj.in_features}
    return {}


def _rewrite_litgpt_configs(model: nn.Module, layer_widths: dict[str, dict[str, int]]) -> None:
    """Write the widths of LitGPT's layers into their configs: when every layer has the same, into the config they
    share (the model's, so that ``GPT(model.config)`` builds the compact model); otherwise each attention module and
    MLP gets a copy with its own widths, and the model's config keeps the original ones."""
    if not layer_widths:
        return
    values: dict[str, set[int]] = defaultdict(set)
    for widths in layer_widths.values():
        for field, value in widths.items():
            values[field].add(value)
    modules = dict(model.named_modules())
    if all(len(v) == 1 for v in values.values()):
        uniform = {field: next(iter(v)) for field, v in values.items()}
        for config in {id(m.config): m.config for m in modules.values() if _config_widths(m)}.values():
            for field, value in uniform.items():
                setattr(config, field, value)
        return
    copies: dict[tuple[int, tuple], Any] = {}
    for name, widths in layer_widths.items():
        _set_config_widths(modules[name], widths, copies)


def _set(m: object, **values: int) -> None:
    """Set plain attributes (Hugging Face modules' untyped bookkeeping)."""
    for attr, value in values.items():
        setattr(m, attr, value)


def expert_counts(model: nn.Module) -> list[int]:
    """The number of experts of every fused MoE expert module of ``model`` (``gate_up_proj`` ``[E, 2*I, hidden]``), in
    module order.

    Example:
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> config = MixtralConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        ...                        num_key_value_heads=1, num_local_experts=4, vocab_size=32)
        >>> expert_counts(MixtralForCausalLM(config))
        [4, 4]
    """
    counts = []
    for m in model.modules():
        gate_up = getattr(m, "gate_up_proj", None)
        if (
            isinstance(gate_up, nn.Parameter)
            and gate_up.dim() == 3
            and isinstance(getattr(m, "down_proj", None), Tensor)
        ):
            counts.append(int(gate_up.shape[0]))
    return counts


def pretrained_config_widths(model: nn.Module, masks: MaskSet | None = None) -> dict[str, int]:
    """The Hugging Face config fields a compact model's widths set, when every layer has the same widths.

    Reads the layers of ``model`` (a compact model from :func:`compact_heads`): attention modules with
    ``q_proj``/``k_proj`` and a ``head_dim``, gated MLPs, fused mixture-of-experts weights (from
    :func:`~lightning_prune.deploy.experts.compact_experts`); returns ``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size`` and ``num_experts`` (Mixtral's ``num_local_experts``, through its config's attribute map) for
    what it found.

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
    experts = set(expert_counts(model))
    _check_uniform(
        {"heads": heads, "key/value heads": kv, "MLP widths": inter, "experts": experts}, "a Hugging Face config"
    )
    widths: dict[str, int] = {}
    if heads:
        widths["num_attention_heads"] = heads.pop()
        widths["num_key_value_heads"] = kv.pop()
    if inter:
        widths["intermediate_size"] = inter.pop()
    if experts:
        widths["num_experts"] = experts.pop()
    return widths


def _check_uniform(widths: dict[str, set[int]], holder: str) -> None:
    uneven = {n: sorted(v) for n, v in widths.items() if len(v) > 1}
    if uneven:
        raise ValueError(
            f"The layers have different widths ({uneven}); {holder} holds one width for all layers. Save "
            "with lightning_prune.save_compact and reload with load_compact, or prune with scope='layer' for uniform "
            "widths."
        )


def litgpt_config_widths(model: nn.Module) -> dict[str, int]:
    """The LitGPT ``Config`` fields a compact LitGPT ``GPT``'s widths set, when every layer has the same widths.

    Reads the weights of ``model``'s attention modules (``n_head``, ``n_query_groups``) and MLPs
    (``intermediate_size``); ``head_size`` and ``n_embd`` never change.

    Raises:
        ValueError: layers of different widths (save with :func:`~lightning_prune.deploy.compact.save_compact` and
            reload with ``load_compact``).

    Example (with the ``litgpt`` extra; ``compact_heads`` left every layer 2 heads, 1 key/value head, 32 neurons):
        >>> litgpt_config_widths(small)  # doctest: +SKIP
        {'n_head': 2, 'n_query_groups': 1, 'intermediate_size': 32}
    """
    values: dict[str, set[int]] = defaultdict(set)
    for m in model.modules():
        for field, value in _litgpt_widths(m).items():
            values[field].add(value)
    labels = {"n_head": "heads", "n_query_groups": "key/value heads", "intermediate_size": "MLP widths"}
    _check_uniform({labels[f]: v for f, v in values.items()}, "a LitGPT config")
    return {f: next(iter(values[f])) for f in labels if f in values}


def save_litgpt_compact(model: nn.Module, path: str | Path) -> Path:
    """Save a compact LitGPT ``GPT`` the way LitGPT saves checkpoints: ``model_config.yaml`` (its ``Config`` with
    ``n_head``, ``n_query_groups`` and ``intermediate_size`` set from the layers) and ``lit_model.pth`` (the state
    dict), so that ``GPT(Config.from_file(path / "model_config.yaml"))`` rebuilds it and ``load_state_dict`` fills
    it. Every layer must have the same widths (:func:`litgpt_config_widths`).

    Args:
        model: a LitGPT ``GPT`` from :func:`compact_heads`.
        path: the folder to write.

    Returns:
        The folder.

    Raises:
        TypeError: ``model`` has no LitGPT ``config``.
        ValueError: layers of different widths, or pruned mixture-of-experts experts (whose widths the config does
            not hold per layer).

    Example (with the ``litgpt`` extra; ``small = compact_heads(model, masks)`` after pruning half of every layer
    of a LitGPT ``GPT`` with 4 heads sharing 2 key/value heads and 64 neurons, as in the README):
        >>> folder = save_litgpt_compact(small, "out/compact")  # doctest: +SKIP
        >>> reloaded = GPT(litgpt.Config.from_file(folder / "model_config.yaml"))  # doctest: +SKIP
        >>> reloaded.load_state_dict(torch.load(folder / "lit_model.pth"))  # doctest: +SKIP
        <All keys matched successfully>
        >>> reloaded.config.n_head, reloaded.config.n_query_groups, reloaded.config.intermediate_size  # doctest: +SKIP
        (2, 1, 32)
    """
    config = getattr(model, "config", None)
    if not _config_widths(model) or not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(
            f"`model` must be LitGPT's GPT (with a litgpt.Config as `config`), got {type(model).__name__}. Save "
            "Hugging Face models with save_pretrained_compact and others with lightning_prune.save_compact."
        )
    import yaml

    config = copy.copy(config)
    for field, value in litgpt_config_widths(model).items():
        setattr(config, field, value)
    with torch.device("meta"):  # shapes only, no memory
        rebuilt = {k: tuple(v.shape) for k, v in type(model)(config).state_dict().items()}
    misfits = [k for k, v in model.state_dict().items() if rebuilt.get(k) != tuple(v.shape)]
    if misfits:
        raise ValueError(
            f"A {type(model).__name__} built from the rewritten config would not fit these weights: {misfits[:3]}: "
            "the config holds one width for all layers of a kind (mixture-of-experts experts are not rewritten). "
            "Save with lightning_prune.save_compact and reload with load_compact."
        )
    folder = Path(path)
    atomic_write_text(folder / "model_config.yaml", yaml.dump(dataclasses.asdict(config)))
    atomic_save(model.state_dict(), folder / "lit_model.pth")
    return folder


def save_pretrained_compact(model: Any, path: str | Path, **kwargs: Any) -> Path:
    """Save a compact Hugging Face model with ``save_pretrained``, its config rewritten to its widths.

    The config's ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size`` (and ``head_dim``, kept as it
    was) and, for a mixture of experts, its expert count are set from the layers, so
    ``AutoModel.from_pretrained(path)`` rebuilds the compact model. Every layer must have the same widths
    (:func:`pretrained_config_widths`). A model that lost whole blocks
    (:func:`~lightning_prune.deploy.depth.remove_blocks`) already has its ``num_hidden_layers`` (and ``layer_types``)
    rewritten, so it saves here too, before or after its heads were compacted.

    Args:
        model: a ``transformers.PreTrainedModel`` from :func:`compact_heads` or
            :func:`~lightning_prune.deploy.experts.compact_experts`.
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
