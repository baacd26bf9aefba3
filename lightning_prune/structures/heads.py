"""Transformer pruning: whole attention heads (grouped-query attention included) and MLP hidden neurons.

:class:`HeadStructure` finds the attention and MLP modules of a transformer by their shape, not by their class:

* attention with ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` linear layers (this package's
  :class:`~lightning_prune.models.gpt.GPT`, Hugging Face Llama, Qwen2, Mistral and their kind), with grouped-query
  attention read from the projections' widths;
* LitGPT's ``CausalSelfAttention``: one fused ``qkv`` linear layer (every query head's rows, then every key head's,
  then every value head's) and ``proj``, grouped-query attention included, head width from its ``config.head_size``;
* ``nn.MultiheadAttention`` (``nn.TransformerEncoder``/``Decoder`` layers, torchvision's ViT), packed
  ``in_proj_weight`` or separate ``q/k/v_proj_weight`` (``kdim``/``vdim``), with ``bias_k``/``bias_v``;
* torchvision's Swin attention, v1 and v2 (fused ``qkv``, ``proj``, a per-head relative position bias table, or
  v2's ``logit_scale`` and the last layer of its ``cpb_mlp``), and MaxViT's (``to_qkv``, ``merge``, a per-head
  table);
* Hugging Face GPT-2 attention (``c_attn`` and ``c_proj``, transposed ``Conv1D``) and BERT attention (``self.query``,
  ``self.key``, ``self.value`` and ``output.dense``);
* MLPs: gated (``gate_proj``, ``up_proj``, ``down_proj``), ``linear1``/``linear2`` (PyTorch's transformer layers),
  ``c_fc``/``c_proj`` (GPT-2), ``intermediate.dense``/``output.dense`` (BERT), LitGPT's ``LLaMAMLP``/``GemmaMLP``
  (gated ``fc_1``, ``fc_2``, ``proj``) and ``GptNeoxMLP`` (``fc``, ``proj``), and any ``nn.Sequential`` of two linear
  layers with only activations and dropout between them (torchvision's ``MLPBlock`` and ``MLP``, MaxViT's
  ``mlp_layer``). Nothing inside an attention module is a unit of its own (Swin v2's position-bias MLP).

Each becomes a :class:`~lightning_prune.masks.channels.ChannelGroup` whose units are heads or neurons: a head owns its
query, key and value rows (and biases) and its output-projection columns; a neuron owns its gate and up rows (fc
row) and its down-projection column. Under grouped-query attention (``num_kv_heads`` < ``num_heads``) a unit is, by
default, a key/value head together with every query head that shares it (``gqa="kv"``), so the ratio stays valid;
``gqa="query"`` removes query heads instead, the same number from every group. The masks are ordinary masks, so
schedules, criteria, resume and DDP apply unchanged; :mod:`lightning_prune.deploy.transformer` then removes the pruned
units for a smaller dense model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.criteria import build_importance
    >>> layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32)
    >>> structure = HeadStructure()
    >>> masks = structure.bind(layer)
    >>> [g.name for g in masks.groups], [g.channels for g in masks.groups]
    (['', 'self_attn'], [32, 4])
    >>> structure.prune_(masks, build_importance("l2"), 0.5, scope="layer")
    >>> structure.layer_sparsity(masks)
    {'': 0.5, 'self_attn': 0.5}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_prune._helpers import is_int, text_table
from lightning_prune.criteria.base import Importance
from lightning_prune.criteria.magnitude import LpNormImportance
from lightning_prune.masks.channels import ChannelGroup, ChannelMaskSet, ChannelSlice
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.masks.params import check_patterns, hf_conv1d_type, name_matches
from lightning_prune.structures._patterns import single_target
from lightning_prune.structures.base import Scope, Structure, Target, check_sparsity, layer_targets

__all__ = ["GQA", "HeadStructure", "Unit", "UnitGroup", "find_units"]

#: How grouped-query attention is pruned: ``"kv"`` removes a key/value head with all the query heads that share
#: it; ``"query"`` removes query heads, the same number from every group.
GQA = Literal["kv", "query"]
#: What a group's units are.
Unit = Literal["heads", "neurons"]


@dataclass(frozen=True)
class UnitGroup:
    """One attention module's heads or one MLP's neurons, with what compaction needs to know.

    Attributes:
        group: the channel group (its ``channels`` are the units, its slices what each unit owns).
        kind: ``"heads"`` or ``"neurons"``.
        module: the attention module or the MLP.
        style: which layout the module has (``"qkvo"``, ``"litgpt"``, ``"mha"``, ``"gpt2"``, ``"bert"``, ``"gated"``,
            ``"fc"``).
        num_heads: query heads (attention), 0 for an MLP.
        num_kv_heads: key/value heads (attention), 0 for an MLP.
        head_dim: width of one head (attention), 0 for an MLP.
        per_unit: query heads per unit: ``num_heads // num_kv_heads`` with ``gqa="kv"``, else 1; 1 for neurons.
        query_units: True when the units are query heads of a GQA module (``gqa="query"``), which must go the same
            number from each key/value group.
    """

    group: ChannelGroup
    kind: Unit
    module: nn.Module
    style: str
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    per_unit: int = 1
    query_units: bool = False


def _rows(param: str, units: int, width: int, offset: int = 0, dim: int = 0, scored: bool = True) -> ChannelSlice:
    """``units`` blocks of ``width`` consecutive positions along ``dim`` from ``offset``, block u owned by unit u."""
    index = torch.arange(offset, offset + units * width)
    return ChannelSlice(param, dim, index, torch.arange(units).repeat_interleave(width), scored)


def _query_rows(param: str, num_heads: int, head_dim: int, per_unit: int, offset: int = 0, dim: int = 0, scored=True):
    """Query-head rows (or output columns) owned by units of ``per_unit`` consecutive query heads."""
    return _rows(param, num_heads // per_unit, per_unit * head_dim, offset, dim, scored)


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_linear(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def _head_dim(name: str, module: nn.Module, width: int) -> int:
    """The head width of a q/k/v/o attention module: its ``head_dim`` attribute, else its config's, else the
    query width over ``num_heads``."""
    for owner in (module, getattr(module, "config", None)):
        value = getattr(owner, "head_dim", None)
        if is_int(value) and value > 0:
            return int(value)
    heads = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", None)
    if is_int(heads) and heads > 0 and width % heads == 0:
        return width // int(heads)
    raise ValueError(
        f"Cannot tell the head width of attention module {name!r} ({type(module).__name__}): give it a `head_dim` "
        "or `num_heads` attribute, or add it to `ignore`."
    )


def _check_heads(name: str, module: nn.Module, q_width: int, kv_width: int, head_dim: int) -> tuple[int, int]:
    if q_width % head_dim or kv_width % head_dim:
        raise ValueError(
            f"Attention module {name!r} ({type(module).__name__}) has {q_width} query and {kv_width} key/value "
            f"outputs, which head_dim={head_dim} does not divide: its head count is not whole. Fix its `head_dim` or "
            "add it to `ignore`."
        )
    heads, kv = q_width // head_dim, kv_width // head_dim
    if kv < 1 or heads % kv:
        raise ValueError(
            f"Attention module {name!r} ({type(module).__name__}) has {heads} query heads and {kv} key/value heads: "
            "grouped-query attention needs the key/value heads to divide the query heads. Add it to `ignore`."
        )
    return heads, kv


#: Where a projection's rows start: (weight name, bias name or None, first row).
_Rows = tuple[str, str | None, int]


def _gqa_heads(
    name: str, module: nn.Module, style: str, qkv: Sequence[_Rows], out: str, heads: int, kv: int, d: int, gqa: GQA
) -> UnitGroup:
    """The heads of a grouped-query attention module whose query, key and value rows are ``qkv`` (separate
    projections or one fused matrix at three offsets) and whose output projection is ``out``."""
    per = heads // kv if gqa == "kv" else 1
    (q_weight, q_bias, q_first), *kv_rows = qkv
    slices = [_query_rows(q_weight, heads, d, per, q_first)]
    if q_bias is not None:
        slices.append(_query_rows(q_bias, heads, d, per, q_first, scored=False))
    slices.append(_query_rows(out, heads, d, per, dim=1))
    if gqa == "kv" or kv == heads:
        for weight, bias, first in kv_rows:
            slices.append(_rows(weight, kv, d, first))
            if bias is not None:
                slices.append(_rows(bias, kv, d, first, scored=False))
    query_units = gqa == "query" and kv < heads
    return UnitGroup(
        ChannelGroup(name, heads // per, tuple(slices)), "heads", module, style, heads, kv, d, per, query_units
    )


def _litgpt_heads(name: str, module: nn.Module, config: Any, gqa: GQA) -> UnitGroup:
    """The heads of LitGPT's ``CausalSelfAttention``: one fused ``qkv`` whose rows are every query head, then every
    key head, then every value head (query head h shares key/value head h // (n_head // n_query_groups)), and
    ``proj``; widths read from the weights, the head width from ``config.head_size``."""
    if getattr(config, "norm_qk", False) and getattr(config, "norm_qk_type", "default") != "default":
        raise ValueError(
            f"Attention module {name!r} ({type(module).__name__}) normalises its queries and keys over all heads at "
            f"once (norm_qk_type={config.norm_qk_type!r}), so removing a head would change the others. Prune its "
            "neurons only (HeadStructure(units='neurons')) or add it to `ignore`."
        )
    d = int(config.head_size)
    qkv, proj = getattr_path(module, "qkv"), getattr_path(module, "proj")
    q_width, rows = int(_weight(proj).shape[1]), int(_weight(qkv).shape[0])
    if (rows - q_width) % 2:
        raise ValueError(
            f"Attention module {name!r} ({type(module).__name__}) has {rows} qkv rows and {q_width} query outputs: "
            "the key and value rows are not of one width. Add it to `ignore`."
        )
    kv_width = (rows - q_width) // 2
    heads, kv = _check_heads(name, module, q_width, kv_width, d)
    p = lambda n: _qualified(name, n)  # noqa: E731
    bias = p("qkv.bias") if _bias(qkv) else None
    fused = [(p("qkv.weight"), bias, first) for first in (0, q_width, q_width + kv_width)]
    return _gqa_heads(name, module, "litgpt", fused, p("proj.weight"), heads, kv, d, gqa)


def _attention(name: str, module: nn.Module, gqa: GQA, conv1d: type[nn.Module] | None) -> UnitGroup | None:
    """The heads of ``module`` when it is an attention module of a known layout, else None."""
    p = lambda n: _qualified(name, n)  # noqa: E731
    if _has_linear(module, "q_proj", "k_proj", "v_proj", "o_proj"):
        q, k, v = (getattr(module, n) for n in ("q_proj", "k_proj", "v_proj"))
        d = _head_dim(name, module, q.out_features)
        heads, kv = _check_heads(name, module, q.out_features, k.out_features, d)
        rows = [
            (p(f"{n}_proj.weight"), p(f"{n}_proj.bias") if _bias(proj) else None, 0)
            for n, proj in zip("qkv", (q, k, v))
        ]
        return _gqa_heads(name, module, "qkvo", rows, p("o_proj.weight"), heads, kv, d, gqa)
    config = getattr(module, "config", None)
    if _has_linear(module, "qkv", "proj") and is_int(getattr(config, "n_query_groups", None)):
        return _litgpt_heads(name, module, config, gqa)
    if isinstance(module, nn.MultiheadAttention):
        # the inner width is embed_dim for torch's own module, less for a compact one (deploy.attention)
        heads, d = module.num_heads, module.head_dim
        e = heads * d
        if module.in_proj_weight is not None:
            slices = [_rows(p("in_proj_weight"), heads, d, offset) for offset in (0, e, 2 * e)]
        else:
            slices = [_rows(p(f"{n}_proj_weight"), heads, d) for n in ("q", "k", "v")]
        if module.in_proj_bias is not None:
            slices += [_rows(p("in_proj_bias"), heads, d, offset, scored=False) for offset in (0, e, 2 * e)]
        if module.bias_k is not None and module.bias_v is not None:
            slices += [_rows(p(n), heads, d, dim=2, scored=False) for n in ("bias_k", "bias_v")]
        slices.append(_rows(p("out_proj.weight"), heads, d, dim=1))
        return UnitGroup(ChannelGroup(name, heads, tuple(slices)), "heads", module, "mha", heads, heads, d)
    window = _window_attention(name, module)
    if window is not None:
        return window
    attn, proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    gpt2_heads = getattr(module, "num_heads", None)
    if conv1d is not None and isinstance(attn, conv1d) and isinstance(proj, conv1d) and is_int(gpt2_heads):
        e = int(_weight(attn).shape[1]) // 3  # Conv1D: weight is (in, out)
        heads, _ = _check_heads(name, module, e, e, int(getattr(module, "head_dim", e // int(gpt2_heads))))
        d = e // heads
        slices = [_rows(p("c_attn.weight"), heads, d, offset, dim=1) for offset in (0, e, 2 * e)]
        slices += [_rows(p("c_attn.bias"), heads, d, offset, scored=False) for offset in (0, e, 2 * e)]
        slices.append(_rows(p("c_proj.weight"), heads, d, dim=0))
        return UnitGroup(ChannelGroup(name, heads, tuple(slices)), "heads", module, "gpt2", heads, heads, d)
    self_attn, output = getattr(module, "self", None), getattr(module, "output", None)
    if (
        self_attn is not None
        and _has_linear(self_attn, "query", "key", "value")
        and isinstance(getattr(output, "dense", None), nn.Linear)
    ):
        heads = int(self_attn.num_attention_heads)
        width = self_attn.query.out_features
        d = int(getattr(self_attn, "attention_head_size", width // heads))
        heads, _ = _check_heads(name, module, width, self_attn.key.out_features, d)
        slices = []
        for n in ("query", "key", "value"):
            slices.append(_rows(p(f"self.{n}.weight"), heads, d))
            if _bias(getattr(self_attn, n)):
                slices.append(_rows(p(f"self.{n}.bias"), heads, d, scored=False))
        slices.append(_rows(p("output.dense.weight"), heads, d, dim=1))
        return UnitGroup(ChannelGroup(name, heads, tuple(slices)), "heads", module, "bert", heads, heads, d)
    return None


def _window_attention(name: str, module: nn.Module) -> UnitGroup | None:
    """The heads of torchvision's Swin attention (``qkv``, ``proj``, a per-head position bias; v2's ``logit_scale``
    and ``cpb_mlp``) or MaxViT attention (``to_qkv``, ``merge``, ``relative_position_bias_table``), else None."""
    p = lambda n: _qualified(name, n)  # noqa: E731
    m: Any = module
    swin_attributes = all(hasattr(m, a) for a in ("window_size", "shift_size", "attention_dropout", "dropout"))
    if _has_linear(m, "qkv", "proj") and is_int(getattr(m, "num_heads", None)) and swin_attributes:
        fused, style, extra = m.qkv, "swin", ("qkv", "proj")
        heads = int(m.num_heads)
    elif _has_linear(m, "to_qkv", "merge") and is_int(getattr(m, "n_heads", None)) and hasattr(m, "max_seq_len"):
        fused, style, extra = m.to_qkv, "maxvit", ("to_qkv", "merge")
        heads = int(m.n_heads)
    else:
        return None
    v2 = isinstance(getattr(module, "logit_scale", None), nn.Parameter) and isinstance(
        getattr(module, "cpb_mlp", None), nn.Sequential
    )
    table = getattr(module, "relative_position_bias_table", None)
    if not v2 and not (isinstance(table, nn.Parameter) and table.dim() == 2 and table.shape[1] == heads):
        return None
    width = fused.out_features // 3
    d = int(getattr(module, "head_dim", width // max(heads, 1)))
    heads, _ = _check_heads(name, module, width, width, d)
    qkv_name, out_name = extra
    slices = [_rows(p(f"{qkv_name}.weight"), heads, d, offset) for offset in (0, width, 2 * width)]
    if _bias(fused):
        slices += [_rows(p(f"{qkv_name}.bias"), heads, d, offset, scored=False) for offset in (0, width, 2 * width)]
    slices.append(_rows(p(f"{out_name}.weight"), heads, d, dim=1))
    if v2:
        last = len(m.cpb_mlp) - 1
        slices += [_rows(p("logit_scale"), heads, 1, scored=False)]
        slices += [_rows(p(f"cpb_mlp.{last}.weight"), heads, 1, scored=False)]
        if _bias(m.cpb_mlp[last]):
            slices += [_rows(p(f"cpb_mlp.{last}.bias"), heads, 1, scored=False)]
    else:
        slices.append(_rows(p("relative_position_bias_table"), heads, 1, dim=1, scored=False))
    return UnitGroup(ChannelGroup(name, heads, tuple(slices)), "heads", module, style, heads, heads, d)


#: Modules that act on each feature alone: what may stand between the two layers of an MLP.
_ELEMENTWISE = (nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Dropout, nn.Identity)


def _sequential_mlp(module: nn.Module) -> tuple[int, int] | None:
    """The positions of the two linear layers of an ``nn.Sequential`` MLP (torchvision's ``MLP``/``MLPBlock``,
    MaxViT's ``mlp_layer``): exactly two, with only activations and dropout between them."""
    if not isinstance(module, nn.Sequential):
        return None
    children = list(module)
    linears = [i for i, m in enumerate(children) if isinstance(m, nn.Linear)]
    if len(linears) != 2 or not all(isinstance(m, _ELEMENTWISE) for m in children[linears[0] + 1 : linears[1]]):
        return None
    first, second = children[linears[0]], children[linears[1]]
    return (linears[0], linears[1]) if first.out_features == second.in_features else None


def _mlp(name: str, module: nn.Module, conv1d: type[nn.Module] | None) -> UnitGroup | None:
    """The hidden neurons of ``module`` when it is an MLP of a known layout, else None."""
    p = lambda n: _qualified(name, n)  # noqa: E731

    def linear(inputs: str, outputs: Sequence[str], style: str) -> UnitGroup:
        width = int(_weight(getattr_path(module, outputs[0])).shape[0])
        slices = []
        for n in outputs:
            slices.append(_rows(p(f"{n}.weight"), width, 1))
            if _bias(getattr_path(module, n)):
                slices.append(_rows(p(f"{n}.bias"), width, 1, scored=False))
        slices.append(_rows(p(f"{inputs}.weight"), width, 1, dim=1))
        return UnitGroup(ChannelGroup(name, width, tuple(slices)), "neurons", module, style)

    if _has_linear(module, "gate_proj", "up_proj", "down_proj"):
        return linear("down_proj", ("gate_proj", "up_proj"), "gated")
    if is_int(getattr(module, "intermediate_size", None)):  # LitGPT's LLaMAMLP, GemmaMLP, GptNeoxMLP
        if _has_linear(module, "fc_1", "fc_2", "proj"):
            return linear("proj", ("fc_1", "fc_2"), "gated")
        if _has_linear(module, "fc", "proj"):
            return linear("proj", ("fc",), "fc")
    if _has_linear(module, "linear1", "linear2"):
        return linear("linear2", ("linear1",), "fc")
    if (
        isinstance(getattr(module, "intermediate", None), nn.Module)
        and isinstance(getattr(module.intermediate, "dense", None), nn.Linear)
        and isinstance(getattr(getattr(module, "output", None), "dense", None), nn.Linear)
    ):
        return linear("output.dense", ("intermediate.dense",), "bert")
    pair = _sequential_mlp(module)
    if pair is not None:
        return linear(str(pair[1]), (str(pair[0]),), "fc")
    fc, proj = getattr(module, "c_fc", None), getattr(module, "c_proj", None)
    if conv1d is not None and isinstance(fc, conv1d) and isinstance(proj, conv1d):
        width = int(_weight(fc).shape[1])
        slices = (
            _rows(p("c_fc.weight"), width, 1, dim=1),
            _rows(p("c_fc.bias"), width, 1, scored=False),
            _rows(p("c_proj.weight"), width, 1, dim=0),
        )
        return UnitGroup(ChannelGroup(name, width, slices), "neurons", module, "gpt2")
    return None


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor.")
    return weight


def getattr_path(module: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted ``path`` of ``module`` (``"output.dense"``)."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def find_units(
    model: nn.Module, ignore: Sequence[str] = (), units: Sequence[Unit] = ("heads", "neurons"), gqa: GQA = "kv"
) -> list[UnitGroup]:
    """Every attention module's heads and every MLP's neurons in ``model``, outside ``ignore``, in module order.

    Raises:
        ValueError: an ``ignore`` pattern matches no module, an attention module whose head count is not whole or
            whose grouped-query ratio is invalid, or nothing of the asked ``units`` is found.

    Example:
        >>> from torch import nn
        >>> found = find_units(nn.TransformerEncoderLayer(16, 4, dim_feedforward=32))
        >>> [(u.group.name, u.kind, u.group.channels) for u in found]
        [('', 'neurons', 32), ('self_attn', 'heads', 4)]
    """
    check_patterns(model, ignore)
    conv1d = hf_conv1d_type()
    found: list[UnitGroup] = []
    attention: list[str] = []  # what lies inside an attention module (Swin v2's position-bias MLP) is its own
    for name, module in model.named_modules():
        if name and any(name_matches(name, pattern) for pattern in ignore):
            continue
        if any(name.startswith(f"{a}.") or not a for a in attention):
            continue
        try:
            unit = _attention(name, module, gqa, conv1d)
        except ValueError:  # heads that cannot be pruned (a bad head count, shared q/k norms): fine for neurons only
            if "heads" in units:
                raise
            attention.append(name)
            continue
        if unit is not None:
            attention.append(name)
            unit = unit if "heads" in units else None
        elif "neurons" in units:
            unit = _mlp(name, module, conv1d)
        if unit is not None:
            found.append(unit)
    if not found:
        raise ValueError(
            f"Found no {' or '.join(units)} to prune in {type(model).__name__}"
            f"{' outside `ignore`=' + repr(list(ignore)) if ignore else ''}: HeadStructure knows attention with "
            "q_proj/k_proj/v_proj/o_proj, nn.MultiheadAttention, GPT-2, BERT and LitGPT attention, and gated, "
            "linear1/linear2, GPT-2, BERT, torchvision and LitGPT MLPs."
        )
    return found


class HeadMaskSet(ChannelMaskSet):
    """A :class:`~lightning_prune.masks.channels.ChannelMaskSet` whose groups are attention heads and MLP neurons;
    :attr:`units` keeps what each group is (for pruning within GQA groups and for compaction)."""

    def __init__(self, params: dict[str, nn.Parameter], units: Sequence[UnitGroup]) -> None:
        super().__init__(params, [u.group for u in units])
        self.units: list[UnitGroup] = list(units)


class HeadStructure(Structure):
    """Prune whole attention heads and MLP hidden neurons of a transformer.

    A unit's score is the Lp norm over every weight it owns (query, key, value rows and output columns of a head;
    gate, up rows and down column of a neuron), as in Michel et al., 2019 ("Are Sixteen Heads Really Better than
    One?") scored by weights, or the sum of a gradient criterion's scores (``"taylor"``, ``"fisher"``: Molchanov et
    al., 2019) over those weights, or the unit's output measured on training batches (``"activation"``: the mean
    absolute value of a head's output or a neuron's activation where the next layer reads it; ``"apoz"``).
    ``sparsity`` is the fraction of these modules' parameters pruned:
    ``scope="layer"`` prunes that fraction of every group's units (uniform widths, which Hugging Face configs can
    express); ``scope="global"`` ranks every unit by its score over its group's mean, cost-weighted, so that
    layers compete.

    Args:
        units: what to prune: ``"heads"``, ``"neurons"`` or both (default).
        gqa: ``"kv"`` (default) removes a key/value head with every query head sharing it; ``"query"`` removes
            query heads, the same number from each key/value group, so the ratio stays valid.
        round_to: keep a multiple of this many neurons in every pruned MLP (8 or 16 for SIMD kernels).
        head_round_to: keep a multiple of this many units (heads, or key/value groups) in every pruned attention.
        max_layer_sparsity: the largest fraction of one group's units that may go, in [0, 1); at least one unit
            (and one query head per key/value group) always stays.

    Raises:
        ValueError: an unknown ``units`` or ``gqa``, a rounding that is not a positive integer or a bad
            ``max_layer_sparsity``; at :meth:`bind`, a rounding larger than a group's units.

    Example:
        >>> from torch import nn
        >>> from lightning_prune import Pruner
        >>> layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        >>> pruner = Pruner(0.5, structure=HeadStructure(round_to=8), importance="l2", scope="layer")
        >>> _ = pruner.bind(model); _ = pruner.prune(0.5)
        >>> pruner.layer_sparsity()
        {'layers.0': 0.5, 'layers.0.self_attn': 0.5, 'layers.1': 0.5, 'layers.1.self_attn': 0.5}
    """

    name = "heads"

    def __init__(
        self,
        units: Unit | Sequence[Unit] = ("heads", "neurons"),
        gqa: GQA = "kv",
        round_to: int = 1,
        head_round_to: int = 1,
        max_layer_sparsity: float = 0.9,
    ) -> None:
        chosen = (units,) if isinstance(units, str) else tuple(units)
        if not chosen or any(u not in ("heads", "neurons") for u in chosen):
            raise ValueError(f"`units` must be 'heads', 'neurons' or both, got {units!r}.")
        if gqa not in ("kv", "query"):
            raise ValueError(
                f"`gqa` must be 'kv' (remove a key/value head with its query heads) or 'query' (remove query heads "
                f"within each group), got {gqa!r}."
            )
        for key, value in (("round_to", round_to), ("head_round_to", head_round_to)):
            if not is_int(value) or value < 1:
                raise ValueError(f"`{key}` must be a positive integer, got {value!r}.")
        check_sparsity(max_layer_sparsity, "max_layer_sparsity")
        self.units: tuple[Unit, ...] = tuple(dict.fromkeys(chosen))
        self.gqa: GQA = gqa
        self.round_to = int(round_to)
        self.head_round_to = int(head_round_to)
        self.max_layer_sparsity = float(max_layer_sparsity)

    def __repr__(self) -> str:
        return (
            f"HeadStructure(units={list(self.units)}, gqa={self.gqa!r}, round_to={self.round_to}, "
            f"head_round_to={self.head_round_to}, max_layer_sparsity={self.max_layer_sparsity})"
        )

    # ------------------------------------------------------------------ binding and read-outs
    def bind(self, module: nn.Module, ignore: Sequence[str] = (), example_inputs: Any = None) -> HeadMaskSet:
        found = find_units(module, ignore, self.units, self.gqa)
        named = dict(module.named_parameters())
        masks = HeadMaskSet({n: named[n] for u in found for n in u.group.params()}, found)
        for unit in found:
            self._min_keep(unit)  # fail now on a rounding that cannot fit
        return masks

    def layer_names(self, masks: MaskSet) -> list[str]:
        return [u.group.name for u in _head_masks(masks).units]

    def sparsity(self, masks: MaskSet) -> float:
        """The fraction of the heads' and neurons' parameters pruned."""
        return masks.sparsity()

    def layer_sparsity(self, masks: MaskSet) -> dict[str, float]:
        """The fraction of each group's units (heads, key/value groups or neurons) pruned."""
        return _head_masks(masks).group_sparsity()

    def check_importance(self, importance: Importance) -> None:
        _norm_order(importance)

    def check_target(self, masks: MaskSet, sparsity: Target, scope: Scope = "global") -> None:
        hm = _head_masks(masks)
        per_group = layer_targets(self.layer_names(hm), sparsity, scope)
        values = per_group if per_group is not None else [single_target(sparsity)] * len(hm.units)
        over = {u.group.name: t for u, t in zip(hm.units, values) if t > self.max_layer_sparsity}
        if over and (per_group is not None or scope == "layer"):
            raise ValueError(
                f"Cannot prune these groups' units to their targets with `max_layer_sparsity`="
                f"{self.max_layer_sparsity}: {over}. Lower the targets or raise `max_layer_sparsity`."
            )

    def summary(self, masks: MaskSet) -> str:
        hm = _head_masks(masks)
        rows: list[tuple[str, ...]] = [("module", "units", "kept / total", "pruned")]
        for u in hm.units:
            kept = int(hm.kept(u.group).sum())
            label = "neurons" if u.kind == "neurons" else ("kv groups" if u.per_unit > 1 else "heads")
            rows.append(
                (u.group.name or "(model)", label, f"{kept} / {u.group.channels}", f"{1 - kept / u.group.channels:.2%}")
            )
        rows.append(
            ("total (parameters)", "", f"{hm.numel() - hm.num_pruned()} / {hm.numel()}", f"{hm.sparsity():.2%}")
        )
        return text_table(rows, "Head and neuron pruning summary")

    # ------------------------------------------------------------------ counts
    def _step(self, unit: UnitGroup) -> int:
        """Units are kept in multiples of this: the rounding, times the key/value groups for query units."""
        rounding = self.round_to if unit.kind == "neurons" else self.head_round_to
        return rounding * (unit.num_kv_heads if unit.query_units else 1)

    def _min_keep(self, unit: UnitGroup) -> int:
        step, channels = self._step(unit), unit.group.channels
        if step > channels:
            what = "neurons" if unit.kind == "neurons" else "heads"
            key = "round_to" if unit.kind == "neurons" else "head_round_to"
            raise ValueError(
                f"`{key}`={self.round_to if unit.kind == 'neurons' else self.head_round_to} would empty "
                f"{unit.group.name or type(unit.module).__name__!r}, which has {channels} {what}"
                f"{f' in {unit.num_kv_heads} key/value groups' if unit.query_units else ''}. Lower `{key}` or add it "
                "to `ignore`."
            )
        keep = max(1, math.ceil((1.0 - self.max_layer_sparsity) * channels - 1e-9))
        return min(math.ceil(keep / step) * step, channels)

    def _rounded(self, unit: UnitGroup, wanted: int, kept: int) -> int:
        step = self._step(unit)
        if wanted >= kept:
            return kept
        rounded = max(round(wanted / step), 1) * step
        return min(max(rounded, self._min_keep(unit)), kept)

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        hm = _head_masks(masks)
        per_group = layer_targets(self.layer_names(hm), sparsity, scope)
        self.check_target(hm, sparsity, scope)
        p = _norm_order(importance)
        kept = [hm.kept(u.group) for u in hm.units]
        scores = [_unit_scores(hm, u.group, p, importance) for u in hm.units]
        if per_group is not None or scope == "layer":
            fractions = per_group if per_group is not None else [single_target(sparsity)] * len(hm.units)
            targets = [
                self._rounded(u, u.group.channels - round(f * u.group.channels), int(k.sum()))
                for u, k, f in zip(hm.units, kept, fractions)
            ]
        else:
            targets = self._global_targets(hm, scores, kept, single_target(sparsity))
        for u, k, s, target in zip(hm.units, kept, scores, targets):
            excess = int(k.sum()) - target
            if excess > 0:
                hm.prune_channels_(u.group, _drop(u, k, s, excess))
        hm.apply_()

    def _global_targets(self, hm: HeadMaskSet, scores: list[Tensor], kept: list[Tensor], sparsity: float) -> list[int]:
        """Per group, how many units to keep so that the lowest relative scores go first until ``sparsity`` of the
        parameters is pruned."""
        costs = [_unit_cost(hm, u.group) for u in hm.units]
        total = hm.numel()
        to_prune = round(sparsity * total) - hm.num_pruned()
        counts = [int(k.sum()) for k in kept]
        if to_prune <= 0:
            return counts
        floors = [self._min_keep(u) for u in hm.units]
        relative = [_relative(s, k) for s, k in zip(scores, kept)]
        values = torch.cat([r[k] for r, k in zip(relative, kept)])
        owner = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
        remaining, taken = list(counts), 0
        for j in torch.sort(values, stable=True).indices.tolist():
            i = int(owner[j])
            if remaining[i] > floors[i]:
                remaining[i] -= 1
                taken += costs[i]
                if taken >= to_prune:
                    break
        return [self._rounded(u, want, c) for u, want, c in zip(hm.units, remaining, counts)]


def _drop(unit: UnitGroup, kept: Tensor, scores: Tensor, excess: int) -> Tensor:
    """Which of ``unit``'s kept units to prune: the ``excess`` lowest-scored (ties to the earliest); for query units,
    the same number from every key/value group."""
    drop = torch.zeros(unit.group.channels, dtype=torch.bool)
    if unit.query_units:
        per_group = unit.num_heads // unit.num_kv_heads
        each = excess // unit.num_kv_heads
        for g in range(unit.num_kv_heads):
            members = torch.arange(g * per_group, (g + 1) * per_group)
            alive = members[kept[members]]
            order = torch.sort(scores[alive], stable=True).indices[:each]
            drop[alive[order]] = True
        return drop
    candidates = torch.nonzero(kept).flatten()
    order = torch.sort(scores[candidates], stable=True).indices[:excess]
    drop[candidates[order]] = True
    return drop


def _unit_cost(masks: ChannelMaskSet, group: ChannelGroup) -> int:
    """The number of masked entries one unit of ``group`` owns."""
    total = 0
    for s in group.slices:
        param = masks.param(s.param)
        total += len(s.index) * (param.numel() // param.shape[s.dim])
    return total // group.channels


def _head_masks(masks: MaskSet) -> HeadMaskSet:
    if not isinstance(masks, HeadMaskSet):
        raise TypeError(f"Head pruning needs a HeadMaskSet (from HeadStructure.bind), got {type(masks).__name__}.")
    return masks


def _norm_order(importance: Importance) -> int | None:
    p = getattr(importance, "p", None)
    if isinstance(importance, LpNormImportance) and p in (1, 2):
        return int(p)
    if getattr(importance, "scores_channels", False):
        return None
    raise ValueError(
        f"structure='heads' scores heads and neurons by a norm of their weights or by a channel criterion: it supports "
        f"importance 'l1', 'l2' or 'magnitude' (= 'l1'), and 'taylor', 'fisher', 'apoz' or 'activation', not "
        f"{importance!r}."
    )


def _relative(scores: Tensor, kept: Tensor) -> Tensor:
    mean = scores[kept].mean() if bool(kept.any()) else scores.new_ones(())
    return scores / mean if float(mean) > 0 else scores


def _unit_scores(masks: ChannelMaskSet, group: ChannelGroup, p: int | None, importance: Importance) -> Tensor:
    if p is None:
        scores = importance.channel_scores(masks, group)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (group.channels,):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(
                f"{importance!r} returned scores of shape {shape} for {group.name!r}, which has {group.channels} "
                "units: it must return one score per unit."
            )
        return scores.detach().to(device="cpu", dtype=torch.float64)
    sums = torch.zeros(group.channels, dtype=torch.float64)
    for s in group.slices:
        if s.scored:
            rows = s.rows(masks.param(s.param).detach()).to(torch.float64)
            sums.index_add_(0, s.root, (rows.abs().sum(1) if p == 1 else rows.square().sum(1)).cpu())
    return sums if p == 1 else sums.sqrt()
