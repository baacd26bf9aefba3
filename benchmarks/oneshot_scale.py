"""One-shot pruning at scale: time and peak memory of Wanda and SparseGPT on a random Llama-like model, and
Wanda's time over one plain calibration forward pass of the same model.

    .venv/bin/python benchmarks/oneshot_scale.py                  # the 70M preset (about 5 minutes here)
    .venv/bin/python benchmarks/oneshot_scale.py --size 1b        # TinyLlama-1.1B's shape, float32
    .venv/bin/python benchmarks/oneshot_scale.py --size 1b --dtype bfloat16 --samples 32 --seq 512
    .venv/bin/python benchmarks/oneshot_scale.py --quick          # a 5M model: a smoke test
    .venv/bin/python benchmarks/oneshot_scale.py --sequential     # also sequential=True, side by side

The model is a pre-norm decoder of our own with the shape of a Llama (RMSNorm, q/k/v/o projections with
grouped key-value heads, causal scaled-dot-product attention, a SwiGLU MLP of gate/up/down projections, an
untied output head), random weights from a seed: the algorithms' cost does not depend on the values. The
calibration data are ``--samples`` random token sequences of length ``--seq`` in batches of ``--batch``.
``prune_one_shot`` runs at 50% unstructured with ``num_samples=--samples``, ``error_batches=0`` (the default,
1, measures each layer's error on the first batch: one more matmul per layer on it; ``--with-error`` times
that as a fourth variant). ``--sequential`` adds ``prune_one_shot(..., sequential=True)`` (each block run once, on all
calibration samples at once) as the variants ``wanda+seq`` and ``sparsegpt+seq``, timed in the same rotation and
measured for memory in their own processes.

Every child first imports the package and runs each method once on a two-block model (imports, code pages,
thread pool), outside what is measured.

* **Time** (one process, ``torch.set_num_threads(--threads)``, 2 by default; with other processes busy, 1 thread
  avoids the stalls of OpenMP threads waiting for a descheduled peer): after a warm-up forward on one batch, repeats of
  [calibration forward, Wanda, SparseGPT] run back to back, in rotating order; the forward pass is the whole
  model (embedding, blocks, norm and head) on every calibration batch under ``torch.no_grad()``. The ratios
  (Wanda / forward, SparseGPT / forward) are medians of the per-repeat ratios. The machine is shared: before
  each repeat the driver waits for other processes to go quiet, and a repeat during which they used more than
  ``--max-other-load`` cores is discarded and run again (at most ``--max-attempts`` times; the table says
  "unstable" when no quiet repeat was had). The dense weights are restored before each variant (untimed): an
  already pruned model has half its scores tied at zero, which changes the cost of the per-row selection.
* **Memory** (a fresh subprocess per method, the driver imports no torch: a child's ``ru_maxrss`` starts from
  its parent's): the peak resident size of the process (``ru_maxrss``) over the model's own bytes, the rise of
  ``ru_maxrss`` during the measured call, and ``1 + rise / model bytes``: the peak relative to the model without
  the constant ~0.85 GiB that importing torch and Lightning costs. The issue's target is a peak of at most 1.3
  times the model's bytes; note that the returned ``MaskSet`` holds one byte per pruned weight (0.25 x a float32
  model's bytes, 0.5 x a bfloat16 one's), unpacked at the end from the bits held while pruning (1/8 of that).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from _common import (
    THREADS,
    OtherLoad,
    add_contention_arguments,
    environment,
    markdown_table,
    median,
    quartiles,
    wait_for_quiet,
)

PRESETS: dict[str, dict[str, int]] = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "5m": {"hidden": 128, "intermediate": 352, "layers": 4, "heads": 4, "kv_heads": 4, "vocab": 8000},
    "70m": {"hidden": 512, "intermediate": 1408, "layers": 12, "heads": 8, "kv_heads": 8, "vocab": 32000},
    "350m": {"hidden": 1024, "intermediate": 2816, "layers": 24, "heads": 16, "kv_heads": 16, "vocab": 32000},
    "1b": {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32000},
}


#: The memory runs: a forward pass, each method, and each method with sequential=True.
RUNS = ["forward", "wanda", "sparsegpt", "wanda+seq", "sparsegpt+seq"]


# --------------------------------------------------------------------------------------------- model
def build_model(shape: dict[str, int], dtype_name: str, seed: int) -> Any:
    import torch
    from torch import nn

    dtype = getattr(torch, dtype_name)
    hidden, heads, kv_heads = shape["hidden"], shape["heads"], shape["kv_heads"]
    head_dim = hidden // heads

    class RMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * self.weight

    def linear(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o, bias=False, dtype=dtype)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_norm, self.post_norm = RMSNorm(), RMSNorm()
            self.q_proj, self.o_proj = linear(hidden, hidden), linear(hidden, hidden)
            self.k_proj, self.v_proj = linear(hidden, kv_heads * head_dim), linear(hidden, kv_heads * head_dim)
            inter = shape["intermediate"]
            self.gate_proj, self.up_proj, self.down_proj = (
                linear(hidden, inter),
                linear(hidden, inter),
                linear(inter, hidden),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            h = self.input_norm(x)
            q = self.q_proj(h).view(b, s, heads, head_dim).transpose(1, 2)
            k = self.k_proj(h).view(b, s, kv_heads, head_dim).transpose(1, 2)
            v = self.v_proj(h).view(b, s, kv_heads, head_dim).transpose(1, 2)
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
            x = x + self.o_proj(y.transpose(1, 2).reshape(b, s, hidden))
            h = self.post_norm(x)
            return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))

    class LlamaLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(shape["vocab"], hidden, dtype=dtype)
            self.layers = nn.ModuleList([Block() for _ in range(shape["layers"])])
            self.norm = RMSNorm()
            self.lm_head = linear(hidden, shape["vocab"])

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = self.embed_tokens(input_ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaLike().eval()


def calibration(shape: dict[str, int], args: argparse.Namespace) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    sizes = [min(args.batch, args.samples - start) for start in range(0, args.samples, args.batch)]
    return [torch.randint(0, shape["vocab"], (n, args.seq), generator=g) for n in sizes]


def model_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prune(model: Any, batches: list[Any], variant: str, args: argparse.Namespace, error_batches: int = 0) -> Any:
    """Run one variant: ``method``, ``method+seq`` (sequential=True) or ``method+error`` (error_batches=1)."""
    from lightning_prune.oneshot import prune_one_shot

    method, _, option = variant.partition("+")
    return prune_one_shot(
        model,
        batches,
        method=method,
        sparsity=0.5,
        num_samples=args.samples,
        error_batches=1 if option == "error" else error_batches,
        sequential=option == "seq",
    )


def forward_pass(model: Any, batches: list[Any]) -> None:
    import torch

    with torch.no_grad():
        for batch in batches:
            model(batch)


def warm_up(args: argparse.Namespace) -> None:
    """Import the package and run every variant once on a one-block model: code pages, thread pool, imports."""
    tiny = {**PRESETS["5m"], "layers": 2}
    small = argparse.Namespace(**{**vars(args), "samples": 2, "seq": 16, "batch": 2})
    for method in ("wanda", "sparsegpt") + (("wanda+seq", "sparsegpt+seq") if args.sequential else ()):
        model = build_model(tiny, args.dtype, args.seed)
        batches = calibration(tiny, small)
        forward_pass(model, batches)
        prune(model, batches, method, small, error_batches=1)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------- children
def child_memory(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    shape = PRESETS[args.size] if args.size else {}
    shape = {**shape, **{k: getattr(args, k) for k in PRESETS["70m"] if getattr(args, k) is not None}}
    warm_up(args)
    model = build_model(shape, args.dtype, args.seed)
    batches = calibration(shape, args)
    before = _maxrss_bytes()
    start = time.perf_counter()
    if args.child == "forward":
        forward_pass(model, batches)
    else:
        masks, _ = prune(model, batches, args.child, args)
        if abs(masks.sparsity() - 0.5) > 1e-3:
            raise RuntimeError(f"{args.child} pruned {masks.sparsity()}")
    seconds = time.perf_counter() - start
    return {
        "method": args.child,
        "seconds": seconds,
        "model_bytes": model_bytes(model),
        "params": sum(p.numel() for p in model.parameters()),
        "before": before,
        "peak": _maxrss_bytes(),
    }


def child_time(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    shape = {**PRESETS[args.size], **{k: getattr(args, k) for k in PRESETS["70m"] if getattr(args, k) is not None}}
    warm_up(args)
    model = build_model(shape, args.dtype, args.seed)
    batches = calibration(shape, args)
    forward_pass(model, batches[:1])
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    variants = ["forward", *args.time_methods] + (["wanda+error"] if args.with_error else [])
    variants += [f"{m}+seq" for m in args.time_methods] if args.sequential else []
    runs: list[dict[str, float]] = []
    discarded = 0
    for repeat in range(args.repeats):
        for _attempt in range(args.max_attempts):
            if args.quiet_cores > 0:
                wait_for_quiet(args.quiet_cores, args.quiet_timeout)
            order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
            times: dict[str, float] = {}
            with OtherLoad() as load:
                for variant in order:
                    model.load_state_dict(dense)  # every method prunes the dense weights
                    start = time.perf_counter()
                    if variant == "forward":
                        forward_pass(model, batches)
                    else:
                        prune(model, batches, variant, args)
                    times[variant] = time.perf_counter() - start
            times["other_load"] = load.cores
            if load.cores <= args.max_other_load:
                runs.append(times)
                break
            discarded += 1
        else:
            runs.append({**times, "unstable": 1.0})
    return {"runs": runs, "discarded": discarded, "params": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------------------------- driver
def spawn(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *sys.argv[1:], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="70m")
    for key in PRESETS["70m"]:
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None, help="override the preset")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=8, help="sequences per calibration batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (1 is robust to other load)")
    parser.add_argument("--with-error", action="store_true", help="also time Wanda with error_batches=1")
    parser.add_argument("--sequential", action="store_true", help="also prune with sequential=True (+seq variants)")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument(
        "--time-methods", nargs="+", choices=["wanda", "sparsegpt"], default=["wanda", "sparsegpt"], help="timed"
    )
    parser.add_argument("--memory-runs", nargs="+", choices=RUNS, default=None, help="default: all that apply")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the 5m preset, 1 repeat")
    parser.add_argument("--child", choices=[*RUNS, "time"], help=argparse.SUPPRESS)
    add_contention_arguments(parser, unit="repeat")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = "5m", 1
    if args.memory_runs is None:
        args.memory_runs = [r for r in RUNS if args.sequential or not r.endswith("+seq")]
    if args.child:
        result = child_time(args) if args.child == "time" else child_memory(args)
        print(json.dumps(result))
        return

    shape = {**PRESETS[args.size], **{k: getattr(args, k) for k in PRESETS["70m"] if getattr(args, k) is not None}}
    print(
        environment(
            threads=args.threads,
            extra={
                "model": f"Llama-like {shape}, {args.dtype}, random weights (seed {args.seed})",
                "data": f"{args.samples} random sequences x {args.seq} tokens, batches of {args.batch}",
                "pruning": "prune_one_shot(sparsity=0.5, unstructured, error_batches=0)"
                + ("; +seq: sequential=True" if args.sequential else ""),
            },
        )
    )
    rows = []
    if not args.skip_memory:
        for method in args.memory_runs:
            r = spawn(args, "--child", method)
            rows.append(
                (
                    method,
                    f"{r['params'] / 1e6:.1f}M",
                    f"{r['model_bytes'] / 2**20:.0f}",
                    f"{r['seconds']:.1f}",
                    f"{r['peak'] / 2**20:.0f} MiB",
                    f"{r['peak'] / r['model_bytes']:.2f}",
                    f"{(r['peak'] - r['before']) / 2**20:.0f}",
                    f"{1 + (r['peak'] - r['before']) / r['model_bytes']:.2f}",
                )
            )
            print(f"memory run: {method} done in {r['seconds']:.1f} s: {' | '.join(rows[-1])}", flush=True)
    if not args.skip_time:
        t = spawn(args, "--child", "time")
        runs = t["runs"]
        unstable = any("unstable" in r for r in runs)
        lines = []
        for variant in [v for v in [*RUNS[1:], "wanda+error"] if v in runs[0]]:
            ratios = [r[variant] / r["forward"] for r in runs]
            q1, q3 = quartiles(ratios)
            lines.append(
                (
                    variant,
                    f"{median([r[variant] for r in runs]):.1f}",
                    f"{median([r['forward'] for r in runs]):.1f}",
                    f"{median(ratios):.2f} [{q1:.2f}, {q3:.2f}]" + (" (unstable)" if unstable else ""),
                    f"{len(runs)} ({t['discarded']} discarded)",
                    f"{max(r['other_load'] for r in runs):.2f}",
                )
            )
        header = ("method", "time (s)", "forward (s)", "time / forward, median [q1, q3]", "repeats", "max other load")
        print("\nTime, one process, methods and forward pass alternated:\n")
        print(markdown_table(header, lines))
    if rows:
        print("\nMemory, a fresh process per method:\n")
        header = ("run", "params", "model MiB", "time (s)", "peak RSS", "peak / model", "rise MiB", "1 + rise/model")
        print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
