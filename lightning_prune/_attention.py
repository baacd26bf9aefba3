"""Multi-head attention as ``nn.MultiheadAttention`` computes it, for any head count and head width.

``torch.nn.functional.multi_head_attention_forward`` requires ``num_heads * head_dim == embed_dim``; a head-pruned
attention has fewer heads of the same width over the same residual width. :func:`attention_context` computes the
attention of given projections up to, and excluding, the output projection (the concatenated head outputs), with
torch's semantics for ``key_padding_mask``, ``attn_mask`` (boolean or float, 2-D or per head), ``bias_k``/``bias_v``,
``add_zero_attn`` and dropout; :func:`window_attention` computes torchvision's Swin window attention (v1, v2) for
any head count, with or without the output projection. They serve the compact attention modules of
:mod:`lightning_prune.deploy` and the activation criteria, which score a head by its output.

Private to the package.

Example:
    >>> import torch
    >>> from torch import nn
    >>> mha = nn.MultiheadAttention(8, 2).eval()
    >>> x = torch.randn(5, 3, 8)
    >>> context, _ = attention_context(x, x, x, projections(mha), mha.num_heads, mha.head_dim)
    >>> bool(torch.allclose(mha.out_proj(context), mha(x, x, x)[0], atol=1e-6))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Projections:
    """The input projections of a multi-head attention: weights ``(heads * head_dim, in)`` and optional biases."""

    q: Tensor
    k: Tensor
    v: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    bias_k: Tensor | None = None
    bias_v: Tensor | None = None
    add_zero_attn: bool = False


def projections(module: nn.MultiheadAttention) -> Projections:
    """The projections of ``module``: the thirds of a packed ``in_proj_weight``, or ``q/k/v_proj_weight``."""
    if module.in_proj_weight is not None:
        q, k, v = module.in_proj_weight.chunk(3)
    else:
        q, k, v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    q_bias = k_bias = v_bias = None
    if module.in_proj_bias is not None:
        q_bias, k_bias, v_bias = module.in_proj_bias.chunk(3)
    return Projections(q, k, v, q_bias, k_bias, v_bias, module.bias_k, module.bias_v, bool(module.add_zero_attn))


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not attended) as an additive float mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"`{name}` must be a boolean or float tensor, got {mask.dtype}.")
    return mask.to(dtype)


def attention_context(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    proj: Projections,
    num_heads: int,
    head_dim: int,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The concatenated head outputs ``(L, N, num_heads * head_dim)`` and, with ``need_weights``, the attention
    weights ``(N, num_heads, L, S)``; inputs are sequence-first and batched (``(L, N, E)``, ``(S, N, kdim)``).

    ``key_padding_mask`` is ``(N, S)``; ``attn_mask`` is ``(L, S)`` or ``(N * num_heads, L, S)``; boolean masks
    are True where attention is not allowed.

    Raises:
        ValueError: a mask of another shape.
    """
    tgt, batch = query.shape[0], query.shape[1]
    given = tuple(key_padding_mask.shape) if key_padding_mask is not None else ()
    q = F.linear(query, proj.q, proj.q_bias)
    k = F.linear(key, proj.k, proj.k_bias)
    v = F.linear(value, proj.v, proj.v_bias)
    dtype = q.dtype
    padding = _float_mask(key_padding_mask, "key_padding_mask", dtype)
    mask = _float_mask(attn_mask, "attn_mask", dtype)
    if proj.bias_k is not None and proj.bias_v is not None:
        k = torch.cat([k, proj.bias_k.expand(1, batch, -1)])
        v = torch.cat([v, proj.bias_v.expand(1, batch, -1)])
        mask = F.pad(mask, (0, 1)) if mask is not None else None
        padding = F.pad(padding, (0, 1)) if padding is not None else None
    # (N, H, L or S, d)
    q = q.view(tgt, batch, num_heads, head_dim).permute(1, 2, 0, 3)
    k = k.view(k.shape[0], batch, num_heads, head_dim).permute(1, 2, 0, 3)
    v = v.view(v.shape[0], batch, num_heads, head_dim).permute(1, 2, 0, 3)
    if proj.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, num_heads, 1, head_dim)], dim=2)
        v = torch.cat([v, v.new_zeros(batch, num_heads, 1, head_dim)], dim=2)
        mask = F.pad(mask, (0, 1)) if mask is not None else None
        padding = F.pad(padding, (0, 1)) if padding is not None else None
    source = k.shape[2]
    merged = None
    if mask is not None:
        if mask.dim() == 2 and tuple(mask.shape) == (tgt, source):
            merged = mask.view(1, 1, tgt, source)
        elif mask.dim() == 3 and tuple(mask.shape) == (batch * num_heads, tgt, source):
            merged = mask.view(batch, num_heads, tgt, source)
        else:
            raise ValueError(
                f"`attn_mask` has shape {tuple(mask.shape)}; expected "
                f"({tgt}, {source}) or ({batch * num_heads}, {tgt}, {source}) (batch * num_heads, target, source)."
            )
    if padding is not None:
        if tuple(padding.shape) != (batch, source):
            raise ValueError(
                f"`key_padding_mask` has shape {given}; expected ({batch}, {key.shape[0]}) (batch, source)."
            )
        padding = padding.view(batch, 1, 1, source)
        merged = padding if merged is None else merged + padding
    if need_weights:
        scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))
        if merged is not None:
            scores = scores + merged
        weights = torch.softmax(scores, dim=-1)
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        out = torch.matmul(dropped, v)
    else:
        weights = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=merged, dropout_p=dropout_p)
    return out.permute(2, 0, 1, 3).reshape(tgt, batch, num_heads * head_dim), weights


def sequence_first(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, batch_first: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool]:
    """Inputs in the ``(L, N, E)`` layout :func:`attention_context` takes, and whether they were batched."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    return query, key, value, key_padding_mask, batched


def window_attention(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    position_bias: Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
    head_dim: int,
    *,
    proj_weight: Tensor | None = None,
    proj_bias: Tensor | None = None,
    logit_scale: Tensor | None = None,
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Swin's (shifted) window attention of ``x`` ``(B, H, W, C)`` as torchvision's ``shifted_window_attention``
    computes it, for ``num_heads`` heads of width ``head_dim``; with ``logit_scale``, v2's cosine attention.

    Without ``proj_weight`` it returns the concatenated head outputs ``(B, H, W, num_heads * head_dim)``, before the
    output projection (what the activation criteria measure).
    """
    b, h, w, c = x.shape
    window, shift = list(window_size), list(shift_size)
    pad_r, pad_b = (window[1] - w % window[1]) % window[1], (window[0] - h % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    if window[0] >= ph:
        shift[0] = 0
    if window[1] >= pw:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (ph // window[0]) * (pw // window[1])
    x = x.view(b, ph // window[0], window[0], pw // window[1], window[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * windows, window[0] * window[1], c)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()  # v2 has no key bias
    tokens, d = x.size(1), head_dim
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.size(0), tokens, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * d**-0.5).matmul(k.transpose(-2, -1))
    attn = attn + position_bias
    if sum(shift) > 0:
        mask = x.new_zeros((ph, pw))
        h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                mask[hs[0] : hs[1], ws[0] : ws[1]] = count
                count += 1
        mask = mask.view(ph // window[0], window[0], pw // window[1], window[1])
        mask = mask.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // windows, windows, num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    out = attn.matmul(v).transpose(1, 2).reshape(x.size(0), tokens, num_heads * d)
    if proj_weight is not None:
        out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    width = out.shape[-1]
    out = out.view(b, ph // window[0], pw // window[1], window[0], window[1], width)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, width)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()
