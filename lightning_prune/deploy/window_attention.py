"""Drop-in window attentions with fewer heads: what head-pruned torchvision Swin (v1, v2) and MaxViT attention
compact to.

torchvision computes a head's width from the residual width (``C // num_heads`` in Swin's
``shifted_window_attention``, a reshape to the input width in MaxViT's ``RelativePositionalMultiHeadAttention``), so
neither can hold fewer heads of the same width in place. These modules compute the same attention for
``num_heads`` heads of width ``head_dim`` over ``dim`` features and hold only the kept heads:

* :class:`CompactShiftedWindowAttention` (Swin): the kept heads' rows of ``qkv``, columns of ``proj``, and their
  columns of ``relative_position_bias_table`` (v1) or their ``logit_scale`` entries and rows of the last layer of
  ``cpb_mlp``, the continuous position-bias MLP (v2);
* :class:`CompactRelativeAttention` (MaxViT): the kept heads' rows of ``to_qkv``, columns of ``merge`` and columns of
  ``relative_position_bias_table``; the score scale stays ``feat_dim ** -0.5`` as torchvision has it.

Neither needs torchvision. :func:`~lightning_prune.deploy.transformer.compact_heads` puts them in place of the
pruned modules, :func:`~lightning_prune.deploy.compact.load_compact` rebuilds them.

Example:
    >>> import torch
    >>> from torchvision.models.swin_transformer import ShiftedWindowAttention
    >>> full = ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=4).eval()
    >>> with torch.no_grad():
    ...     _ = full.proj.weight[:, 4:8].zero_()  # head 1 contributes nothing
    >>> small = CompactShiftedWindowAttention.from_attention(full, heads=[0, 2, 3])
    >>> small.num_heads, small.head_dim, small.qkv.weight.shape
    (3, 4, torch.Size([36, 16]))
    >>> x = torch.randn(2, 8, 8, 16)
    >>> bool(torch.allclose(small(x), full(x), atol=1e-6))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune._attention import window_attention
from lightning_prune._helpers import is_int

__all__ = ["CompactRelativeAttention", "CompactShiftedWindowAttention"]


def relative_position_index(height: int, width: int) -> Tensor:
    """For every pair of positions of a ``height x width`` window, the index of their offset in a table of
    ``(2 * height - 1) * (2 * width - 1)`` offsets (as torchvision's Swin and MaxViT build it)."""
    coords = torch.stack(torch.meshgrid([torch.arange(height), torch.arange(width)], indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += height - 1
    relative[:, :, 1] += width - 1
    relative[:, :, 0] *= 2 * width - 1
    return relative.sum(-1)


def _kept_heads(
    heads: Sequence[int] | None, num_heads: int, source_num_heads: int | None
) -> tuple[tuple[int, ...], int]:
    source = num_heads if source_num_heads is None else int(source_num_heads)
    kept = tuple(range(num_heads)) if heads is None else tuple(int(h) for h in heads)
    if len(kept) != num_heads or len(set(kept)) != num_heads or not all(0 <= h < source for h in kept):
        raise ValueError(
            f"`heads` must be {num_heads} distinct head indices below `source_num_heads`={source}, got {list(kept)}."
        )
    return kept, source


def _check_widths(**values: object) -> None:
    for key, value in values.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"`{key}` must be a positive integer, got {value!r}.")


def _check_heads(module: nn.Module, heads: Sequence[int], num_heads: int) -> list[int]:
    kept = [int(h) for h in heads]
    if not kept or len(set(kept)) != len(kept) or not all(0 <= h < num_heads for h in kept):
        raise ValueError(f"`heads` must be distinct indices of {num_heads} heads, at least one, got {list(heads)}.")
    return kept


def _head_rows(heads: Sequence[int], head_dim: int, device: torch.device) -> Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]).to(device)


@torch.no_grad()
def _copy_projections(
    qkv: nn.Linear, proj: nn.Linear, new_qkv: nn.Linear, new_proj: nn.Linear, rows: Tensor, inner: int
) -> None:
    """Copy the kept rows of each third of a fused q/k/v projection and the kept columns of the output one."""
    thirds = torch.cat([rows + i * inner for i in range(3)])
    new_qkv.weight.copy_(qkv.weight[thirds])
    if new_qkv.bias is not None and qkv.bias is not None:
        new_qkv.bias.copy_(qkv.bias[thirds])
    new_proj.weight.copy_(proj.weight[:, rows])
    if new_proj.bias is not None and proj.bias is not None:
        new_proj.bias.copy_(proj.bias)


class CompactShiftedWindowAttention(nn.Module):
    """Swin's (shifted) window attention, v1 or v2, with ``num_heads`` heads of width ``head_dim`` over ``dim``
    features (see the module docstring). Input and output are ``(B, H, W, dim)``, as torchvision's.

    Args:
        dim: the residual width.
        window_size: the window, two integers.
        shift_size: the cyclic shift, two integers.
        num_heads: the heads kept.
        head_dim: the width of one head.
        qkv_bias: ``qkv`` has a bias.
        proj_bias: ``proj`` has a bias.
        attention_dropout: dropout on the attention weights.
        dropout: dropout on the output.
        v2: Swin v2: cosine attention with ``logit_scale`` and the ``cpb_mlp`` position bias.
        heads: the indices, in the original attention, of the kept heads.
        source_num_heads: the original attention's head count.

    Raises:
        ValueError: a width or head count that is not a positive integer, or ``heads`` that do not fit.
    """

    relative_position_index: Tensor
    relative_coords_table: Tensor

    def __init__(
        self,
        dim: int,
        window_size: Sequence[int],
        shift_size: Sequence[int],
        num_heads: int,
        head_dim: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        v2: bool = False,
        heads: Sequence[int] | None = None,
        source_num_heads: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        _check_widths(dim=dim, num_heads=num_heads, head_dim=head_dim)
        self.heads, self.source_num_heads = _kept_heads(heads, num_heads, source_num_heads)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.window_size, self.shift_size = [int(w) for w in window_size], [int(s) for s in shift_size]
        self.num_heads, self.head_dim, self.v2 = int(num_heads), int(head_dim), bool(v2)
        self.attention_dropout, self.dropout = float(attention_dropout), float(dropout)
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias, **factory)
        self.proj = nn.Linear(inner, dim, bias=proj_bias, **factory)
        wh, ww = self.window_size
        self.register_buffer("relative_position_index", relative_position_index(wh, ww).flatten().to(device))
        if self.v2:
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1), **factory)))
            self.cpb_mlp = nn.Sequential(
                nn.Linear(2, 512, bias=True, **factory), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
            ).to(**factory)
            table = torch.stack(
                torch.meshgrid(
                    [
                        torch.arange(-(wh - 1), wh, dtype=torch.float32),
                        torch.arange(-(ww - 1), ww, dtype=torch.float32),
                    ],
                    indexing="ij",
                )
            )
            table = table.permute(1, 2, 0).contiguous().unsqueeze(0)
            table[..., 0] /= wh - 1
            table[..., 1] /= ww - 1
            table *= 8
            table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / 3.0
            self.register_buffer("relative_coords_table", table.to(**factory))
        else:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads, **factory)
            )
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def compact_config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this module (what :func:`save_compact` records)."""
        return {
            "dim": self.qkv.in_features,
            "window_size": list(self.window_size),
            "shift_size": list(self.shift_size),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "qkv_bias": self.qkv.bias is not None,
            "proj_bias": self.proj.bias is not None,
            "attention_dropout": self.attention_dropout,
            "dropout": self.dropout,
            "v2": self.v2,
            "heads": list(self.heads),
            "source_num_heads": self.source_num_heads,
        }

    @classmethod
    @torch.no_grad()
    def from_attention(cls, module: nn.Module, heads: Sequence[int]) -> CompactShiftedWindowAttention:
        """A compact copy of ``module`` (torchvision's ``ShiftedWindowAttention`` or ``ShiftedWindowAttentionV2``, or
        a compact one) that keeps ``heads``.

        Raises:
            ValueError: ``heads`` is empty, repeats a head or names one ``module`` lacks.
        """
        return cls._from(module, heads)

    @classmethod
    def _from(cls, module: Any, heads: Sequence[int]) -> CompactShiftedWindowAttention:
        num_heads = int(module.num_heads)
        kept = _check_heads(module, heads, num_heads)
        qkv, proj = module.qkv, module.proj
        head_dim = int(getattr(module, "head_dim", qkv.out_features // 3 // num_heads))
        v2 = hasattr(module, "logit_scale")
        original = getattr(module, "heads", tuple(range(num_heads)))
        small = cls(
            qkv.in_features,
            module.window_size,
            module.shift_size,
            len(kept),
            head_dim,
            qkv_bias=qkv.bias is not None,
            proj_bias=proj.bias is not None,
            attention_dropout=module.attention_dropout,
            dropout=module.dropout,
            v2=v2,
            heads=[original[h] for h in kept],
            source_num_heads=getattr(module, "source_num_heads", num_heads),
            device=qkv.weight.device,
            dtype=qkv.weight.dtype,
        )
        index = torch.tensor(kept, device=qkv.weight.device)
        _copy_projections(
            qkv, proj, small.qkv, small.proj, _head_rows(kept, head_dim, index.device), num_heads * head_dim
        )
        small.relative_position_index.copy_(module.relative_position_index)
        if v2:
            small.logit_scale.copy_(module.logit_scale[index])
            mlp: Any = small.cpb_mlp
            mlp[0].load_state_dict(module.cpb_mlp[0].state_dict())
            mlp[2].weight.copy_(module.cpb_mlp[2].weight[index])
            small.relative_coords_table.copy_(module.relative_coords_table)
        else:
            small.relative_position_bias_table.copy_(module.relative_position_bias_table[:, index])
        small.train(module.training)
        return small

    def get_relative_position_bias(self) -> Tensor:
        """The position bias added to the attention scores, ``(1, num_heads, N, N)`` for ``N`` window positions (as
        torchvision's method of that name)."""
        table = (
            self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
            if self.v2
            else self.relative_position_bias_table
        )
        n = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return 16 * torch.sigmoid(bias) if self.v2 else bias

    def forward(self, x: Tensor) -> Tensor:
        """As torchvision's ``shifted_window_attention``, for heads of width :attr:`head_dim`."""
        return window_attention(
            x,
            self.qkv.weight,
            self.qkv.bias,
            self.get_relative_position_bias(),
            self.window_size,
            self.shift_size,
            self.num_heads,
            self.head_dim,
            proj_weight=self.proj.weight,
            proj_bias=self.proj.bias,
            logit_scale=self.logit_scale if self.v2 else None,
            attention_dropout=self.attention_dropout,
            dropout=self.dropout,
            training=self.training,
        )

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, heads={list(self.heads)} of "
            f"{self.source_num_heads}, window_size={self.window_size}, shift_size={self.shift_size}, v2={self.v2}"
        )


class CompactRelativeAttention(nn.Module):
    """MaxViT's relative positional multi-head attention with ``n_heads`` heads of width ``head_dim`` over
    ``feat_dim`` features (see the module docstring). Input and output are ``(B, G, P, feat_dim)``, as torchvision's.

    Args:
        feat_dim: the residual width.
        head_dim: the width of one head.
        n_heads: the heads kept.
        max_seq_len: the positions of a partition (a square number).
        heads: the indices, in the original attention, of the kept heads.
        source_num_heads: the original attention's head count.

    Raises:
        ValueError: a width or head count that is not a positive integer, or ``heads`` that do not fit.
    """

    relative_position_index: Tensor

    def __init__(
        self,
        feat_dim: int,
        head_dim: int,
        n_heads: int,
        max_seq_len: int,
        heads: Sequence[int] | None = None,
        source_num_heads: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        _check_widths(feat_dim=feat_dim, head_dim=head_dim, n_heads=n_heads, max_seq_len=max_seq_len)
        self.heads, self.source_num_heads = _kept_heads(heads, n_heads, source_num_heads)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.n_heads, self.head_dim, self.max_seq_len = int(n_heads), int(head_dim), int(max_seq_len)
        self.size = int(math.sqrt(max_seq_len))
        self.scale_factor = feat_dim**-0.5
        inner = n_heads * head_dim
        self.to_qkv = nn.Linear(feat_dim, 3 * inner, **factory)
        self.merge = nn.Linear(inner, feat_dim, **factory)
        self.relative_position_bias_table = nn.Parameter(
            torch.empty(((2 * self.size - 1) * (2 * self.size - 1), n_heads), **factory)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.size, self.size).to(device))

    def compact_config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this module (what :func:`save_compact` records)."""
        return {
            "feat_dim": self.to_qkv.in_features,
            "head_dim": self.head_dim,
            "n_heads": self.n_heads,
            "max_seq_len": self.max_seq_len,
            "heads": list(self.heads),
            "source_num_heads": self.source_num_heads,
        }

    @classmethod
    @torch.no_grad()
    def from_attention(cls, module: nn.Module, heads: Sequence[int]) -> CompactRelativeAttention:
        """A compact copy of ``module`` (torchvision's ``RelativePositionalMultiHeadAttention``, or a compact one)
        that keeps ``heads``.

        Raises:
            ValueError: ``heads`` is empty, repeats a head or names one ``module`` lacks.
        """
        return cls._from(module, heads)

    @classmethod
    def _from(cls, module: Any, heads: Sequence[int]) -> CompactRelativeAttention:
        num_heads, head_dim = int(module.n_heads), int(module.head_dim)
        kept = _check_heads(module, heads, num_heads)
        weight = module.to_qkv.weight
        original = getattr(module, "heads", tuple(range(num_heads)))
        small = cls(
            module.to_qkv.in_features,
            head_dim,
            len(kept),
            module.max_seq_len,
            heads=[original[h] for h in kept],
            source_num_heads=getattr(module, "source_num_heads", num_heads),
            device=weight.device,
            dtype=weight.dtype,
        )
        index = torch.tensor(kept, device=weight.device)
        rows = _head_rows(kept, head_dim, weight.device)
        _copy_projections(module.to_qkv, module.merge, small.to_qkv, small.merge, rows, num_heads * head_dim)
        small.relative_position_bias_table.copy_(module.relative_position_bias_table[:, index])
        small.relative_position_index.copy_(module.relative_position_index)
        small.train(module.training)
        return small

    def forward(self, x: Tensor) -> Tensor:
        """As torchvision's ``RelativePositionalMultiHeadAttention.forward``, for heads of width :attr:`head_dim`."""
        b, g, p, _ = x.shape
        heads, d = self.n_heads, self.head_dim
        q, k, v = (t.reshape(b, g, p, heads, d).permute(0, 1, 3, 2, 4) for t in torch.chunk(self.to_qkv(x), 3, dim=-1))
        scores = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k * self.scale_factor)
        index = self.relative_position_index.view(-1)
        bias = self.relative_position_bias_table[index].view(self.max_seq_len, self.max_seq_len, -1)
        weights = F.softmax(scores + bias.permute(2, 0, 1).contiguous().unsqueeze(0), dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", weights, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, heads * d))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}, heads={list(self.heads)} of {self.source_num_heads}"
