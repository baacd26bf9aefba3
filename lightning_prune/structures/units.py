"""Where a transformer's attention heads and MLP neurons are: the layouts :class:`~lightning_prune.structures.heads.
HeadStructure` prunes.

:func:`find_units` finds the attention and MLP modules of a transformer by their shape, not by their class:

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

Each becomes a :class:`UnitGroup`: a :class:`~lightning_prune.masks.channels.ChannelGroup` whose units are heads or
neurons, with what compaction needs to know of its module.

Example:
    >>> from torch import nn
    >>> found = find_units(nn.TransformerEncoderLayer(16, 4, dim_feedforward=32))
    >>> [(u.group.name, u.kind, u.group.channels) for u in found]
    [('', 'neurons', 32), ('self_attn', 'heads', 4)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_prune._helpers import is_int
from lightning_prune.masks.channels import ChannelGroup, ChannelSlice
from lightning_prune.masks.params import check_patterns, hf_conv1d_type, name_matches

__all__ = ["GQA", "Unit", "UnitGroup", "find_units", "getattr_path"]

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
