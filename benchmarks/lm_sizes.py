"""Sizes for the language-model main job: training throughput and the perplexity a few dense minutes reach.

    .venv/bin/python benchmarks/lm_sizes.py                # 3 candidates: throughput, then 3.5 dense minutes each
    .venv/bin/python benchmarks/lm_sizes.py --quick        # small blocks and 20 s runs: a smoke test
    .venv/bin/python benchmarks/lm_sizes.py --skip-quality # throughput only

The candidates are :class:`lightning_prune.models.GPT` configurations (byte vocabulary, 4 layers, 8 query heads
sharing 4 key/value heads) on :class:`lightning_prune.data.PySourceDataModule` (the standard library's sources,
``seq_len`` 256, batch 16: 4,096 tokens a step).

1. **Throughput**: one training step (forward, next-byte cross-entropy, backward, AdamW step) in a plain PyTorch
   loop on real batches, ``torch.set_num_threads(2)``. Blocks of A B C (the order rotating from block to block);
   in each, every candidate runs ``--warmup`` untimed steps then ``--steps`` timed ones, and its median step is
   kept. Before each block the script waits for the other processes to go quiet; a block during which they used
   more than ``--max-other-load`` cores on average is discarded and run again. Reported: the median over blocks
   of ms/step and tokens/s, and each candidate's step time over the first one's (median of per-block ratios,
   [min, max]).
2. **Quality**: for each candidate, a dense Lightning run (:class:`lightning_prune.models.LanguageModel`, AdamW
   lr 3e-3, betas (0.9, 0.95), weight decay 0.1, 50 warm-up steps, cosine to 0.1x) of as many steps as
   ``--minutes`` allow at the throughput measured in part 1, then the validation perplexity over 256 fixed
   windows (65,536 bytes) with :func:`lightning_prune.models.evaluate_perplexity`. Reported: steps, tokens,
   wall time of the fit (start-up and validation included; slower than planned when the machine was busy), the
   median Lightning training step (batch start to batch end, data loading excluded), the other processes' load
   and the perplexity, per seed.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from typing import Any

from _common import (
    THREADS,
    OtherLoad,
    add_contention_arguments,
    environment,
    markdown_table,
    median,
    wait_for_quiet,
)

#: name -> GPTConfig keyword arguments (vocab_size and max_position_embeddings come from the data).
CANDIDATES: dict[str, dict[str, int]] = {
    "h128": {"hidden_size": 128, "intermediate_size": 384},
    "h192": {"hidden_size": 192, "intermediate_size": 512},
    "h256": {"hidden_size": 256, "intermediate_size": 704},
}
SHARED = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4}
SEQ_LEN, BATCH = 256, 16


def _model(name: str, seed: int) -> Any:
    import torch

    from lightning_prune.models import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=256, max_position_embeddings=SEQ_LEN, **SHARED, **CANDIDATES[name]))


def throughput(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import torch
    import torch.nn.functional as F

    from lightning_prune.data import PySourceDataModule

    torch.set_num_threads(THREADS)
    data = PySourceDataModule(seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    data.setup()
    batches = iter(data.train_dataloader())
    names = list(CANDIDATES)
    models = {name: _model(name, 0) for name in names}
    optimizers = {name: torch.optim.AdamW(models[name].parameters(), lr=1e-3) for name in names}
    step_ms: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    discarded = 0
    block = 0
    while block < args.blocks:
        if args.quiet_cores > 0:
            wait_for_quiet(args.quiet_cores, args.quiet_timeout)
        order = names[block % len(names) :] + names[: block % len(names)]
        result: dict[str, float] = {}
        gc.collect()
        gc.disable()
        with OtherLoad() as load:
            for name in order:
                model, optimizer = models[name], optimizers[name]
                times = []
                for i in range(args.warmup + args.steps):
                    x, y = next(batches)
                    start = time.perf_counter()
                    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - start)
                result[name] = statistics.median(times) * 1000
        gc.enable()
        if load.cores > args.max_other_load and discarded < args.max_attempts * args.blocks:
            discarded += 1
            print(f"block {block}: discarded (other processes used {load.cores:.2f} cores)", flush=True)
            continue
        for name in names:
            step_ms[name].append(result[name])
            ratios[name].append(result[name] / result[names[0]])
        print(f"block {block}: " + ", ".join(f"{n} {result[n]:.0f} ms" for n in names), flush=True)
        block += 1
    print(f"{discarded} block(s) discarded for contention")
    out = {}
    for name in names:
        ms = median(step_ms[name])
        out[name] = {
            "params": sum(p.numel() for p in models[name].parameters()),
            "ms": ms,
            "tokens_per_s": BATCH * SEQ_LEN / ms * 1000,
            "ratio": median(ratios[name]),
            "ratio_min": min(ratios[name]),
            "ratio_max": max(ratios[name]),
        }
    return out


def quality(name: str, seed: int, steps: int, args: argparse.Namespace) -> dict[str, float]:
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        """Wall time of each training step (batch start to batch end) and of the whole fit's training."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.first: float | None = None
            self._start = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self._start = time.perf_counter()
            self.first = self._start if self.first is None else self.first

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.times.append(time.perf_counter() - self._start)
            if trainer.global_step % 100 == 0:
                print(f"  {name} seed {seed}: step {trainer.global_step}/{steps}", flush=True)

    from lightning_prune.data import PySourceDataModule
    from lightning_prune.models import LanguageModel, evaluate_perplexity

    torch.set_num_threads(args.quality_threads)
    steps_per_epoch = min(100, steps)
    data = PySourceDataModule(
        seq_len=SEQ_LEN, batch_size=BATCH, samples_per_epoch=steps_per_epoch * BATCH, max_eval_windows=64, seed=seed
    )
    module = LanguageModel(_model(name, seed), lr=3e-3, weight_decay=0.1, warmup_steps=min(50, steps // 10))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=max(1, math.ceil(steps / steps_per_epoch) // 4),
        callbacks=[timer := StepTimer()],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    step_ms = median(timer.times[5:] or timer.times) * 1000
    final = PySourceDataModule(seq_len=SEQ_LEN, batch_size=64, max_eval_windows=256, seed=seed)
    final.setup()
    ppl = evaluate_perplexity(module.model, final.val_dataloader())
    tokens = trainer.global_step * BATCH * SEQ_LEN
    return {"steps": trainer.global_step, "tokens": tokens, "wall_s": wall, "step_ms": step_ms, "ppl": ppl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=3.5, help="planned dense training time per candidate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument(
        "--quality-threads",
        type=int,
        default=THREADS,
        help="torch threads of the dense runs (1 avoids oversubscription stalls when another process is busy; "
        "the perplexity after a given number of steps does not depend on it)",
    )
    parser.add_argument(
        "--step-ms",
        type=float,
        nargs="+",
        help="skip the throughput part and plan the dense runs from these ms/step, one per candidate in order",
    )
    add_contention_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.steps, args.minutes = 2, 3, 20 / 60
    print(environment({"sizes": f"seq_len {SEQ_LEN}, batch {BATCH}, {SHARED}"}), flush=True)
    if args.step_ms:
        if len(args.step_ms) != len(CANDIDATES):
            parser.error(f"--step-ms needs one value per candidate ({', '.join(CANDIDATES)})")
        speed = {name: {"ms": ms} for name, ms in zip(CANDIDATES, args.step_ms)}
        run_quality(args, speed, "(throughput given with --step-ms)")
        return
    speed = throughput(args)
    rows = [
        [
            name,
            f"{speed[name]['params'] / 1e6:.2f}M",
            f"{speed[name]['ms']:.0f}",
            f"{speed[name]['tokens_per_s']:,.0f}",
            f"{speed[name]['ratio']:.2f} [{speed[name]['ratio_min']:.2f}, {speed[name]['ratio_max']:.2f}]",
        ]
        for name in CANDIDATES
    ]
    throughput_table = markdown_table(["model", "params", "ms/step", "tokens/s", "step time / h128's"], rows)
    print(throughput_table, flush=True)
    if args.skip_quality:
        return
    run_quality(args, speed, throughput_table)


def run_quality(args: argparse.Namespace, speed: dict[str, dict[str, float]], throughput_table: str) -> None:
    rows = []
    for name in args.candidates:
        steps = max(10, int(args.minutes * 60 * 1000 / speed[name]["ms"]))
        for seed in args.seeds:
            with OtherLoad() as load:
                result = quality(name, seed, steps, args)
            rows.append(
                [
                    name,
                    seed,
                    result["steps"],
                    f"{result['tokens'] / 1e6:.2f}M",
                    f"{result['wall_s']:.0f}",
                    f"{result['step_ms']:.0f}",
                    f"{load.cores:.2f}",
                    f"{result['ppl']:.3f}",
                ]
            )
            print(rows[-1], flush=True)
    print(throughput_table)
    print()
    header = ["model", "seed", "steps", "tokens", "wall s", "Lightning ms/step", "other cores", "val ppl (256 windows)"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
