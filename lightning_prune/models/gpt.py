"""A small Llama-style decoder in plain PyTorch, built so that structured pruning can give each layer its own width.

The architecture is Llama's (Touvron et al., 2023): token embedding, pre-norm blocks of RMSNorm (Zhang & Sennrich,
2019), causal self-attention with rotary position embeddings (Su et al., 2021, "RoFormer") and grouped-query
attention (Ainslie et al., 2023, "GQA"), a SwiGLU MLP (Shazeer, 2020), a final RMSNorm and a linear head,
optionally tied to the embedding. Parameter names follow Hugging Face's ``LlamaForCausalLM`` without its
``model.`` prefix (``embed_tokens``, ``layers.0.self_attn.q_proj``, ``layers.0.mlp.gate_proj``, ``norm``,
``lm_head``), and the rotary embedding uses the same half-split layout, so weights carry over.

Every width is read at forward time: an attention module's ``num_heads``, ``num_kv_heads`` and ``head_dim`` are
plain attributes, and an MLP's hidden width is its weights'. A structured-pruning step removes heads or neurons
from one layer by shrinking that layer's ``nn.Linear`` modules and rewriting those attributes; the other layers
are untouched, and the model runs with non-uniform layers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune._helpers import check_int, is_number

__all__ = ["GPT", "Attention", "DecoderLayer", "GPTConfig", "RotaryEmbedding", "SwiGLU", "apply_rotary"]


def _positive_int(name: str, value: object) -> int:
    return check_int(name, value, 1)


@dataclass
class GPTConfig:
    """The shape of a :class:`GPT`, with Hugging Face's ``LlamaConfig`` field names.

    The defaults are ``model=gpt_tiny``'s widths (0.82M parameters with ``num_key_value_heads=4``), sized for a
    few minutes of training on 2 CPU cores.

    Args:
        vocab_size: Number of token ids (256 for bytes).
        hidden_size: Width of the residual stream.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Query heads per layer.
        num_key_value_heads: Key/value heads per layer (grouped-query attention); ``None`` means as many as query
            heads (multi-head attention). Must divide ``num_attention_heads``.
        head_dim: Width of one head; ``None`` means ``hidden_size // num_attention_heads``. Must be even (rotary
            embeddings rotate pairs of features).
        intermediate_size: Hidden width of each SwiGLU MLP.
        max_position_embeddings: The longest sequence the model accepts.
        rope_theta: Base of the rotary embeddings' frequencies.
        rms_norm_eps: Epsilon of every RMSNorm.
        tie_word_embeddings: Share one matrix between the token embedding and the output head.
        attention_bias: Biases in the query, key, value and output projections.
        mlp_bias: Biases in the MLP's projections.
        initializer_range: Standard deviation of the normal initialisation of weights; the projections that write
            to the residual stream (``o_proj``, ``down_proj``) get it divided by ``sqrt(2 * num_hidden_layers)``.

    Example:
        >>> GPTConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).head_dim
        16
    """

    vocab_size: int = 256
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            _positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive_int("num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` must divide `num_attention_heads` (each key/value head serves a group of "
                f"query heads), got {self.num_key_value_heads} and {self.num_attention_heads}."
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"`hidden_size` must be a multiple of `num_attention_heads` when `head_dim` is None, got "
                    f"{self.hidden_size} and {self.num_attention_heads}: set `head_dim` or change one of them."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even (rotary embeddings rotate pairs), got {self.head_dim}.")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not is_number(value) or not value > 0:
                raise ValueError(f"`{name}` must be a number > 0, got {value!r}.")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` of shape ``(..., T, head_dim)`` by position: Llama's half-split rotary embedding.

    Feature ``i`` of the first half and feature ``i`` of the second half form a pair rotated by the angle
    ``position * theta ** (-2 i / head_dim)``; ``cos`` and ``sin`` are ``(T, head_dim)``, each half repeated.

    Example:
        >>> cos, sin = RotaryEmbedding()(4, 8, torch.device("cpu"), torch.float32)
        >>> x = torch.randn(1, 4, 8)
        >>> torch.allclose(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))  # a rotation keeps norms
        True
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RotaryEmbedding(nn.Module):
    """The cosines and sines of rotary position embeddings, for any length and head width, cached.

    Computed in float64 and cast, so the table is exact whatever the model's dtype. The cache holds one table per
    ``(head_dim, device, dtype)``, as long as the longest sequence seen; it is not part of the state dict.

    Args:
        theta: Base of the frequencies (``rope_theta``).

    Example:
        >>> cos, sin = RotaryEmbedding()(16, 32, torch.device("cpu"), torch.float32)
        >>> tuple(cos.shape), float(cos[0].min())
        ((16, 32), 1.0)
    """

    def __init__(self, theta: float = 10000.0) -> None:
        super().__init__()
        self.theta = float(theta)
        self._cache: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @override
    def forward(self, seq_len: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (head_dim, device, dtype)
        cached = self._cache.get(key)
        if cached is None or cached[0].shape[0] < seq_len:
            # Plain tensors even when first asked for under torch.inference_mode() (validation before training):
            # inference tensors cannot be saved for a later backward pass.
            with torch.inference_mode(False), torch.no_grad():
                inv_freq = self.theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
                angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
                angles = torch.cat((angles, angles), dim=-1)
                cached = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
            self._cache[key] = cached
        return cached[0][:seq_len], cached[1][:seq_len]


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped-query attention; widths read at forward time.

    Query head ``h`` attends with key/value head ``h // (num_heads // num_kv_heads)`` (Hugging Face's
    ``repeat_kv`` order). ``num_heads``, ``num_kv_heads`` and ``head_dim`` are plain attributes read by
    :meth:`forward`: to remove heads, shrink ``q_proj``/``k_proj``/``v_proj`` (rows) and ``o_proj`` (columns)
    and rewrite them; a forward whose attributes disagree with the weights fails with a message saying so.

    Args:
        hidden_size: Width of the input and the output.
        num_heads: Query heads.
        num_kv_heads: Key/value heads; must divide ``num_heads``.
        head_dim: Width of one head (even).
        bias: Biases in the four projections.

    Example:
        >>> attention = Attention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8)
        >>> cos, sin = RotaryEmbedding()(5, 8, torch.device("cpu"), torch.float32)
        >>> attention(torch.randn(2, 5, 32), cos, sin).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def check_shapes(self) -> None:
        """Raise a ``ValueError`` unless the head attributes agree with the projections' shapes."""
        q, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        problems = []
        if q < 1 or kv < 1 or q % kv:
            problems.append(f"num_kv_heads={kv} must be >= 1 and divide num_heads={q}")
        if self.q_proj.out_features != q * d:
            problems.append(f"q_proj has {self.q_proj.out_features} outputs, not num_heads * head_dim = {q * d}")
        for name in ("k_proj", "v_proj"):
            proj: nn.Linear = getattr(self, name)
            if proj.out_features != kv * d:
                problems.append(f"{name} has {proj.out_features} outputs, not num_kv_heads * head_dim = {kv * d}")
        if self.o_proj.in_features != q * d:
            problems.append(f"o_proj has {self.o_proj.in_features} inputs, not num_heads * head_dim = {q * d}")
        if problems:
            raise ValueError(
                "Attention's head attributes disagree with its weights: "
                + "; ".join(problems)
                + ". After removing heads, shrink q_proj/k_proj/v_proj (rows) and o_proj (columns) and set "
                "num_heads, num_kv_heads and head_dim to match."
            )

    @override
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        self.check_shapes()
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``; the hidden width is the weights' own.

    To remove hidden neurons, drop rows of ``gate_proj`` and ``up_proj`` and the same columns of ``down_proj``.

    Example:
        >>> mlp = SwiGLU(hidden_size=16, intermediate_size=40)
        >>> mlp(torch.randn(2, 3, 16)).shape, mlp.intermediate_size
        (torch.Size([2, 3, 16]), 40)
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    @property
    def intermediate_size(self) -> int:
        """The hidden width, read from ``gate_proj``."""
        return self.gate_proj.out_features

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A pre-norm block: ``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            int(config.num_key_value_heads or config.num_attention_heads),  # both set by GPTConfig.__post_init__
            int(config.head_dim or config.hidden_size // config.num_attention_heads),
            bias=config.attention_bias,
        )
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    @override
    def forward(self, x: Tensor, rotary: RotaryEmbedding) -> Tensor:
        cos, sin = rotary(x.shape[1], self.self_attn.head_dim, x.device, x.dtype)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    """A Llama-style causal language model: ``(batch, T)`` token ids to ``(batch, T, vocab_size)`` logits.

    ``embed_tokens``, ``layers`` (an ``nn.ModuleList`` of :class:`DecoderLayer`: ``self_attn`` with ``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj``; ``mlp`` with ``gate_proj``, ``up_proj``, ``down_proj``), ``norm`` and
    ``lm_head``. ``config`` records the shape the model was built with; after structured pruning the layers'
    own attributes and weights are the truth (:meth:`layer_widths`).

    Args:
        config: The shape.

    Example:
        >>> model = GPT(GPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ...                       intermediate_size=128, max_position_embeddings=32))
        >>> model(torch.randint(0, 256, (2, 32))).shape
        torch.Size([2, 32, 256])
        >>> model.lm_head.weight is model.embed_tokens.weight
        True
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"`config` must be a GPTConfig, got {type(config).__name__}.")
        self.config = dataclasses.replace(config)  # a copy: later changes to the caller's config do not leak in
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rope_theta)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        """Normal(0, ``initializer_range``) weights, zero biases, unit norms; the residual-stream projections
        (``o_proj``, ``down_proj``) scaled by ``1 / sqrt(2 * num_hidden_layers)`` (as GPT-2 does)."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, std=residual_std if last in ("o_proj", "down_proj") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)

    def layer_widths(self) -> list[dict[str, int]]:
        """Each layer's ``num_heads``, ``num_kv_heads``, ``head_dim`` and ``intermediate_size``, as it is now.

        Example:
            >>> model = GPT(GPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
            >>> model.layer_widths()
            [{'num_heads': 2, 'num_kv_heads': 2, 'head_dim': 16, 'intermediate_size': 384}]
        """
        widths = []
        for layer in self.layers:
            attention, mlp = cast(DecoderLayer, layer).self_attn, cast(DecoderLayer, layer).mlp
            widths.append(
                {
                    "num_heads": attention.num_heads,
                    "num_kv_heads": attention.num_kv_heads,
                    "head_dim": attention.head_dim,
                    "intermediate_size": mlp.intermediate_size,
                }
            )
        return widths

    @override
    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.ndim != 2 or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(
                f"`input_ids` must be a (batch, T) tensor of integer token ids, got shape {tuple(input_ids.shape)} "
                f"and dtype {input_ids.dtype}."
            )
        limit = self.config.max_position_embeddings
        if input_ids.shape[1] > limit:
            raise ValueError(
                f"`input_ids` has {input_ids.shape[1]} tokens, more than max_position_embeddings={limit}: "
                "shorten the sequences or build the model with a larger max_position_embeddings."
            )
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, self.rotary)
        return self.lm_head(self.norm(x))
