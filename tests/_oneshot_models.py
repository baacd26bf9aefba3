"""Small models and data for the one-shot pruning tests: a pre-norm transformer-like stack with q/k/v/o and MLP
Linears, whose blocks take an attention mask as a keyword argument (as Hugging Face decoder layers do)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm2 = nn.LayerNorm(d)
        self.gate, self.up = nn.Linear(d, ff), nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, s, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
        if attention_mask is not None:
            att = att + attention_mask
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.o(y)
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, ff: int = 64, layers: int = 3, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList([Block(d, heads, ff) for _ in range(layers)])
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        s = input_ids.shape[1]
        causal = torch.full((s, s), float("-inf")).triu(1)
        mask = causal[None, None]
        if attention_mask is not None:  # padding: (batch, seq) of 0/1
            mask = mask + (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, attention_mask=mask)
        return self.head(self.norm(x))


def token_batches(n: int = 4, batch: int = 4, seq: int = 16, vocab: int = 64, seed: int = 1) -> list[dict]:
    """Dict batches with ``input_ids``, ``attention_mask`` (the last positions of some rows padded), ``labels``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return out


def correlated_inputs(tokens: int, features: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Inputs with correlated features and a few large-magnitude ones, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=dtype) / features**0.5
    x = torch.randn(tokens, features, generator=g, dtype=dtype) @ (torch.eye(features, dtype=dtype) + 2 * mix)
    x[:, : max(1, features // 16)] *= 8.0
    return x
