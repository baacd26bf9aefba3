"""The language-model main job: a small GPT trained dense on the standard library's sources, its attention heads and
MLP neurons pruned on the cubic schedule with fine-tuning, then compacted; perplexity, parameters, MACs, latency.

    .venv/bin/python benchmarks/lm.py                       # 3 seeds
    .venv/bin/python benchmarks/lm.py --seeds 0 --quick     # a smoke test

Per seed: :class:`lightning_prune.models.GPT` with ``model=gpt_tiny``'s shape (4 layers, 8 query heads sharing 4
key/value heads, SwiGLU MLP of 384, 0.82M parameters) on :class:`lightning_prune.data.PySourceDataModule`
(``seq_len`` 256, batch 16), :class:`lightning_prune.models.LanguageModel` (AdamW lr 3e-3, 50 warm-up steps,
cosine to 0.1x over the run). ``--dense-epochs`` dense, then a :class:`~lightning_prune.PruningCallback` with
``structure=HeadStructure()`` (a key/value head goes with its query heads; neurons with their gate, up rows and down
column), L2 importance, ``scope="layer"`` (uniform widths) grows the masks on the cubic schedule over
``--prune-epochs``, then ``--finetune-epochs`` of fine-tuning. Validation perplexity over the fixed validation
windows: dense (at the first pruning epoch), pruned (masked, end of the run) and compact
(:func:`lightning_prune.deploy.compact_heads`). Parameters and MACs (Linear layers, per sequence of 256 bytes) of
the masked and compact models; latency at batch 1, one thread, median of 20 (on a shared machine: contended).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import cpu_trainer, environment, markdown_table, mean_std, quiet_lightning


def run(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from lightning_prune import PruningCallback
    from lightning_prune.data import PySourceDataModule
    from lightning_prune.deploy import compact_heads, count_macs, count_parameters, measure_latency
    from lightning_prune.models import GPT, GPTConfig, LanguageModel, evaluate_perplexity
    from lightning_prune.structures import HeadStructure

    data = PySourceDataModule(
        seq_len=256, batch_size=16, seed=seed, samples_per_epoch=args.samples_per_epoch, max_eval_windows=128
    )
    data.setup()
    torch.manual_seed(seed)
    config = GPTConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=384,
        max_position_embeddings=256,
    )
    module = LanguageModel(GPT(config), lr=3e-3, warmup_steps=50)
    start, end = args.dense_epochs, args.dense_epochs + args.prune_epochs - 1
    pruning = PruningCallback(
        sparsity=args.sparsity,
        structure=HeadStructure(),
        importance="l2",
        scope="layer",
        schedule="cubic",
        start_epoch=start,
        end_epoch=end,
    )
    dense: dict[str, float] = {}

    class DensePerplexity(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == start and not dense:
                dense["ppl"] = evaluate_perplexity(pl_module.model, data.val_dataloader())
                dense["params"] = count_parameters(pl_module.model)

    epochs = args.dense_epochs + args.prune_epochs + args.finetune_epochs
    began = time.perf_counter()
    cpu_trainer(epochs, [pruning, DensePerplexity()]).fit(module, data)
    fit_s = time.perf_counter() - began
    model = module.model.eval()
    pruned_ppl = evaluate_perplexity(model, data.val_dataloader())
    small = compact_heads(model, pruning.masks).eval()
    compact_ppl = evaluate_perplexity(small, data.val_dataloader())
    x = torch.randint(0, 256, (1, 256))
    with torch.no_grad():
        rel = float((model(x) - small(x)).norm() / model(x).norm())
    return {
        "seed": seed,
        "dense_ppl": dense["ppl"],
        "pruned_ppl": pruned_ppl,
        "compact_ppl": compact_ppl,
        "rel_err": rel,
        "params_dense": dense["params"],
        "params_compact": count_parameters(small),
        "params_removed": 1 - count_parameters(small) / dense["params"],
        "macs_dense": count_macs(model, x).dense_macs,
        "macs_compact": count_macs(small, x).dense_macs,
        "latency_dense_ms": 1e3 * measure_latency(model, x, threads=1),
        "latency_compact_ms": 1e3 * measure_latency(small, x, threads=1),
        "widths": small.layer_widths()[0],
        "fit_s": fit_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsity", type=float, default=0.26, help="fraction of attention and MLP parameters")
    parser.add_argument("--dense-epochs", type=int, default=4)
    parser.add_argument("--prune-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--samples-per-epoch", type=int, default=800, help="16 per step")
    parser.add_argument("--quick", action="store_true", help="1 epoch each, 64 samples: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.dense_epochs, args.prune_epochs, args.finetune_epochs, args.samples_per_epoch = 1, 1, 1, 64
    quiet_lightning(r".*val_dataloader.*", r".*validation_step.*")
    results = []
    for seed in args.seeds:
        results.append(run(seed, args))
        print(f"seed {seed}: {results[-1]}", flush=True)  # each seed as it ends: a long run can be cut short
    print(environment())
    rows = [
        [
            r["seed"],
            f"{r['dense_ppl']:.3f}",
            f"{r['pruned_ppl']:.3f}",
            f"{r['compact_ppl']:.3f}",
            f"{100 * (r['compact_ppl'] / r['dense_ppl'] - 1):+.1f}%",
            f"{r['rel_err']:.1e}",
            f"{r['params_dense']:,} -> {r['params_compact']:,} ({r['params_removed']:.1%} fewer)",
            f"{r['macs_dense']:,} -> {r['macs_compact']:,}",
            f"{r['latency_dense_ms']:.1f} -> {r['latency_compact_ms']:.1f}",
            r["widths"],
            f"{r['fit_s']:.0f}",
        ]
        for r in results
    ]
    header = [
        "seed",
        "dense ppl",
        "pruned ppl",
        "compact ppl",
        "compact vs dense",
        "rel err",
        "parameters",
        "MACs (Linear, per 256 bytes)",
        "latency b1 ms (contended)",
        "compact layer widths",
        "fit s (contended)",
    ]
    ratios = [r["compact_ppl"] / r["dense_ppl"] for r in results]
    print(markdown_table(header, rows))
    print(f"compact / dense perplexity over {len(results)} seed(s): {mean_std(ratios, digits=4)}")


if __name__ == "__main__":
    main()
