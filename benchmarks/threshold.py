"""Global 90% magnitude mask: wall time and extra peak memory, ours against ``torch.nn.utils.prune``.

    .venv/bin/python benchmarks/threshold.py            # 10M, 100M (3 repeats each) and 1B (once, ours only)
    .venv/bin/python benchmarks/threshold.py --quick    # 1M and 10M, 2 repeats: a smoke test

The model is a list of 2-D float32 tensors shaped like ``nn.Linear`` weights: as many 4096x4096 blocks (16.8M
weights each) as fit, then a (rows, 4096) tensor and a (1, tail) tensor for the remainder, filled in place
with ``normal_`` so that every page is touched before measuring.

Every (method, size) runs in a fresh subprocess, which reports the rise of ``ru_maxrss`` during the mask
computation only and its wall time. The baseline is taken after the model is built and touched and after one
warm-up call of the same method on a tiny model (three 64x64 tensors), which loads the kernels' code pages and
starts the thread pool (about 8 MB of resident memory here, paid by any first call whatever the model's size).

* ``ours``: ``MaskSet`` (one bool mask per tensor, 1 byte per weight, allocated inside the measured region)
  then ``Unstructured().prune_(masks, MagnitudeImportance(), sparsity=0.9, scope="global")``. The result is
  checked: exactly ``round(0.9 * N)`` entries pruned.
* ``torch.prune``: ``torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured, amount=0.9)``
  on bias-free ``nn.Linear`` modules created on the meta device that then receive the weight Parameters.
  Skipped at 1B, where it would not fit in memory; the estimate scales the largest measured run.

Sizes run in order, the methods interleaved within each size (ours, torch, ours, torch, ...); the table
reports the median over repeats, and the torch/ours time ratio as the median of per-repeat ratios. The machine
is shared: before each run the driver waits for other processes to go quiet, and a run during which they
kept a core busy anyway is repeated (memory does not depend on it, time does).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import THREADS, OtherLoad, add_contention_arguments, environment, markdown_table, median, wait_for_quiet

COLS = 4096
BLOCK = (4096, 4096)
SPARSITY = 0.9
METHODS = ("ours", "torch.prune")
TORCH_PRUNE_MAX = 100_000_000  # larger sizes are skipped for torch.prune (it needs ~10x the model in RAM)
MB = 1e6
GB = 1e9


# --------------------------------------------------------------------------------------------- worker
def _shapes(numel: int) -> list[tuple[int, int]]:
    """Linear-like 2-D shapes summing to exactly ``numel`` entries."""
    block = BLOCK[0] * BLOCK[1]
    shapes = [BLOCK] * (numel // block)
    rest = numel % block
    if rest >= COLS:
        shapes.append((rest // COLS, COLS))
    if rest % COLS:
        shapes.append((1, rest % COLS))
    return shapes


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _method(method: str) -> Callable[[list[Any]], Any]:
    """``run(params)``: the mask computation of ``method`` on a list of 2-D ``nn.Parameter``."""
    from torch import nn

    if method == "ours":
        from lightning_prune.criteria.magnitude import MagnitudeImportance
        from lightning_prune.masks.maskset import MaskSet
        from lightning_prune.structures.unstructured import Unstructured

        importance, structure = MagnitudeImportance(), Unstructured()

        def ours(params: list[Any]) -> Any:
            masks = MaskSet({f"l{i}.weight": p for i, p in enumerate(params)})  # allocated inside: part of the cost
            structure.prune_(masks, importance, sparsity=SPARSITY, scope="global")
            return masks

        return ours

    if method == "torch.prune":
        from torch.nn.utils import prune

        def torch_prune(params: list[Any]) -> Any:
            # Bias-free Linear modules on the meta device (no allocation) that receive the weights.
            modules = []
            for p in params:
                module = nn.Linear(p.shape[1], p.shape[0], bias=False, device="meta")
                module.weight = p
                modules.append(module)
            prune.global_unstructured(
                [(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount=SPARSITY
            )
            return modules

        return torch_prune

    raise ValueError(f"unknown method {method!r}")


def _worker(method: str, numel: int, seed: int) -> dict[str, object]:
    import torch
    from torch import nn

    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    with torch.no_grad():
        for shape in _shapes(numel):
            p = torch.empty(shape)
            p.normal_(generator=generator)  # in place: touches every page, no temporary
            params.append(nn.Parameter(p))
    assert sum(p.numel() for p in params) == numel

    run = _method(method)
    # Warm-up on a tiny model: loads the kernels' code pages and starts the thread pool, so that neither
    # counts as memory or time of the measured call.
    run([nn.Parameter(torch.randn(64, 64, generator=generator)) for _ in range(3)])

    rss_before, maxrss_before = _rss_bytes(), _maxrss_bytes()
    start = time.perf_counter()
    result = run(params)
    elapsed = time.perf_counter() - start
    rise = _maxrss_bytes() - maxrss_before

    expected = round(SPARSITY * numel)
    if method == "ours":
        pruned = result.num_pruned()  # type: ignore[attr-defined]
        mask_bytes = result.numel()  # type: ignore[attr-defined]  # bool masks: 1 byte per weight
    else:
        pruned = sum(int(m.weight_mask.numel() - m.weight_mask.count_nonzero()) for m in result)  # type: ignore[attr-defined]
        mask_bytes = sum(m.weight_mask.numel() * m.weight_mask.element_size() for m in result)  # type: ignore[attr-defined]
    return {
        "method": method,
        "numel": numel,
        "tensors": len(params),
        "time_s": elapsed,
        "rise_bytes": rise,
        # ru_maxrss is a high-water mark: if it was above the current RSS at the baseline, the rise
        # under-reports by up to this much.
        "baseline_slack_bytes": maxrss_before - rss_before,
        "model_bytes": numel * 4,
        "mask_bytes": mask_bytes,
        "pruned": pruned,
        "expected_pruned": expected,
        "exact": pruned == expected,
    }


# --------------------------------------------------------------------------------------------- driver
def _parse_size(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
    text = text.strip().lower()
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _label(numel: int) -> str:
    for unit, name in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if numel >= unit:
            value = numel / unit
            return f"{value:g}{name}"
    return str(numel)


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _spawn(method: str, numel: int, seed: int) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--worker", method, str(numel), "--seed", str(seed)]
    with OtherLoad() as load:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"worker {method} {numel} failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["other_load_cores"] = load.cores  # over the whole subprocess, start-up included
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M and 10M weights, 2 repeats")
    parser.add_argument("--sizes", nargs="+", help="model sizes, e.g. 10M 100M 1B")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per (method, size) below 1B")
    parser.add_argument("--seed", type=int, default=0)
    add_contention_arguments(parser, unit="run", quiet_timeout=60.0, max_attempts=3)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "NUMEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        method, numel = args.worker
        print(json.dumps(_worker(method, int(numel), args.seed)))
        return

    sizes = (
        [_parse_size(s) for s in args.sizes]
        if args.sizes
        else ([1_000_000, 10_000_000] if args.quick else [10_000_000, 100_000_000, 1_000_000_000])
    )
    sizes.sort()
    base_repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)

    # The driver imports no torch: a child's ru_maxrss starts at the parent's resident size (Linux keeps the
    # high-water mark across exec), so a big driver would hide the children's rise.
    print("Global 90% magnitude mask: time and extra peak memory (ru_maxrss rise, fresh subprocess per run)")
    print(
        environment(
            {
                "model": f"float32 tensors of {BLOCK[0]}x{BLOCK[1]} + remainder, sizes {[_label(s) for s in sizes]}",
                "methods": "ours = MaskSet + Unstructured().prune_(MagnitudeImportance(), 0.9, 'global'); "
                "torch.prune = global_unstructured(L1Unstructured, amount=0.9)",
                "repeats": f"{base_repeats} per (method, size) below 1B, 1 at >= 1B; methods interleaved; median",
                "contention": f"before each run, wait up to {args.quiet_timeout:.0f} s for other processes to use "
                f"< {args.quiet_cores} cores; a run during which they used > {args.max_other_load} cores on "
                f"average is repeated (at most {args.max_attempts} attempts)",
            }
        )
    )
    print()

    results: dict[tuple[str, int], list[dict[str, object]]] = {}
    for numel in sizes:
        repeats = 1 if numel >= 10**9 else base_repeats
        methods = [m for m in METHODS if m == "ours" or numel <= TORCH_PRUNE_MAX]
        need = numel * 4 * 1.5 + numel  # model + masks + headroom for ours
        if numel >= 10**9 and _available_bytes() < need:
            print(f"{_label(numel)}: skipped, {_available_bytes() / GB:.1f} GB available < {need / GB:.1f} GB")
            continue
        for rep in range(repeats):
            for method in methods:
                for attempt in range(1, args.max_attempts + 1):
                    if args.quiet_cores > 0:
                        wait_for_quiet(args.quiet_cores, args.quiet_timeout)
                    r = _spawn(method, numel, args.seed)
                    busy = r["other_load_cores"] > args.max_other_load
                    verdict = ""
                    if busy and attempt < args.max_attempts:
                        verdict = "  DISCARDED (other processes busy), repeated"
                    elif busy:
                        verdict = "  KEPT although other processes were busy (last attempt)"
                    print(
                        f"{_label(numel):>5} rep {rep + 1}/{repeats} {method:<11} time {r['time_s']:8.3f} s  "
                        f"rise {r['rise_bytes'] / MB:9.1f} MB  masks {r['mask_bytes'] / MB:8.1f} MB  "
                        f"pruned {r['pruned']}/{r['numel']} (expected {r['expected_pruned']}, "
                        f"exact={r['exact']})  baseline slack {r['baseline_slack_bytes'] / MB:.1f} MB  "
                        f"other processes {r['other_load_cores']:.2f} cores{verdict}",
                        flush=True,
                    )
                    if r["baseline_slack_bytes"] > 8 * MB:
                        print("      WARNING: ru_maxrss was above the RSS at the baseline; the rise may under-report")
                    if not r["exact"] and method == "ours":
                        print("      WARNING: ours did not prune exactly round(0.9 * N) entries")
                    if not busy or attempt == args.max_attempts:
                        results.setdefault((method, numel), []).append(r)
                        break

    # Per-weight extra memory of torch.prune at its largest measured size, to estimate skipped sizes.
    torch_sizes = sorted(n for (m, n) in results if m == "torch.prune")
    torch_extra_per_weight = (
        median([r["rise_bytes"] for r in results[("torch.prune", torch_sizes[-1])]]) / torch_sizes[-1]
        if torch_sizes
        else None
    )

    rows = []
    for numel in sizes:
        ours = results.get(("ours", numel))
        if not ours:
            continue
        model_bytes = numel * 4
        t_ours = median([r["time_s"] for r in ours])
        rise = median([r["rise_bytes"] for r in ours])
        beyond = rise - numel  # masks are one byte per weight
        exact = all(r["exact"] for r in ours)
        ours_time = f"{t_ours:.2f}" + ("" if exact else " (NOT exact)")
        ours_beyond = f"{beyond / MB:.1f} ({100 * beyond / model_bytes:.1f}%)"
        ours_bpw = f"{rise / numel:.3f}"
        theirs = results.get(("torch.prune", numel))
        if theirs:
            t_torch = median([r["time_s"] for r in theirs])
            rise_t = median([r["rise_bytes"] for r in theirs])
            ratios = [b["time_s"] / a["time_s"] for a, b in zip(ours, theirs)]
            spread = f" [{min(ratios):.1f}-{max(ratios):.1f}]" if len(ratios) > 1 else ""
            torch_time = f"{t_torch:.2f}"
            torch_mem = f"{rise_t / MB:.0f} ({rise_t / model_bytes:.1f}x)"
            ratio = f"{median(ratios):.1f}x{spread}"
        else:
            torch_time = "skipped"
            if torch_extra_per_weight is not None:
                est = (torch_extra_per_weight * numel + model_bytes) / GB
                torch_mem = f"skipped (would need ~{est:.0f} GB)"
            else:
                torch_mem = "skipped"
            ratio = "-"
        rows.append([_label(numel), ours_time, ours_beyond, ours_bpw, torch_time, torch_mem, ratio])

    print()
    print(
        "Extra = rise of ru_maxrss during the call (median of repeats); ours includes its bool masks "
        "(1 byte/weight), 'beyond masks' subtracts them; model = 4 bytes/weight. "
        "Ratio: median [min-max] of per-repeat torch/ours time."
    )
    if torch_extra_per_weight is not None:
        print(
            f"torch.prune estimate for skipped sizes: model + {torch_extra_per_weight:.1f} bytes/weight "
            f"(its extra at {_label(torch_sizes[-1])}) x N."
        )
    print()
    print(
        markdown_table(
            [
                "size",
                "ours time s",
                "ours extra MB beyond masks (% of model)",
                "ours bytes/weight incl. masks",
                "torch.prune time s",
                "torch.prune extra MB (x model)",
                "time ratio torch/ours",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
