"""Channel pruning across torchvision's classification zoo: ours against Torch-Pruning, one fresh process per model.

    .venv/bin/python benchmarks/zoo.py                         # every classification model <= 100M parameters
    .venv/bin/python benchmarks/zoo.py --models resnet18 shufflenet_v2_x0_5 --timeout 300
    .venv/bin/python benchmarks/zoo.py --jsonl zoo.jsonl       # also append each result as a JSON line

For every model of ``torchvision.models.list_models(module=torchvision.models)`` with at most ``--max-params``
parameters (random initialisation, ``weights=None``, eval mode, one 3x224x224 image, 3x299x299 for Inception):

* ``ours``: ``prune_channels_(model, x, 0.3)`` (30% of the coupled channels, global L1 ranking, the default
  10% floor per layer) then ``compact(model, x)``. Outcome: ``equal`` (compacted, outputs within a relative
  error of 1e-5 of the masked model's, every group traced), ``equal, N left whole`` (the same, with a warning
  that names groups left whole), ``refused`` (a ``ValueError`` with a message: nothing to prune), ``error``
  (any other exception: a crash), ``timeout``.
* ``TP``: Torch-Pruning alone, ``tp.pruner.MagnitudePruner(model, x, importance=MagnitudeImportance(p=1),
  pruning_ratio=0.3, ignored_layers=[<the 1000-way classifier>])`` then ``step()``: ``ok`` or the exception.

Each runs in its own subprocess (``--timeout`` seconds, killed past it) with ``torch.set_num_threads(1)``.
Parameters are counted before and after; MACs per image with ``count_flop_macs`` (FlopCounterMode, FLOPs / 2).
"trace+prune CPU s" is the CPU time (``time.process_time``, one thread) of ``prune_channels_`` (tracing and
selection), "compact CPU s" of ``compact`` (it traces again, does the surgery and checks the outputs); CPU time
rather than wall time because the shared 2-core machine runs many other jobs (wall times, also recorded in the
JSON lines, are contended). A child past ``--cpu-limit`` CPU seconds is killed. "peak MiB" is the rise of
``ru_maxrss`` over the model's own footprint during both.
Parameter and MAC counts, outcomes and output errors do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import environment, markdown_table

HERE = Path(__file__).resolve().parent


def _input_size(name: str) -> int:
    return 299 if name.startswith("inception") else 224


def _classifier(model: Any) -> list[Any]:
    from torch import nn

    return [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == 1000)
        or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)
    ]


def _child(name: str, method: str) -> dict[str, Any]:
    """Runs in the subprocess: prune ``name`` with ``method`` and measure."""
    import resource
    import warnings

    import torch
    import torchvision

    from lightning_prune.deploy.compact import compact
    from lightning_prune.deploy.profile import count_flop_macs
    from lightning_prune.structures.channel import prune_channels_

    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, _input_size(name), _input_size(name))
    result: dict[str, Any] = {"model": name, "method": method}
    result["params"] = sum(p.numel() for p in model.parameters())
    result["macs"] = count_flop_macs(model, x)

    def rss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    base = rss()
    if method == "tp":
        import torch_pruning as tp

        start, cpu = time.perf_counter(), time.process_time()
        try:
            pruner = tp.pruner.MagnitudePruner(
                model,
                x,
                importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=0.3,
                ignored_layers=_classifier(model),
            )
            pruner.step()
            with torch.no_grad():
                model(x)
            result["outcome"] = "ok"
        except Exception as err:  # the benchmark records what Torch-Pruning raises
            result["outcome"] = f"error: {type(err).__name__}: {str(err)[:80]}"
        result["prune_s"] = time.perf_counter() - start
        result["prune_cpu_s"] = time.process_time() - cpu
        result["peak_mib"] = rss() - base
        if result["outcome"] == "ok":
            result["params_after"] = sum(p.numel() for p in model.parameters())
            result["macs_after"] = count_flop_macs(model, x)
        return result
    with torch.no_grad():
        expected = model(x)
    caught: list[str] = []
    start, cpu = time.perf_counter(), time.process_time()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            prune_channels_(model, x, 0.3)
            result["prune_s"] = time.perf_counter() - start
            result["prune_cpu_s"] = time.process_time() - cpu
            with torch.no_grad():
                masked = model(x)
            start, cpu = time.perf_counter(), time.process_time()
            small = compact(model, x)
            result["compact_s"] = time.perf_counter() - start
            result["compact_cpu_s"] = time.process_time() - cpu
        caught = [str(w.message) for w in seen if "left whole" in str(w.message) or "whole:" in str(w.message)]
    except ValueError as err:
        result["outcome"] = f"refused: {str(err)[:100]}"
        result["peak_mib"] = rss() - base
        return result
    except Exception as err:  # the benchmark records a crash as an outcome
        result["outcome"] = f"error: {type(err).__name__}: {str(err)[:100]}"
        result["peak_mib"] = rss() - base
        return result
    result["peak_mib"] = rss() - base
    with torch.no_grad():
        got = small(x)
    scale = float(masked.abs().max())
    result["rel_error"] = float((got - masked).abs().max()) / max(scale, 1e-12)
    result["masked_vs_dense"] = float((masked - expected).abs().max()) / max(float(expected.abs().max()), 1e-12)
    first = caught[0].partition("whole: ")[2] if caught else ""  # compact's warning repeats prune's
    whole = sum(chunk.partition(" (")[0].count(", ") + 1 for chunk in first.split("; ")) if first else 0
    equal = result["rel_error"] <= 1e-5
    result["outcome"] = ("equal" if equal else "differs") + (f", {whole} left whole" if whole else "")
    result["warning"] = first[:3000]
    result["params_after"] = sum(p.numel() for p in small.parameters())
    result["macs_after"] = count_flop_macs(small, x)
    return result


def _run(name: str, method: str, timeout: float, cpu_limit: int) -> dict[str, Any]:
    import resource

    def limit_cpu() -> None:  # in the child: killed (SIGXCPU) past `cpu_limit` seconds of CPU time
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_limit + 5))

    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, method]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=HERE, preexec_fn=limit_cpu)
    except subprocess.TimeoutExpired:
        return {"model": name, "method": method, "outcome": f"timeout (> {timeout:.0f} s wall)"}
    if done.returncode in (-24, -9):  # SIGXCPU, or SIGKILL at the hard limit
        return {"model": name, "method": method, "outcome": f"timeout (> {cpu_limit} s of CPU)"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
    wall = time.perf_counter() - start
    return {"model": name, "method": method, "outcome": f"died (rc {done.returncode}, {wall:.0f} s): {tail[0][:100]}"}


def _models(max_params: float) -> list[tuple[str, int]]:
    import torch
    import torchvision

    found = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(name, weights=None)
        except (NotImplementedError, RuntimeError):  # a constructor that reads tensor values (RegNet)
            model = torchvision.models.get_model(name, weights=None)
        count = sum(p.numel() for p in model.parameters())
        if count <= max_params:
            found.append((name, count))
    return found


def _fmt(row: dict[str, Any], key: str, scale: float, digits: int = 2) -> str:
    return f"{row[key] / scale:.{digits}f}" if key in row else "-"


def _less(row: dict[str, Any], key: str) -> str:
    return f"{1 - row[key + '_after'] / row[key]:.1%}" if key + "_after" in row and row.get(key) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="model names (default: every one within --max-params)")
    parser.add_argument("--max-params", type=float, default=100e6)
    parser.add_argument("--timeout", type=float, default=1800.0, help="wall-clock seconds per model and method")
    parser.add_argument("--cpu-limit", type=int, default=300, help="CPU seconds per model and method")
    parser.add_argument("--methods", nargs="*", default=["ours", "tp"], choices=["ours", "tp"])
    parser.add_argument("--jsonl", type=Path, help="append each result to this file as it comes")
    parser.add_argument("--table", type=Path, nargs="*", help="only print the table of these JSON-lines files")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)), flush=True)
        return
    if args.table:
        rows = [json.loads(line) for path in args.table for line in path.read_text().splitlines() if line.strip()]
        found = {(r["model"], r["method"]): r for r in rows}
        print(table(list(dict.fromkeys(r["model"] for r in rows)), found))
        return
    names = args.models or [n for n, _ in _models(args.max_params)]
    print(environment({"models": len(names), "timeout per model": f"{args.timeout:.0f} s"}), flush=True)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for name in names:
        for method in args.methods:
            row = _run(name, method, args.timeout, args.cpu_limit)
            results[(name, method)] = row
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(names, results))


def table(names: list[str], results: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The markdown table and the summary line of a run."""
    rows = []
    for name in names:
        ours, tp = results.get((name, "ours"), {}), results.get((name, "tp"), {})
        rows.append(
            [
                name,
                _fmt(ours or tp, "params", 1e6),
                _fmt(ours or tp, "macs", 1e9),
                ours.get("outcome", "-"),
                f"{ours['rel_error']:.1e}" if "rel_error" in ours else "-",
                _less(ours, "params"),
                _less(ours, "macs"),
                _fmt(ours, "prune_cpu_s", 1, 1),
                _fmt(ours, "compact_cpu_s", 1, 1),
                _fmt(ours, "peak_mib", 1, 0),
                tp.get("outcome", "-")[:60],
                _less(tp, "params"),
                _fmt(tp, "prune_cpu_s", 1, 1),
                _fmt(tp, "peak_mib", 1, 0),
            ]
        )
    header = [
        "model",
        "params M",
        "GMACs",
        "ours: outcome",
        "rel. error",
        "params -",
        "MACs -",
        "trace+prune CPU s",
        "compact CPU s",
        "peak MiB",
        "TP: outcome",
        "TP params -",
        "TP CPU s",
        "TP peak MiB",
    ]
    ours_rows = [results[(n, "ours")] for n in names if (n, "ours") in results]
    equal = [r for r in ours_rows if str(r.get("outcome", "")).startswith("equal")]
    big = [r for r in equal if 1 - r["params_after"] / r["params"] >= 0.25]
    crashed = [r["model"] for r in ours_rows if str(r.get("outcome", "")).startswith(("error", "died", "timeout"))]
    tp_rows = [results[(n, "tp")] for n in names if (n, "tp") in results]
    tp_ok = [r for r in tp_rows if r.get("outcome") == "ok"]
    summary = (
        f"\nours: {len(equal)}/{len(ours_rows)} compact with equal outputs, {len(big)}/{len(ours_rows)} of them "
        f"with >= 25% fewer parameters; crashed or timed out: {crashed or 'none'}. "
        f"Torch-Pruning alone: {len(tp_ok)}/{len(tp_rows)} ran."
    )
    return markdown_table(header, rows) + summary


if __name__ == "__main__":
    main()
