"""A drop-in ``nn.MultiheadAttention`` with fewer heads: what a head-pruned ``nn.MultiheadAttention`` compacts to.

``nn.MultiheadAttention`` cannot hold fewer heads over the same residual width: its constructor and
``F.multi_head_attention_forward`` require ``num_heads * head_dim == embed_dim``. :class:`CompactMultiheadAttention`
is a subclass that keeps ``embed_dim`` (the width it reads and writes) and ``head_dim`` (so attention scores are scaled
as before) and holds only the kept heads: ``q/k/v_proj_weight`` of ``num_heads * head_dim`` rows (the packed
``in_proj_weight`` is split, so ``_qkv_same_embed_dim`` is False), ``in_proj_bias``, ``bias_k``/``bias_v`` and the
``out_proj`` columns of those heads. Its ``forward`` takes and returns what ``nn.MultiheadAttention.forward`` does
(``batch_first`` both ways, unbatched inputs, boolean or float ``attn_mask`` and ``key_padding_mask``,
``need_weights``, ``average_attn_weights``), so ``nn.TransformerEncoderLayer``/``DecoderLayer`` and torchvision's
ViT use it unchanged; they take their slow path (PyTorch's fused fast path requires the packed layout), and
:func:`~lightning_prune.deploy.transformer.compact_heads` turns off ``nn.TransformerEncoder``'s nested-tensor path.

Differences from the full attention it replaces, both from the removed heads:

* averaged attention weights (``need_weights=True``) are the mean over the kept heads;
* a per-head ``attn_mask`` of shape ``(N * num_heads, L, S)`` may be given for the original head count
  (:attr:`source_num_heads`): the rows of the kept heads (:attr:`heads`) are used.

:func:`~lightning_prune.deploy.compact.save_compact` records the module and
:func:`~lightning_prune.deploy.compact.load_compact` puts it back into a fresh model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> full = nn.MultiheadAttention(8, 4, batch_first=True).eval()
    >>> with torch.no_grad():
    ...     _ = full.out_proj.weight[:, 2:4].zero_()  # head 1 contributes nothing
    >>> small = CompactMultiheadAttention.from_attention(full, heads=[0, 2, 3])
    >>> small.num_heads, small.head_dim, small.embed_dim, small.q_proj_weight.shape
    (3, 2, 8, torch.Size([6, 8]))
    >>> x = torch.randn(2, 5, 8)
    >>> bool(torch.allclose(small(x, x, x)[0], full(x, x, x)[0], atol=1e-6))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_prune._attention import attention_context, projections, sequence_first
from lightning_prune._helpers import is_int

__all__ = ["CompactMultiheadAttention"]


class CompactMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with ``num_heads`` heads of width ``head_dim`` over ``embed_dim`` features, where
    ``num_heads * head_dim`` may be less than ``embed_dim`` (see the module docstring).

    Args:
        embed_dim: the width of the query input and of the output.
        num_heads: the heads kept.
        head_dim: the width of one head.
        dropout: dropout on the attention weights.
        bias: ``in_proj_bias`` and ``out_proj.bias``.
        add_bias_kv: ``bias_k`` and ``bias_v``.
        add_zero_attn: a zero key and value appended, as ``nn.MultiheadAttention`` does.
        kdim: the width of the key input (``embed_dim`` when None).
        vdim: the width of the value input (``embed_dim`` when None).
        batch_first: inputs and outputs are ``(N, L, E)``.
        heads: the indices, in the original attention, of the kept heads (``0 .. num_heads - 1`` when None).
        source_num_heads: the original attention's head count (``num_heads`` when None).

    Raises:
        ValueError: a width or head count that is not a positive integer, or ``heads`` that do not fit.

    Example:
        >>> attention = CompactMultiheadAttention(16, num_heads=2, head_dim=4, batch_first=True)
        >>> x = torch.randn(3, 5, 16)
        >>> out, weights = attention(x, x, x, average_attn_weights=False)
        >>> tuple(out.shape), tuple(weights.shape)
        ((3, 5, 16), (3, 2, 5, 5))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        heads: Sequence[int] | None = None,
        source_num_heads: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        nn.Module.__init__(self)  # nn.MultiheadAttention.__init__ insists on num_heads * head_dim == embed_dim
        for key, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            if not is_int(value) or value < 1:
                raise ValueError(f"`{key}` must be a positive integer, got {value!r}.")
        source = num_heads if source_num_heads is None else source_num_heads
        kept = tuple(range(num_heads)) if heads is None else tuple(int(h) for h in heads)
        if len(kept) != num_heads or len(set(kept)) != num_heads or not all(0 <= h < source for h in kept):
            raise ValueError(
                f"`heads` must be {num_heads} distinct head indices below `source_num_heads`={source}, got "
                f"{list(kept)}."
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = int(embed_dim), int(num_heads), int(head_dim)
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = False  # separate q/k/v weights: also keeps PyTorch's fused fast path away
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.heads, self.source_num_heads = kept, int(source)
        self.q_proj_weight = nn.Parameter(torch.empty(inner, embed_dim, **factory))
        self.k_proj_weight = nn.Parameter(torch.empty(inner, self.kdim, **factory))
        self.v_proj_weight = nn.Parameter(torch.empty(inner, self.vdim, **factory))
        self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(inner, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, inner, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, inner, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = bool(add_zero_attn)
        self._reset_parameters()

    def compact_config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this module (what :func:`save_compact` records)."""
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "dropout": self.dropout,
            "bias": self.in_proj_bias is not None,
            "add_bias_kv": self.bias_k is not None,
            "add_zero_attn": self.add_zero_attn,
            "kdim": self.kdim,
            "vdim": self.vdim,
            "batch_first": self.batch_first,
            "heads": list(self.heads),
            "source_num_heads": self.source_num_heads,
        }

    @classmethod
    @torch.no_grad()
    def from_attention(cls, module: nn.MultiheadAttention, heads: Sequence[int]) -> CompactMultiheadAttention:
        """A compact copy of ``module`` (an ``nn.MultiheadAttention``, compact or not) that keeps ``heads``.

        Raises:
            TypeError: ``module`` is not an ``nn.MultiheadAttention``.
            ValueError: ``heads`` is empty, repeats a head or names one ``module`` lacks.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"`module` must be an nn.MultiheadAttention, got {type(module).__name__}.")
        kept = [int(h) for h in heads]
        if not kept or len(set(kept)) != len(kept) or not all(0 <= h < module.num_heads for h in kept):
            raise ValueError(
                f"`heads` must be distinct indices of {module.num_heads} heads, at least one, got {list(heads)}."
            )
        d = int(module.head_dim)
        original = getattr(module, "heads", tuple(range(module.num_heads)))
        weight = module.out_proj.weight
        small = cls(
            module.embed_dim,
            len(kept),
            d,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            heads=[original[h] for h in kept],
            source_num_heads=getattr(module, "source_num_heads", module.num_heads),
            device=weight.device,
            dtype=weight.dtype,
        )
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept]).to(weight.device)
        proj = projections(module)
        small.q_proj_weight.copy_(proj.q[rows])
        small.k_proj_weight.copy_(proj.k[rows])
        small.v_proj_weight.copy_(proj.v[rows])
        if small.in_proj_bias is not None:
            small.in_proj_bias.copy_(torch.cat([b[rows] for b in (proj.q_bias, proj.k_bias, proj.v_bias)]))  # type: ignore[index]
        if small.bias_k is not None and small.bias_v is not None:
            small.bias_k.copy_(module.bias_k[..., rows])  # type: ignore[index]
            small.bias_v.copy_(module.bias_v[..., rows])  # type: ignore[index]
        small.out_proj.weight.copy_(weight[:, rows])
        if small.out_proj.bias is not None:
            small.out_proj.bias.copy_(module.out_proj.bias)
        small.train(module.training)
        return small

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``; ``is_causal`` is a hint that ``attn_mask`` is the causal mask, which
        must be given, as there."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        query, key, value, key_padding_mask, batched = sequence_first(
            query, key, value, key_padding_mask, self.batch_first
        )
        batch = query.shape[1]
        source = self.source_num_heads
        if (
            attn_mask is not None
            and attn_mask.dim() == 3
            and source != self.num_heads
            and len(attn_mask) == batch * source
        ):
            per_head = attn_mask.view(batch, source, *attn_mask.shape[1:])  # per-head masks of the original heads
            index = torch.tensor(self.heads, device=attn_mask.device)
            attn_mask = per_head.index_select(1, index).reshape(-1, *attn_mask.shape[1:])
        context, weights = attention_context(
            query,
            key,
            value,
            projections(self),
            self.num_heads,
            self.head_dim,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
        )
        out = self.out_proj(context)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(1), weights.squeeze(0) if weights is not None else None
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"heads={list(self.heads)} of {self.source_num_heads}, batch_first={self.batch_first}"
        )
