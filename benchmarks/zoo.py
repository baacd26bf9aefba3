"""Pruning across torchvision's classification zoo and small transformer configs: ours against Torch-Pruning, one
fresh process per model.

    .venv/bin/python benchmarks/zoo.py                         # every classification model <= 100M parameters,
                                                               # then every config of zoo_transformers.py
    .venv/bin/python benchmarks/zoo.py --models resnet18 swin_t hf_llama --timeout 300
    .venv/bin/python benchmarks/zoo.py --jsonl zoo.jsonl       # also append each result as a JSON line

For every model of ``torchvision.models.list_models(module=torchvision.models)`` with at most ``--max-params``
parameters (random initialisation, ``weights=None``, eval mode, one 3x224x224 image, 3x299x299 for Inception; a
classifier that starts at zero, ViT's, drawn from N(0, 0.01) so that outputs are not all zero) and every transformer
config of ``zoo_transformers.py`` (``nn.TransformerEncoder``, Hugging Face BERT, GPT-2, Llama and Qwen2 with
grouped-query attention, Mixtral, LitGPT's GPT; small, built offline):

* ``ours`` on a model without attention heads (``find_units`` finds none):
  ``prune_channels_(model, x, 0.3, scope="layer")`` (30% of every coupled channel group by L1 norm, as
  Torch-Pruning's ``pruning_ratio`` without ``global_pruning``) then ``compact(model, x)``.
* ``ours`` on an attention model (heads found by ``lightning_prune.structures.units.find_units``, not by name): 30%
  of every attention's heads and every MLP's neurons (``HeadStructure``, L1, ``scope="layer"``), ``compact_heads``;
  for a mixture of experts, 30% of every block's experts (``prune_experts_``, ``compact_experts``); for a torchvision
  model, 30% of the remaining coupled channels (``prune_channels_`` with the heads' and neurons' modules in
  ``ignore``) and ``compact`` (a refusal of this stage alone, nothing left to prune, keeps the heads' model). Each
  compaction is checked against its masked model.
* Outcome: ``equal`` (compacted, outputs within a relative error of 1e-5 of the masked model's at every stage, every
  group traced), ``equal, N left whole`` (the same, with a warning that names groups left whole), ``refused`` (a
  ``ValueError`` with a message: nothing to prune), ``error`` (any other exception: a crash), ``timeout``. "heads":
  query heads before and after.
* ``TP``: Torch-Pruning alone, ``tp.pruner.MagnitudePruner(model, x, importance=MagnitudeImportance(p=1),
  pruning_ratio=0.3, ignored_layers=[<the layers that write the output>])`` then ``step()``; on attention models also
  ``num_heads`` (each query/key/value layer with its head count), ``prune_num_heads=True``, ``prune_head_dims=False``,
  ``head_pruning_ratio=0.3``, the new head counts written back into the modules. ``ok`` when the pruned model runs
  and its output keeps its shape, else the exception.

Each runs in its own subprocess (``--timeout`` seconds, killed past it) with ``torch.set_num_threads(1)`` and
PyTorch's fused fast path of ``nn.MultiheadAttention`` off (``FlopCounterMode`` would not count it).
Parameters are counted before (the original model) and after (the final one); MACs per input with
``count_flop_macs`` (FlopCounterMode, FLOPs / 2).
"trace+prune CPU s" is the CPU time (``time.process_time``, one thread) of the pruning calls (tracing and
selection, all stages), "compact CPU s" of the compactions (``compact`` traces again, does the surgery and checks the
outputs); CPU time rather than wall time because the shared 2-core machine runs many other jobs (wall times, also
recorded in the JSON lines, are contended). A child past ``--cpu-limit`` CPU seconds is killed. "peak MiB" is the
rise of ``ru_maxrss`` over the model's own footprint during both.
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

import zoo_transformers
from _common import environment, markdown_table

HERE = Path(__file__).resolve().parent
SPARSITY = 0.3
#: 30% of every coupled group, as Torch-Pruning's ``pruning_ratio`` by default (``global_pruning=False``)
SCOPE = "layer"


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


def _build(name: str) -> tuple[Any, Any, list[Any]]:
    """The model (eval mode), its example input and the layers that write its output (Torch-Pruning leaves them)."""
    import torch
    import torchvision

    if name in zoo_transformers.BUILDERS:
        model, x, outputs = zoo_transformers.build(name)
        return model, x, [model.get_submodule(n) for n in outputs]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, _input_size(name), _input_size(name))
        for layer in _classifier(model):  # ViT starts its classifier at zero: every output would be 0
            if not bool(layer.weight.any()):
                torch.nn.init.normal_(layer.weight, std=0.01)
    return model, x, _classifier(model)


def _attention_units(model: Any) -> list[Any]:
    """The package's heads and neurons of ``model`` when it has attention heads it knows (none for a CNN)."""
    from lightning_prune.structures.units import find_units

    try:
        units = find_units(model)
    except ValueError:  # nothing of the kind: not a transformer
        return []
    return units if any(u.kind == "heads" for u in units) else []


def _heads(masks: Any, unit: Any) -> int:
    """Query heads of a head group that ``masks`` keep (all of them without masks)."""
    if masks is None:
        return int(unit.num_heads)
    kept = int(masks.kept(unit.group).sum())
    return kept if unit.query_units else kept * unit.per_unit


def _relative_error(got: Any, reference: Any) -> float:
    return float((got - reference).abs().max()) / max(float(reference.abs().max()), 1e-12)


class _Clock:
    """Adds the wall and CPU seconds of each ``with`` block to ``result[key + "_s"]`` and ``result[key + "_cpu_s"]``."""

    def __init__(self, result: dict[str, Any], key: str) -> None:
        self.result, self.key = result, key

    def __enter__(self) -> None:
        self.start, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc: object) -> None:
        for suffix, now, then in (("_s", time.perf_counter(), self.start), ("_cpu_s", time.process_time(), self.cpu)):
            self.result[self.key + suffix] = self.result.get(self.key + suffix, 0.0) + now - then


def _ours(name: str, model: Any, x: Any, result: dict[str, Any]) -> Any:
    """Prune and compact ``model`` in stages, each checked against its masked model; returns the final model.

    Attention models: 30% of every attention's heads and every MLP's neurons (``HeadStructure``, L1, per layer),
    ``compact_heads``; then, for a mixture of experts, 30% of every block's experts (``prune_experts_``,
    ``compact_experts``); then, for torchvision's models, 30% of the remaining coupled channels
    (``prune_channels_`` with the heads' and neurons' modules left out, ``compact``)."""
    import torch

    from lightning_prune.criteria import build_importance
    from lightning_prune.deploy.compact import compact
    from lightning_prune.deploy.experts import compact_experts
    from lightning_prune.deploy.transformer import compact_heads
    from lightning_prune.structures.channel import prune_channels_
    from lightning_prune.structures.experts import find_experts, prune_experts_
    from lightning_prune.structures.heads import HeadStructure

    errors: dict[str, float] = result.setdefault("stage_errors", {})

    def check(stage: str, masked: Any, small: Any) -> Any:
        with torch.no_grad():
            errors[stage] = _relative_error(small(x), masked)
        return small

    units = _attention_units(model)
    if units:
        head_units = [u for u in units if u.kind == "heads"]
        result["heads"] = sum(_heads(None, u) for u in head_units)
        structure = HeadStructure()
        with _Clock(result, "prune"):
            masks = structure.bind(model)
            structure.prune_(masks, build_importance("l1"), SPARSITY, scope=SCOPE)
        result["heads_after"] = sum(_heads(masks, u) for u in masks.units if u.kind == "heads")
        with torch.no_grad():
            masked = model(x)
        with _Clock(result, "compact"):
            model = compact_heads(model, masks)
        model = check("heads", masked, model).eval()
        try:
            experts = find_experts(model)
        except ValueError:  # no mixture-of-experts block
            experts = []
        if experts:
            drop = round(SPARSITY * experts[0].num_experts)
            with _Clock(result, "prune"):
                expert_masks = prune_experts_(model, drop, batches=[x])
            result["experts"] = sum(e.num_experts for e in experts)
            result["experts_after"] = sum(len(v) for v in expert_masks.kept_experts().values())
            with torch.no_grad():
                masked = model(x)
            with _Clock(result, "compact"):
                model = compact_experts(model, expert_masks)
            model = check("experts", masked, model).eval()
    if name in zoo_transformers.BUILDERS:
        return model
    ignore = [u.group.name for u in units]  # pruned already, as heads and neurons
    try:
        with _Clock(result, "prune"):
            prune_channels_(model, x, SPARSITY, scope=SCOPE, ignore=ignore)
    except ValueError as err:
        if not units:
            raise
        result["channels"] = f"refused: {str(err)[:100]}"  # nothing else to prune: the heads' model stands
        return model
    with torch.no_grad():
        masked = model(x)
    with _Clock(result, "compact"):
        small = compact(model, x, ignore=ignore)
    return check("channels", masked, small)


def _child(name: str, method: str) -> dict[str, Any]:
    """Runs in the subprocess: prune ``name`` with ``method`` and measure."""
    import resource
    import warnings

    import torch

    from lightning_prune.deploy.profile import count_flop_macs

    torch.set_num_threads(1)
    torch.backends.mha.set_fastpath_enabled(False)  # FlopCounterMode does not see the fused kernels of this path
    model, x, outputs = _build(name)
    result: dict[str, Any] = {"model": name, "method": method}
    result["params"] = sum(p.numel() for p in model.parameters())
    result["macs"] = count_flop_macs(model, x)

    def rss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    base = rss()
    if method == "tp":
        return _torch_pruning(model, x, outputs, result, rss, base)
    with torch.no_grad():
        expected = model(x)
    caught: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            small = _ours(name, model, x, result)
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
    result["rel_error"] = max(result["stage_errors"].values())
    result["masked_vs_dense"] = _relative_error(got, expected)
    first = caught[0].partition("whole: ")[2] if caught else ""  # compact's warning repeats prune's
    whole = sum(chunk.partition(" (")[0].count(", ") + 1 for chunk in first.split("; ")) if first else 0
    equal = result["rel_error"] <= 1e-5
    result["outcome"] = ("equal" if equal else "differs") + (f", {whole} left whole" if whole else "")
    result["warning"] = first[:3000]
    result["params_after"] = sum(p.numel() for p in small.parameters())
    result["macs_after"] = count_flop_macs(small, x)
    return result


def _tp_heads(units: list[Any]) -> dict[Any, int]:
    """Torch-Pruning's ``num_heads``: every query, key and value layer of the attention modules with its head count."""
    found: dict[Any, int] = {}
    for u in units:
        m = u.module
        if u.style == "mha":
            found[m] = u.num_heads
        elif u.style == "qkvo":
            found.update({m.q_proj: u.num_heads, m.k_proj: u.num_kv_heads, m.v_proj: u.num_kv_heads})
        elif u.style == "bert":
            found.update({getattr(m.self, n): u.num_heads for n in ("query", "key", "value")})
        else:  # one fused projection: swin and litgpt's qkv, maxvit's to_qkv, GPT-2's c_attn
            found[getattr(m, {"maxvit": "to_qkv", "gpt2": "c_attn"}.get(u.style, "qkv"))] = u.num_heads
    return found


def _tp_rewrite_heads(units: list[Any], before: dict[Any, int], after: dict[Any, int]) -> int:
    """Write Torch-Pruning's new head counts into the attention modules (as its examples do); the query heads left."""
    left = 0
    for u in units:
        m = u.module
        first = next(layer for layer in before if layer is m or any(layer is c for c in m.modules()))
        heads = after[first]
        left += heads
        if u.style == "mha":
            m.num_heads, m.head_dim = heads, m.in_proj_weight.shape[0] // 3 // heads
            m.embed_dim = m.out_proj.weight.shape[0]
        elif u.style == "qkvo":
            kv = after[m.k_proj]
            m.num_heads, m.num_key_value_heads, m.num_key_value_groups = heads, kv, heads // kv
        elif u.style == "bert":
            m.self.num_attention_heads, m.self.all_head_size = heads, m.self.query.out_features
        else:
            for attr in ("num_heads", "n_heads"):
                if hasattr(m, attr):
                    setattr(m, attr, heads)
    return left


def _torch_pruning(
    model: Any, x: Any, outputs: list[Any], result: dict[str, Any], rss: Any, base: float
) -> dict[str, Any]:
    """Torch-Pruning alone at 30%: ``MagnitudePruner`` with L1 importance; on attention models with its
    ``num_heads``, ``prune_num_heads=True`` and a head pruning ratio of 30% too."""
    import torch
    import torch_pruning as tp

    from lightning_prune.deploy.profile import count_flop_macs

    with torch.no_grad():
        shape = tuple(model(x).shape)
    units = [u for u in _attention_units(model) if u.kind == "heads"]
    heads = _tp_heads(units)
    options: dict[str, Any] = {}
    if units:
        result["heads"] = sum(u.num_heads for u in units)
        options = {
            "num_heads": heads,
            "prune_num_heads": True,
            "prune_head_dims": False,
            "head_pruning_ratio": SPARSITY,
        }
    try:
        with _Clock(result, "prune"):
            pruner = tp.pruner.MagnitudePruner(
                model,
                x,
                importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=SPARSITY,
                ignored_layers=outputs,
                **options,
            )
            pruner.step()
        if units:
            result["heads_after"] = _tp_rewrite_heads(units, heads, pruner.num_heads)
        with torch.no_grad():
            got = tuple(model(x).shape)
        result["outcome"] = "ok" if got == shape else f"error: output shape {got}, not {shape}"
    except Exception as err:  # the benchmark records what Torch-Pruning raises
        result["outcome"] = f"error: {type(err).__name__}: {str(err)[:80]}"
    result["peak_mib"] = rss() - base
    if result["outcome"] == "ok":
        result["params_after"] = sum(p.numel() for p in model.parameters())
        result["macs_after"] = count_flop_macs(model, x)
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


def _heads_column(row: dict[str, Any]) -> str:
    """Query heads before and after (``-`` for a model without attention or a failed run)."""
    return f"{row['heads']} → {row['heads_after']}" if "heads_after" in row else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        nargs="*",
        help="torchvision model names or transformer configs of zoo_transformers.py (default: every torchvision "
        "model within --max-params, then every transformer config)",
    )
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
    names = args.models or [n for n, _ in _models(args.max_params)] + zoo_transformers.available()
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
                _heads_column(ours),
                _fmt(ours, "prune_cpu_s", 1, 1),
                _fmt(ours, "compact_cpu_s", 1, 1),
                _fmt(ours, "peak_mib", 1, 0),
                tp.get("outcome", "-")[:60],
                _less(tp, "params"),
                _heads_column(tp),
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
        "heads",
        "trace+prune CPU s",
        "compact CPU s",
        "peak MiB",
        "TP: outcome",
        "TP params -",
        "TP heads",
        "TP CPU s",
        "TP peak MiB",
    ]
    ours_rows = [results[(n, "ours")] for n in names if (n, "ours") in results]
    equal = [r for r in ours_rows if str(r.get("outcome", "")).startswith("equal")]
    big = [r for r in equal if 1 - r["params_after"] / r["params"] >= 0.25]
    crashed = [r["model"] for r in ours_rows if str(r.get("outcome", "")).startswith(("error", "died", "timeout"))]
    tp_rows = [results[(n, "tp")] for n in names if (n, "tp") in results]
    tp_ok = [r for r in tp_rows if r.get("outcome") == "ok"]
    attention = [r for r in ours_rows if "heads" in r]
    fewer_heads = [r for r in attention if r.get("heads_after", r["heads"]) < r["heads"]]
    summary = (
        f"\nours: {len(equal)}/{len(ours_rows)} compact with equal outputs, {len(big)}/{len(ours_rows)} of them "
        f"with >= 25% fewer parameters; attention heads pruned in {len(fewer_heads)}/{len(attention)} attention "
        f"models; crashed or timed out: {crashed or 'none'}. "
        f"Torch-Pruning alone: {len(tp_ok)}/{len(tp_rows)} ran."
    )
    return markdown_table(header, rows) + summary


if __name__ == "__main__":
    main()
