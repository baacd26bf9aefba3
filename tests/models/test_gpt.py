"""The Llama-style GPT (causality, grouped-query attention, per-layer widths, tied embeddings) and LanguageModel."""

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.data import PySourceDataModule
from lightning_prune.models import GPT, GPTConfig, LanguageModel, evaluate_perplexity
from lightning_prune.models.gpt import Attention, RotaryEmbedding, apply_rotary
from lightning_prune.models.language import WarmupCosine, next_token_loss
from lightning_prune.training.distillation import kd_loss

SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
    "max_position_embeddings": 32,
}


def small_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()


def _rope(length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding()(length, head_dim, torch.device("cpu"), torch.float32)


def reference_attention(attention: Attention, x: torch.Tensor) -> torch.Tensor:
    """Causal attention written out: per query head, its key/value head, an explicit mask, softmax."""
    batch, length, _ = x.shape
    d, groups = attention.head_dim, attention.num_heads // attention.num_kv_heads
    cos, sin = _rope(length, d)
    q = attention.q_proj(x).view(batch, length, attention.num_heads, d)
    k = attention.k_proj(x).view(batch, length, attention.num_kv_heads, d)
    v = attention.v_proj(x).view(batch, length, attention.num_kv_heads, d)
    mask = torch.ones(length, length).tril().bool()
    heads = []
    for h in range(attention.num_heads):
        qh = apply_rotary(q[:, :, h], cos, sin)
        kh = apply_rotary(k[:, :, h // groups], cos, sin)
        scores = (qh @ kh.transpose(1, 2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, h // groups])
    return attention.o_proj(torch.cat(heads, dim=-1))


# --- the model -------------------------------------------------------------------------------------------------


def test_attention_equals_the_written_out_reference():
    torch.manual_seed(0)
    attention = Attention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8)
    x = torch.randn(2, 7, 32)
    expected = reference_attention(attention, x)
    assert torch.allclose(attention(x, *_rope(7, 8)), expected, atol=1e-5)


def test_changing_a_later_token_leaves_earlier_logits_unchanged():
    model = small_gpt()
    x = torch.randint(0, 256, (2, 20))
    changed = x.clone()
    changed[:, 12] = (x[:, 12] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])  # the change is seen from its own position on
    assert (a[:, 13:] - b[:, 13:]).abs().amax(dim=-1).min() > 0  # ...at every later position


def test_grouped_query_attention_equals_repeating_the_key_value_heads():
    torch.manual_seed(0)
    gqa = Attention(hidden_size=32, num_heads=6, num_kv_heads=2, head_dim=8)
    mha = Attention(hidden_size=32, num_heads=6, num_kv_heads=6, head_dim=8)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            heads = getattr(gqa, name).weight.view(2, 8, 32)
            # Query heads 0-2 share key/value head 0, heads 3-5 share head 1.
            getattr(mha, name).weight.copy_(heads.repeat_interleave(3, dim=0).reshape(48, 32))
    x = torch.randn(3, 9, 32)
    cos, sin = _rope(9, 8)
    assert torch.allclose(gqa(x, cos, sin), mha(x, cos, sin), atol=1e-6)
    # ...and not with the other grouping (tile instead of repeat_interleave): the order matters.
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):
            heads = getattr(gqa, name).weight.view(2, 8, 32)
            getattr(mha, name).weight.copy_(heads.repeat(3, 1, 1).reshape(48, 32))
    assert not torch.allclose(gqa(x, cos, sin), mha(x, cos, sin), atol=1e-4)


def _shrink(linear: nn.Linear, rows: list[int] | None = None, columns: list[int] | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, columns] if columns is not None else weight
    smaller = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        smaller.weight.copy_(weight)
    return smaller


def _head_rows(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + i for h in heads for i in range(head_dim)]


def test_layers_with_their_own_head_counts_and_mlp_widths_compute_what_the_masked_model_does():
    model = small_gpt(tie_word_embeddings=False)  # 4 query heads of 8, 2 key/value heads, MLP of 48
    masked = copy.deepcopy(model)
    layer0, layer1 = model.layers[0], model.layers[1]
    # Layer 0: drop key/value head 1 with the query heads that share it (2 and 3).
    a0 = layer0.self_attn
    a0.q_proj = _shrink(a0.q_proj, rows=_head_rows([0, 1], 8))
    a0.k_proj = _shrink(a0.k_proj, rows=_head_rows([0], 8))
    a0.v_proj = _shrink(a0.v_proj, rows=_head_rows([0], 8))
    a0.o_proj = _shrink(a0.o_proj, columns=_head_rows([0, 1], 8))
    a0.num_heads, a0.num_kv_heads = 2, 1
    # Layer 1: drop query heads 1 and 3 (one per group; both key/value heads stay) and 28 MLP neurons.
    a1 = layer1.self_attn
    a1.q_proj = _shrink(a1.q_proj, rows=_head_rows([0, 2], 8))
    a1.o_proj = _shrink(a1.o_proj, columns=_head_rows([0, 2], 8))
    a1.num_heads = 2
    keep = sorted([*range(0, 48, 3), 1, 4, 7, 10])
    mlp = layer1.mlp
    mlp.gate_proj = _shrink(mlp.gate_proj, rows=keep)
    mlp.up_proj = _shrink(mlp.up_proj, rows=keep)
    mlp.down_proj = _shrink(mlp.down_proj, columns=keep)
    # The same model with the removed heads' and neurons' outputs zeroed instead.
    with torch.no_grad():
        masked.layers[0].self_attn.o_proj.weight[:, 16:] = 0
        masked.layers[1].self_attn.o_proj.weight[:, 8:16] = 0
        masked.layers[1].self_attn.o_proj.weight[:, 24:] = 0
        dropped = [i for i in range(48) if i not in keep]
        masked.layers[1].mlp.down_proj.weight[:, dropped] = 0

    assert model.layer_widths() == [
        {"num_heads": 2, "num_kv_heads": 1, "head_dim": 8, "intermediate_size": 48},
        {"num_heads": 2, "num_kv_heads": 2, "head_dim": 8, "intermediate_size": 20},
    ]
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())


def test_head_attributes_that_disagree_with_the_weights_fail_clearly():
    model = small_gpt()
    attention = model.layers[0].self_attn
    attention.q_proj = _shrink(attention.q_proj, rows=_head_rows([0, 1], 8))  # num_heads left at 4
    with pytest.raises(ValueError, match=r"q_proj has 16 outputs, not num_heads \* head_dim = 32.*shrink q_proj"):
        model(torch.zeros(1, 4, dtype=torch.long))
    attention.num_heads = 3
    with pytest.raises(ValueError, match=r"num_kv_heads=2 must be >= 1 and divide num_heads=3"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_tied_and_untied_embeddings():
    tied, untied = small_gpt(), small_gpt(tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == 256 * 32
    optimizer = torch.optim.SGD(tied.parameters(), lr=0.1)
    tied.train()
    F.cross_entropy(tied(torch.randint(0, 256, (2, 8))).flatten(0, 1), torch.randint(0, 256, (16,))).backward()
    optimizer.step()
    assert tied.lm_head.weight is tied.embed_tokens.weight  # still one matrix, trained by both uses
    fresh = small_gpt(seed=1)
    fresh.load_state_dict(tied.state_dict())
    assert fresh.lm_head.weight is fresh.embed_tokens.weight and torch.equal(fresh.lm_head.weight, tied.lm_head.weight)


def test_the_model_is_a_llama_and_matches_hugging_faces():
    transformers = pytest.importorskip("transformers")
    model = small_gpt(tie_word_embeddings=False)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    llama = transformers.LlamaForCausalLM(config).eval()
    state = {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()}
    llama.load_state_dict(state, strict=True)
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.allclose(model(x), llama(input_ids=x).logits, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_key_value_heads": 3}, r"`num_key_value_heads` must divide `num_attention_heads`.*got 3 and 4"),
        ({"hidden_size": 30}, r"`hidden_size` must be a multiple of `num_attention_heads` when `head_dim` is None"),
        ({"head_dim": 7}, r"`head_dim` must be even \(rotary embeddings rotate pairs\), got 7"),
        ({"num_hidden_layers": 0}, r"`num_hidden_layers` must be an integer >= 1, got 0"),
        ({"vocab_size": 2.5}, r"`vocab_size` must be an integer >= 1, got 2\.5"),
        ({"rope_theta": 0}, r"`rope_theta` must be a number > 0, got 0"),
        ({"tie_word_embeddings": "yes"}, r"`tie_word_embeddings` must be a bool, got 'yes'"),
    ],
)
def test_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**SMALL, **overrides})


def test_bad_inputs():
    model = small_gpt()
    with pytest.raises(ValueError, match=r"`input_ids` must be a \(batch, T\) tensor of integer token ids.*float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"`input_ids` has 33 tokens, more than max_position_embeddings=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match=r"`config` must be a GPTConfig, got dict"):
        GPT(SMALL)  # type: ignore[arg-type]


def test_head_dim_may_differ_from_hidden_size_over_heads():
    model = small_gpt(head_dim=16)  # 4 heads of 16 = 64 projected features from a width of 32
    assert model.layers[0].self_attn.q_proj.weight.shape == (64, 32)
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 256)


# --- perplexity and the LightningModule --------------------------------------------------------------------------


class Constant(nn.Module):
    """The same next-token distribution everywhere (a learnable bias over the vocabulary)."""

    def __init__(self, vocab: int = 4) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([2.0, 0.0, -1.0, -1.0][:vocab]))
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.bias.expand(*x.shape, -1)


def _uneven_loader() -> DataLoader:
    # 3 windows whose targets are token 0 (likely), then 2 whose targets are token 1 (unlikely): batches of 3 and 2.
    x = torch.zeros(5, 6, dtype=torch.long)
    y = torch.tensor([0, 0, 0, 1, 1]).repeat_interleave(6).view(5, 6)
    return DataLoader(TensorDataset(x, y), batch_size=3)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**options, **kwargs})


def test_split_perplexity_is_exp_of_the_token_mean_loss_not_a_mean_of_batch_perplexities(tmp_path):
    log_p = torch.log_softmax(torch.tensor([2.0, 0.0, -1.0, -1.0]), dim=0)
    l0, l1 = -float(log_p[0]), -float(log_p[1])
    token_mean = (18 * l0 + 12 * l1) / 30
    module = LanguageModel(Constant())
    (val,) = _trainer(tmp_path).validate(module, dataloaders=_uneven_loader(), verbose=False)
    (test,) = _trainer(tmp_path).test(module, dataloaders=_uneven_loader(), verbose=False)
    for metrics, stage in ((val, "val"), (test, "test")):
        assert metrics[f"{stage}/loss"] == pytest.approx(token_mean, rel=1e-5)
        assert metrics[f"{stage}/ppl"] == pytest.approx(math.exp(token_mean), rel=1e-5)
        assert metrics[f"{stage}/ppl"] != pytest.approx((math.exp(l0) + math.exp(l1)) / 2, rel=1e-3)
        assert metrics[f"{stage}/ppl"] != pytest.approx(math.exp((l0 + l1) / 2), rel=1e-3)  # batch-mean loss
    assert evaluate_perplexity(module.model, _uneven_loader()) == pytest.approx(math.exp(token_mean), rel=1e-5)


def test_evaluate_perplexity_runs_in_eval_mode_and_restores_the_mode():
    model = Constant().train()
    evaluate_perplexity(model, _uneven_loader())
    assert model.seen_training == [False, False] and model.training
    model.eval()
    evaluate_perplexity(model, _uneven_loader())
    assert not model.training
    with pytest.raises(ValueError, match=r"`loader` yielded no tokens"):
        evaluate_perplexity(model, [])


def test_next_token_loss_checks_shapes():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 4\) do not match the targets \(2, 4\)"):
        next_token_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_warmup_then_cosine_then_milestones():
    f = WarmupCosine(warmup_steps=4, decay_steps=12, min_ratio=0.1, milestone_steps=(10,), gamma=0.5)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert f(9) > f(10) / 0.5 * 0.5 and f(10) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75))))
    assert f(12) == f(100) == pytest.approx(0.1 * 0.5)
    constant = WarmupCosine(warmup_steps=2, cosine=False)
    assert [constant(s) for s in (0, 1, 2, 50)] == [0.5, 1.0, 1.0, 1.0]


def write_text_corpus(root: Path) -> None:
    """Forty small, very regular files: a tiny model learns them within a few dozen steps."""
    for i in range(40):
        lines = "".join(f"def add_{j}(x):\n    return x + {j}\n\n" for j in range(i % 7, i % 7 + 12))
        (root / f"m{i}.py").write_text(lines)


def test_a_trainer_run_on_a_tiny_corpus_lowers_the_validation_loss(tmp_path):
    write_text_corpus(tmp_path)
    data = PySourceDataModule(
        root=tmp_path,
        seq_len=32,
        batch_size=16,
        val_fraction=0.15,
        test_fraction=0.15,
        samples_per_epoch=16 * 15,
        max_eval_windows=16,
        seed=0,
    )
    torch.manual_seed(0)
    net = GPT(
        GPTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32
        )
    )
    module = LanguageModel(net, lr=1e-2, warmup_steps=5, min_lr_ratio=0.1)

    class ValLoss(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []
            self.perplexities: list[float] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.values.append(float(trainer.callback_metrics["val/loss"]))
                self.perplexities.append(float(trainer.callback_metrics["val/ppl"]))

    history = ValLoss()
    trainer = _trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0, callbacks=[history])
    (before,) = trainer.validate(module, datamodule=data, verbose=False)
    trainer.fit(module, datamodule=data)
    assert float(trainer.callback_metrics["train/loss"]) < history.values[0]
    (test,) = trainer.test(module, datamodule=data, verbose=False)

    losses = history.values  # before training, then after each of the 3 epochs
    assert len(losses) == 4 and losses[0] == pytest.approx(before["val/loss"])
    assert losses[0] == pytest.approx(math.log(256), abs=0.3)  # untrained: about uniform over the bytes
    assert losses[-1] < 0.6 * losses[0] and losses[-1] < losses[1]
    assert history.perplexities == pytest.approx([math.exp(v) for v in losses], rel=1e-5)
    assert test["test/ppl"] == pytest.approx(math.exp(test["test/loss"]), rel=1e-5) and test["test/ppl"] < 100
    # The learning rate warmed up, then decayed along the cosine to min_lr_ratio at the run's last step (45).
    assert trainer.global_step == 45
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.1, rel=1e-6)
    # Matrices and embeddings decay; norms do not.
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(p.ndim == 1 for p in optimizer.param_groups[1]["params"])
    assert data.hparams["python_version"] and data.num_files["train"] > data.num_files["val"] > 0


def test_distillation_works_on_sequence_logits():
    student_logits, teacher_logits = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    # The (B, T, V) term is the mean over tokens of the per-token KL: the same as on (B * T, V) logits.
    assert torch.allclose(
        kd_loss(student_logits, teacher_logits, 2.0),
        kd_loss(student_logits.view(10, 7), teacher_logits.view(10, 7), 2.0),
    )
    module = LanguageModel(small_gpt()).train()
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        plain = next_token_loss(module(x), y)
    module.set_teacher(copy.deepcopy(module.model), alpha=0.25, temperature=2.0)  # the same model: the term is 0
    assert module.training_step((x, y), 0).item() == pytest.approx(float(0.75 * plain), rel=1e-5)
    other = small_gpt(seed=1)
    module.set_teacher(other, alpha=0.25, temperature=2.0)
    with torch.no_grad():
        term = kd_loss(module(x), other(x), 2.0)
    assert module.training_step((x, y), 0).item() == pytest.approx(float(0.25 * term + 0.75 * plain), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0}, r"`lr` must be a number > 0, got 0"),
        ({"optimizer": "lbfgs"}, r"`optimizer` must be one of \('sgd', 'adam', 'adamw'\), got 'lbfgs'"),
        ({"lr_schedule": "linear"}, r"`lr_schedule` must be one of \('cosine', 'constant'\), got 'linear'"),
        ({"warmup_steps": -1}, r"`warmup_steps` must be an integer >= 0, got -1"),
        ({"min_lr_ratio": 1.5}, r"`min_lr_ratio` must be in \[0, 1\] \(a fraction of `lr`\), got 1\.5"),
        ({"decay_steps": 0}, r"`decay_steps` must be an integer >= 1 or None"),
        ({"betas": (0.9,)}, r"`betas` must be two numbers in \[0, 1\)"),
        ({"lr_milestones": [-1]}, r"`lr_milestones` must be a sequence of integer epochs >= 0"),
        ({"weight_decay": -0.1}, r"`weight_decay` must be >= 0, got -0\.1"),
    ],
)
def test_language_model_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LanguageModel(Constant(), **kwargs)
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module, got str"):
        LanguageModel("gpt")  # type: ignore[arg-type]


def test_a_cosine_over_an_unknown_length_asks_for_decay_steps(tmp_path):
    loader = _uneven_loader()
    trainer = _trainer(tmp_path, max_epochs=-1, max_steps=-1, max_time={"seconds": 5})
    with pytest.raises(ValueError, match=r"`decay_steps` is None .*the run's length is unknown: set `decay_steps`"):
        trainer.fit(LanguageModel(Constant()), train_dataloaders=loader)


def test_lr_milestones_are_epochs_turned_into_steps(tmp_path):
    module = LanguageModel(Constant(), lr=0.1, lr_schedule="constant", lr_milestones=[1], lr_gamma=0.5)
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, train_dataloaders=_uneven_loader())  # 2 batches an epoch
    assert module.lr_factor().milestone_steps == (2,)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
