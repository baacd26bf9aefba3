"""Deployment: file sizes and CPU latency of every deployable form of pruned models, and sparse break-even points.

    .venv/bin/python benchmarks/deploy.py           # every model and sparsity below, 15 blocks
    .venv/bin/python benchmarks/deploy.py --quick   # MLP at 90% and the CNN, 3 blocks: a smoke test
    .venv/bin/python benchmarks/deploy.py --semi-structured   # adds the 2:4 GPU table (needs CUDA)

Models (random initialisation, eval mode; pruned with the library's own functions):

* ``MLP``: the digits LeNet-300-100 (``MLP()``, input 1x8x8), magnitude pruning of every layer to 90 / 95 /
  98% (``Unstructured().prune_(MaskSet(prunable_parameters(net)), MagnitudeImportance(), s, scope="layer")``:
  on random weights a global threshold would empty whole layers);
* ``Linear 4096 x3``: ``Linear(4096, 4096) -> ReLU -> Linear(4096, 4096) -> ReLU -> Linear(4096, 4096)``,
  input 4096 features, the same pruning to 90 / 95 / 98%;
* ``SmallCNN``: the digits CNN (input 1x8x8) and ``ResNet-20`` (``resnet20()``, input 3x32x32) with 50% of their
  channels pruned (``prune_channels_(net, x, 0.5)``: global L1 over coupled channel groups).

For each, the files: ``dense.pt`` (``torch.save(state_dict)``), ``sparse.pt``
(:func:`lightning_prune.save_sparse`, checked to decode bit for bit), ``model.pt2``
(:func:`lightning_prune.export_program` of :func:`lightning_prune.inference_model`: compacted, BatchNorm folded)
and ``model.onnx`` (:func:`lightning_prune.export_onnx`, checked with ONNX Runtime); both exports are checked
against the pruned model to 1e-5 relative.

The variants timed, all against ``dense`` (the unpruned model): ``masked`` (the pruned model, dense
kernels), ``compact`` (the inference copy: compacted, BatchNorm folded), ``ExportedProgram``
(``torch.export.load(...).module()``), ``ONNX Runtime`` (CPU provider, 2 intra-op threads) and ``sparse
kernels`` (:func:`lightning_prune.deploy.kernels` of the compact copy: every Linear / 1x1 Conv2d at least 50%
sparse timed dense and with each CSR kernel at batch 1 and 64, the fastest kept where it is at least 1.1x faster
than dense; it is timed only when a layer was converted). ``torch.set_num_threads(2)``,
``torch.inference_mode()``, contiguous float32 inputs that repeat one sample. A block times every variant at
batch 1 (median of ``--repeats-b1`` calls) and at batch 64 (median of ``--repeats-b64``), with more calls for
fast models so that each variant runs at least ``--min-variant-ms`` (40 ms) per block and batch size, in an
order that rotates from block to block; an untimed block comes first; the table gives the median over blocks of the
per-block ratio dense time / variant time, with its interquartile range.

Break-even sparsity: for each layer shape of these models (and ResNet-20's 1x1 shortcut convolutions), a
random weight pruned to 50, 60, 70, 80, 85, 90, 95, 98 and 99% is timed with
:func:`lightning_prune.deploy.kernels.measure_kernels` (dense and each kernel interleaved call by call,
median of at least 31 calls at batch 1 and 7 at batch 64, more for small layers so that the dense calls take
``--min-variant-ms``); the break-even point of a kernel is the lowest sparsity of the grid from which on it is
faster than dense at every higher grid point.

Noise control (see /work/shared/MEASURING.md): before each block, wait for other processes to go quiet; a block
during which they used more than ``--max-other-load`` cores on average is discarded and repeated.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    THREADS,
    add_contention_arguments,
    contention_note,
    environment,
    markdown_table,
    measure_quietly,
    median,
    median_iqr,
    median_seconds,
    quiet_blocks,
    time_block,
    version,
    wait_for_quiet,
    warm_up,
)

BATCHES = (1, 64)
SPARSITIES = (0.9, 0.95, 0.98)
GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
VARIANTS = ("dense", "masked", "compact", "ExportedProgram", "ONNX Runtime", "sparse kernels")


def _cases(quick: bool) -> list[tuple[str, str, float, Callable[[], Any], tuple[int, ...]]]:
    """(label, pruning kind, sparsity, builder, input shape of one sample)."""
    from torch import nn

    from lightning_prune.models import MLP, SmallCNN, resnet20

    def stack() -> nn.Module:
        return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096))

    if quick:
        return [("MLP", "weights", 0.9, MLP, (1, 8, 8)), ("SmallCNN", "channels", 0.5, SmallCNN, (1, 8, 8))]
    cases = [("MLP", "weights", s, MLP, (1, 8, 8)) for s in SPARSITIES]
    cases += [("Linear 4096 x3", "weights", s, stack, (4096,)) for s in SPARSITIES]
    cases += [("SmallCNN", "channels", 0.5, SmallCNN, (1, 8, 8)), ("ResNet-20", "channels", 0.5, resnet20, (3, 32, 32))]
    return cases


def _prune(net: Any, kind: str, sparsity: float, x: Any) -> Any:
    from lightning_prune import MaskSet, prunable_parameters
    from lightning_prune.criteria.magnitude import MagnitudeImportance
    from lightning_prune.structures.channel import prune_channels_
    from lightning_prune.structures.unstructured import Unstructured

    if kind == "channels":
        return prune_channels_(net, x, sparsity=sparsity)
    masks = MaskSet(prunable_parameters(net))
    # Every layer at the target: a global threshold on random weights would empty the layers whose initial
    # scale is smallest (the MLP's 300->100 layer entirely at 90%), which trained networks do not do.
    Unstructured().prune_(masks, MagnitudeImportance(), sparsity=sparsity, scope="layer")
    return masks


def _sizes(net: Any, masks: Any, prepared: Any, x: Any, folder: Path) -> tuple[dict[str, int], Any, Any]:
    """File sizes of the four forms; the reloaded ExportedProgram's module and an ONNX Runtime runner."""
    import torch

    from lightning_prune.deploy.archive import load_sparse_state_dict, save_sparse
    from lightning_prune.deploy.export import export_program
    from lightning_prune.deploy.onnx_export import export_onnx, onnx_files, onnx_runner

    state = net.state_dict()
    torch.save(state, folder / "dense.pt")
    sparse = save_sparse(net, folder / "sparse.pt", masks=masks)
    restored = load_sparse_state_dict(sparse)
    for key, value in state.items():
        if not torch.equal(_bits(restored[key]), _bits(value)):
            raise RuntimeError(f"the sparse archive does not restore {key} bit for bit")
    program = export_program(net, x, folder / "model.pt2", masks=masks, prepared=prepared)
    onnx_path = export_onnx(net, x, folder / "model.onnx", masks=masks, prepared=prepared)
    sizes = {
        "dense": (folder / "dense.pt").stat().st_size,
        "sparse": sparse.stat().st_size,
        "pt2": (folder / "model.pt2").stat().st_size,
        "onnx": sum(p.stat().st_size for p in onnx_files(onnx_path)),
    }
    return sizes, program.module(), onnx_runner(onnx_path, threads=THREADS)


def _bits(tensor: Any) -> Any:
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])


def _mb(size: int) -> str:
    return f"{size / 2**20:.2f} MB" if size >= 2**20 else f"{size / 2**10:.1f} kB"


def _break_even(args: argparse.Namespace, repeats: dict[int, int]) -> list[list[str]]:
    """Rows of the break-even table: per layer shape and batch, each kernel's break-even sparsity."""
    import torch
    from torch import nn

    from lightning_prune.deploy.kernels import measure_kernels
    from lightning_prune.deploy.sparse_layers import SPARSE_KERNELS

    shapes: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
        ("Linear 64->300 (MLP fc1)", lambda: nn.Linear(64, 300), (64,)),
        ("Linear 300->100 (MLP fc2)", lambda: nn.Linear(300, 100), (300,)),
        ("Linear 100->10 (MLP head)", lambda: nn.Linear(100, 10), (100,)),
        ("Linear 256->128 (CNN fc)", lambda: nn.Linear(256, 128), (256,)),
        ("Linear 4096->4096", lambda: nn.Linear(4096, 4096), (4096,)),
        (
            "Conv 1x1 16->32 @32x32 stride 2 (ResNet-20)",
            lambda: nn.Conv2d(16, 32, 1, stride=2, bias=False),
            (16, 32, 32),
        ),
        (
            "Conv 1x1 32->64 @16x16 stride 2 (ResNet-20)",
            lambda: nn.Conv2d(32, 64, 1, stride=2, bias=False),
            (32, 16, 16),
        ),
    ]
    if args.quick:
        shapes = shapes[:2]
    grid = GRID[3:] if args.quick else GRID
    rows = []
    generator = torch.Generator().manual_seed(args.seed)
    for label, build, sample in shapes:
        layer = build().eval()
        ratios: dict[tuple[str, int, float], float] = {}
        times_at_95: dict[tuple[str, int], float] = {}
        for sparsity in grid:
            with torch.no_grad():
                layer.weight.mul_(0).add_(torch.randn(layer.weight.shape, generator=generator))
                layer.weight.mul_(torch.rand(layer.weight.shape, generator=generator) >= sparsity)
            for batch in BATCHES:
                with torch.inference_mode():
                    seconds = median_seconds(layer, torch.randn(batch, *sample, generator=generator), 5)
                calls = max(2 * repeats[batch] + 1, math.ceil(args.min_variant_ms / 1e3 / max(seconds, 1e-6)))
                measure = functools.partial(
                    measure_kernels, layer, sample, (batch,), repeats=calls, threads=args.threads
                )
                times, _ = measure_quietly(measure, args)  # repeated while other processes load the machine
                for kernel in SPARSE_KERNELS:
                    ratios[(kernel, batch, sparsity)] = times["dense"][batch] / times[kernel][batch]
                if sparsity == 0.95:
                    times_at_95.update({(k, batch): v[batch] for k, v in times.items()})
        for batch in BATCHES:
            cells = [label, str(batch)]
            for kernel in SPARSE_KERNELS:
                point = None
                for s in reversed(grid):
                    if ratios[(kernel, batch, s)] > 1.0:
                        point = s
                    else:
                        break
                cells.append("never (up to 99%)" if point is None else f"{point:.0%}")
            best = {s: max(ratios[(k, batch, s)] for k in SPARSE_KERNELS) for s in grid}
            cells.append(" / ".join(f"{best[s]:.2f}" for s in (0.9, 0.95, 0.98, 0.99) if s in best))
            cells.append(f"{times_at_95[('dense', batch)]:.3f}" if times_at_95 else "-")
            rows.append(cells)
        print(f"break-even {label}: done", flush=True)
    return rows


def _semi_structured(args: argparse.Namespace) -> str:
    """2:4 semi-structured sparsity on a CUDA GPU: the Linear 4096 stack, fp16, dense against 2:4."""
    import torch
    from torch import nn

    if not torch.cuda.is_available():
        return "2:4 semi-structured: skipped, no CUDA GPU on this machine (torch.cuda.is_available() is False)."
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(args.seed)
    dense = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(4096, 4096), nn.ReLU())][:-1]).half().cuda().eval()
    with torch.no_grad():
        for m in dense:
            if isinstance(m, nn.Linear):
                groups = m.weight.view(-1, 4)
                groups.scatter_(1, groups.abs().argsort(dim=1)[:, :2], 0.0)  # keep the 2 largest of every 4
    sparse = copy.deepcopy(dense)
    for m in sparse:
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight))
    rows = []
    for batch in (64, 256, 1024, 4096):
        x = torch.randn(batch, 4096, device="cuda", dtype=torch.half)
        with torch.inference_mode():
            error = float((sparse(x) - dense(x)).float().norm() / dense(x).float().norm())
            ratios = []
            for _ in range(args.blocks):
                times = {}
                for name, model in (("dense", dense), ("2:4", sparse)):
                    for _ in range(3):
                        model(x)
                    torch.cuda.synchronize()
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(20):
                        model(x)
                    end.record()
                    torch.cuda.synchronize()
                    times[name] = start.elapsed_time(end) / 20
                ratios.append(times["dense"] / times["2:4"])
        rows.append([str(batch), f"{times['dense']:.3f}", f"{times['2:4']:.3f}", median_iqr(ratios), f"{error:.1e}"])
    header = ["batch", "dense ms", "2:4 ms", "dense/2:4", "relative error"]
    return f"2:4 semi-structured on {torch.cuda.get_device_name()} (fp16, Linear 4096 x3):\n" + markdown_table(
        header, rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MLP at 90%% and the CNN, 3 blocks, fewer repeats")
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks per case (default 15)")
    parser.add_argument("--repeats-b1", type=int, default=None, help="calls per variant per block at batch 1")
    parser.add_argument("--repeats-b64", type=int, default=None, help="calls per variant per block at batch 64")
    parser.add_argument(
        "--min-variant-ms",
        type=float,
        default=None,
        help="more calls than --repeats-* where needed, so that each variant runs at least this long per block "
        "and batch size (default 40, quick 10)",
    )
    parser.add_argument("--no-break-even", action="store_true", help="skip the break-even sweep")
    parser.add_argument("--semi-structured", action="store_true", help="also the 2:4 GPU table (CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads (default 2)")
    add_contention_arguments(parser, unit="block", quiet_timeout=60.0, max_attempts=3)
    args = parser.parse_args()
    args.blocks = args.blocks if args.blocks is not None else (3 if args.quick else 15)
    if args.min_variant_ms is None:
        args.min_variant_ms = 10.0 if args.quick else 40.0
    repeats = {
        1: args.repeats_b1 if args.repeats_b1 is not None else (5 if args.quick else 15),
        64: args.repeats_b64 if args.repeats_b64 is not None else (2 if args.quick else 3),
    }

    import torch

    from lightning_prune.deploy.export import inference_model
    from lightning_prune.deploy.kernels import sparse_inference

    torch.set_num_threads(args.threads)
    cases = _cases(args.quick)
    print("Deployment on CPU: file sizes and latency of the deployable forms of pruned models")
    print(
        environment(
            {
                "onnx": f"onnx {version('onnx')}, onnxruntime {version('onnxruntime')}, onnxscript "
                f"{version('onnxscript')}; scipy {version('scipy')}; torch-pruning {version('torch-pruning')}",
                "cases": "; ".join(f"{label} {s:.0%} of {kind}" for label, kind, s, _, _ in cases),
                "timing": f"batch 1: median of {repeats[1]} calls, batch 64: median of {repeats[64]}, per variant "
                f"per block, more for fast models (at least {args.min_variant_ms:g} ms of calls per variant); "
                f"{args.blocks} blocks (+1 untimed), order rotating; inference_mode",
                "contention": contention_note(args),
            },
            threads=args.threads,
        )
    )
    print()

    size_rows: list[list[str]] = []
    latency_rows: list[list[str]] = []
    notes: list[str] = []
    for label, kind, sparsity, build, sample in cases:
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        dense = build().eval()
        x = torch.randn(8, *sample, generator=generator)
        net = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            masks = _prune(net, kind, sparsity, x)
            net.eval()
            prepared = inference_model(net, x, masks=masks)
            with tempfile.TemporaryDirectory() as folder:
                sizes, exported, onnx_run = _sizes(net, masks, prepared, x, Path(folder))
            if args.quiet_cores > 0:  # the kernels are chosen by timing them: on a quiet machine
                wait_for_quiet(args.quiet_cores, args.quiet_timeout)
            converted = sparse_inference(prepared, x, batch_sizes=BATCHES, threads=args.threads)
        chosen = ", ".join(f"{c.name} {c.kernel} ({c.sparsity:.0%})" for c in converted.layers) or "no candidate"
        print(
            f"{label} {sparsity:.0%} of {kind}: built and exported in {time.perf_counter() - start:.1f} s; "
            f"params {sum(p.numel() for p in dense.parameters()):,} -> compact "
            f"{sum(p.numel() for p in prepared.parameters()):,}; sparse kernels: {chosen}",
            flush=True,
        )
        size_rows.append(
            [
                label,
                f"{sparsity:.0%} of {kind}",
                _mb(sizes["dense"]),
                f"{_mb(sizes['sparse'])} ({sizes['sparse'] / sizes['dense']:.1%})",
                f"{_mb(sizes['pt2'])} ({sizes['pt2'] / sizes['dense']:.1%})",
                f"{_mb(sizes['onnx'])} ({sizes['onnx'] / sizes['dense']:.1%})",
            ]
        )
        runs: dict[str, Callable[[Any], Any]] = {
            "dense": dense,
            "masked": net,
            "compact": prepared,
            "ExportedProgram": exported,
            "ONNX Runtime": lambda b, run=onnx_run: run(b),
        }
        if converted.converted():
            runs["sparse kernels"] = converted.model
        inputs = {b: x[:1].expand(b, *sample).contiguous() for b in BATCHES}
        warm_up(runs, inputs)
        with torch.inference_mode():
            # At least --min-variant-ms of calls per variant and batch size: a block of a few milliseconds would
            # make the other processes' load (counted in 10 ms ticks) meaningless, and one stall decisive.
            case_repeats = {
                b: max(
                    repeats[b], math.ceil(args.min_variant_ms / 1e3 / max(median_seconds(dense, inputs[b], 5), 1e-6))
                )
                for b in BATCHES
            }
        per_block, discarded, loads = quiet_blocks(
            functools.partial(time_block, runs, inputs, repeats=case_repeats),
            list(runs),
            args.blocks,
            args,
            who=f"{label} {sparsity:.0%}",
        )
        notes.append(
            f"{label} {sparsity:.0%}: {len(per_block)} blocks kept, {discarded} discarded, other load median "
            f"{median(loads):.2f} cores, {case_repeats[1]} / {case_repeats[64]} calls per variant"
        )
        dense_ms = {b: 1e3 * median([r[("dense", b)] for r in per_block]) for b in BATCHES}
        print(
            f"{label} {sparsity:.0%}: median ms at batch 1 / 64: "
            + ", ".join(
                f"{k} {1e3 * median([r[(k, 1)] for r in per_block]):.3f} / "
                f"{1e3 * median([r[(k, 64)] for r in per_block]):.2f}"
                for k in runs
            ),
            flush=True,
        )
        row = [label, f"{sparsity:.0%} of {kind}", f"{dense_ms[1]:.3f} / {dense_ms[64]:.2f}"]
        for batch in BATCHES:
            for k in VARIANTS[1:]:
                if k not in runs:
                    row.append("dense kept")
                    continue
                row.append(median_iqr([r[("dense", batch)] / r[(k, batch)] for r in per_block]))
        latency_rows.append(row)

    break_even = [] if args.no_break_even else _break_even(args, repeats)
    print()
    print("File sizes (share of the dense state dict's file):")
    print(
        markdown_table(
            ["model", "pruned", "dense.pt", "sparse archive", "model.pt2 (compact)", "model.onnx (compact)"], size_rows
        )
    )
    if break_even:
        print()
        print(
            "Break-even sparsity (lowest sparsity of the grid from which on the kernel beats dense; best = the "
            "faster kernel's speed-up over dense at 90 / 95 / 98 / 99%):"
        )
        print(
            markdown_table(
                ["layer", "batch", "torch_csr", "scipy_csr", "best speed-up 90/95/98/99%", "dense ms at 95%"],
                break_even,
            )
        )
    if args.semi_structured:
        print()
        print(_semi_structured(args))
    print()
    print(
        "dense/x: the dense model's latency over the variant's (above 1: the variant is faster), median "
        "[interquartile range] of per-block ratios. 'dense kept': no layer was faster with a sparse kernel."
    )
    print(f"Blocks: {'; '.join(notes)}.")
    print(
        f"Measured with torch {version('torch')}, onnxruntime {version('onnxruntime')}, scipy {version('scipy')}, "
        f"torch.set_num_threads({args.threads}), at least {repeats[1]} / {repeats[64]} calls (and "
        f"{args.min_variant_ms:g} ms) per variant per block at batch 1 / 64."
    )
    print()
    header = ["model", "pruned", "dense ms b1 / b64"]
    header += [f"dense/{k} b{b}" for b in BATCHES for k in VARIANTS[1:]]
    print(markdown_table(header, latency_rows))


if __name__ == "__main__":
    main()
