"""The transformer configs of ``zoo.py``: small models built from configs, offline (no downloads), random weights.

Each builder returns ``(model, example input, names of the layers that write the output)``: a module in eval mode
that maps one tensor to one tensor (Hugging Face models are wrapped to return their logits), the input ``zoo.py``
times and compares outputs on, and the layers Torch-Pruning must leave whole so that the output keeps its width (the
language models' vocabulary logits, the encoder's read-out). Sizes: 4 layers, hidden 160-192, head width 16, MLP width
512 (Mixtral: 8 experts of 256); 32 tokens of a 256-token vocabulary, or 1x32x160 features for
``nn.TransformerEncoder``.

* ``nn_transformer_encoder``: ``nn.TransformerEncoder`` (10 heads), a linear read-out of 10 classes;
* ``hf_bert``: Hugging Face ``BertForMaskedLM`` (10 heads);
* ``hf_gpt2``: ``GPT2LMHeadModel`` (10 heads, transposed ``Conv1D`` projections);
* ``hf_llama``: ``LlamaForCausalLM``, 12 query heads sharing 4 key/value heads (grouped-query attention);
* ``hf_qwen2``: ``Qwen2ForCausalLM``, 12 query heads sharing 6 key/value heads;
* ``hf_mixtral``: ``MixtralForCausalLM``, 12 query heads sharing 4 key/value heads, 8 experts of width 256, 2 per
  token (mixture of experts: whole experts are pruned);
* ``litgpt_gpt``: LitGPT's ``GPT``, 12 query heads sharing 4 key/value groups, ``LLaMAMLP`` (only when ``litgpt`` is
  installed).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

VOCAB, TOKENS = 256, 32
Built = tuple[nn.Module, torch.Tensor, list[str]]


class Logits(nn.Module):
    """A Hugging Face language model as a plain ``tokens -> logits`` network."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(tokens).logits


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` with a linear read-out of the mean token."""

    def __init__(self, width: int = 160, heads: int = 10, layers: int = 4, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=512, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, TOKENS))


def _encoder() -> Built:
    return Encoder(), torch.randn(1, TOKENS, 160), ["head"]


def _bert() -> Built:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=160,
        num_hidden_layers=4,
        num_attention_heads=10,
        intermediate_size=512,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return Logits(BertForMaskedLM(config)), _tokens(), ["hf.cls.predictions.decoder"]


def _gpt2() -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=160, n_layer=4, n_head=10, n_inner=512)
    return Logits(GPT2LMHeadModel(config)), _tokens(), ["hf.lm_head"]


def _causal(family: str, kv: int, intermediate: int = 512, **extra: Any) -> Callable[[], Built]:
    def build() -> Built:
        import transformers

        config = getattr(transformers, f"{family}Config")(
            vocab_size=VOCAB,
            hidden_size=192,
            num_hidden_layers=4,
            num_attention_heads=12,
            num_key_value_heads=kv,
            intermediate_size=intermediate,
            max_position_embeddings=64,
            **extra,
        )
        return Logits(getattr(transformers, f"{family}ForCausalLM")(config)), _tokens(), ["hf.lm_head"]

    return build


def _litgpt() -> Built:
    import litgpt
    from litgpt.model import GPT

    config = litgpt.Config(
        n_layer=4,
        n_head=12,
        n_query_groups=4,
        n_embd=192,
        block_size=64,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        mlp_class_name="LLaMAMLP",
        intermediate_size=512,
        norm_class_name="RMSNorm",
        bias=False,
    )
    return GPT(config), _tokens(), ["lm_head"]


BUILDERS: dict[str, Callable[[], Built]] = {
    "nn_transformer_encoder": _encoder,
    "hf_bert": _bert,
    "hf_gpt2": _gpt2,
    "hf_llama": _causal("Llama", 4),
    "hf_qwen2": _causal("Qwen2", 6),
    "hf_mixtral": _causal(
        # the eager loop over experts: FlopCounterMode does not count the grouped matrix products of the default
        "Mixtral",
        4,
        256,
        num_local_experts=8,
        num_experts_per_tok=2,
        experts_implementation="eager",
    ),
    "litgpt_gpt": _litgpt,
}


def available() -> list[str]:
    """The names of the configs that build here (``litgpt_gpt`` only with ``litgpt`` installed)."""
    return [n for n in BUILDERS if n != "litgpt_gpt" or importlib.util.find_spec("litgpt") is not None]


def build(name: str) -> Built:
    """The model, example input and output layers of config ``name``, in eval mode, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, x, outputs = BUILDERS[name]()
    return model.eval(), x, outputs
