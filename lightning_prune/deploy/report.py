"""Every deployable form of a pruned model in one folder, with their file sizes and CPU latencies.

:func:`export_model` is what the end of training (``export=all`` in the Hydra configs) and
``scripts/export.py`` run. It writes, into one folder:

* ``dense.pt``: the model's ``state_dict`` with ``torch.save``, the size a checkpoint of the weights takes;
* ``sparse.pt``: the sparse archive (:func:`~lightning_prune.deploy.archive.save_sparse`), checked to decode
  bit for bit to the same state dict;
* ``model.pt2``: the compacted, BatchNorm-folded ``ExportedProgram``
  (:func:`~lightning_prune.deploy.export.export_program`);
* ``model.onnx``: the same as ONNX, checked with ONNX Runtime (:func:`~lightning_prune.deploy.onnx_export.export_onnx`);
* ``report.json``: :meth:`ExportReport.as_dict`.

It then times, on the CPU at each batch size (1 and 64 by default), side by side in alternating blocks: the
dense model (``reference``, or a copy of the model with its zero weights refilled: dense kernels take as long
whatever the values), the masked model itself, the compacted and folded copy, the ``ExportedProgram``, the
ONNX file under ONNX Runtime, and the compacted copy with sparse kernels where they are faster
(:func:`~lightning_prune.deploy.kernels.sparse_inference`); then the same variants again at batch 1 on one
thread (``torch.set_num_threads(1)``, restored after), where other processes do least harm. Speed-ups are
medians of per-block ratios against the dense model, so that the machine's drifts cancel, and each measurement is
judged on its own (:func:`~lightning_prune.deploy.timing.judge_timing`): the table prints "unstable (machine busy)"
instead of a ratio it cannot trust.

Example:
    >>> import tempfile
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    >>> with torch.no_grad():
    ...     net[0].weight[torch.rand(128, 64, generator=torch.Generator().manual_seed(0)) < 0.9] = 0
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     report = export_model(net, torch.randn(8, 64), folder, forms=("dense", "sparse"), latency=False)
    >>> sorted(report.sizes), report.sizes["sparse"] < report.sizes["dense"]
    (['dense', 'sparse'], True)
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._helpers import (
    batched,
    check_batch_sizes,
    check_flag,
    check_int,
    eval_mode,
    is_int,
    num_threads,
    positional_tensors,
    rotated,
    text_table,
    time_call,
)
from lightning_prune.deploy.archive import check_masks_applied, load_sparse_state_dict, save_sparse
from lightning_prune.deploy.export import CompactMode, Inputs, export_program, inference_model
from lightning_prune.deploy.kernels import sparse_inference
from lightning_prune.deploy.onnx_export import export_onnx, onnx_files, onnx_runner
from lightning_prune.deploy.timing import UNSTABLE, OtherLoad, TimingVerdict, judge_timing, warn_if_slower

#: The files :func:`export_model` can write, by form.
FILE_NAMES: dict[str, str] = {
    "dense": "dense.pt",
    "sparse": "sparse.pt",
    "torch_export": "model.pt2",
    "onnx": "model.onnx",
}


FORMS: tuple[str, ...] = tuple(FILE_NAMES)


#: What :func:`export_model` times, in table order.
LATENCY_VARIANTS: tuple[str, ...] = ("dense", "masked", "compact", "torch_export", "onnx", "sparse_kernels")


_DESCRIPTIONS = {
    "dense": "dense model",
    "masked": "masked (pruned, dense kernels)",
    "compact": "compacted + BN folded",
    "torch_export": "ExportedProgram",
    "onnx": "ONNX Runtime",
    "sparse_kernels": "compact + sparse kernels",
}


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and measured."""

    model: str
    """The model's class name."""
    output_dir: str
    """The folder the files are in."""
    files: dict[str, str] = field(default_factory=dict)
    """Path of each form's file."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Bytes on disk of each form (an ONNX file with its external data)."""
    params: dict[str, int] = field(default_factory=dict)
    """``total`` and ``nonzero`` parameter entries of the model, ``compact`` of the compacted copy."""
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    """Median milliseconds per forward of each variant, by batch size."""
    speedup: dict[str, dict[int, float]] = field(default_factory=dict)
    """Dense time over each variant's time, the median of per-block ratios, by batch size."""
    stable: dict[str, dict[int, bool]] = field(default_factory=dict)
    """Whether each speed-up can be trusted (:func:`~lightning_prune.deploy.timing.judge_timing`): False when other
    processes kept the cores busy or the blocks disagreed; the table then prints "unstable (machine busy)"."""
    one_thread: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Batch 1 on one thread, where other processes do least harm, timed apart: each variant's ``latency_ms``,
    ``speedup`` over the dense model and ``stable``, as above."""
    sparse_layers: list[dict[str, Any]] = field(default_factory=list)
    """One :meth:`~lightning_prune.deploy.kernels.LayerChoice.as_dict` per layer considered for sparse kernels."""
    settings: dict[str, Any] = field(default_factory=dict)
    """How latency was measured: batch sizes, threads, blocks, repeats."""
    notes: list[str] = field(default_factory=list)
    """What was done and skipped, in words."""

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON (batch sizes become string keys).

        Example:
            >>> ExportReport("MLP", "out", latency_ms={"dense": {1: 0.5}}).as_dict()["latency_ms"]
            {'dense': {'1': 0.5}}
        """
        values = asdict(self)
        for key in ("latency_ms", "speedup", "stable"):
            values[key] = {v: {str(b): x for b, x in by.items()} for v, by in values[key].items()}
        return values

    def table(self) -> str:
        """The report as plain text: files and sizes, then latencies with their speed-ups over dense.

        Example:
            >>> files = {"dense": "out/dense.pt", "sparse": "out/sparse.pt"}
            >>> print(ExportReport("MLP", "out", files=files, sizes={"dense": 4000, "sparse": 600}).table())
            Deployment of MLP (out)
              form    file          size  / dense
              dense   dense.pt   3.9 KiB    1.000
              sparse  sparse.pt    600 B    0.150
        """
        lines = [f"Deployment of {self.model} ({self.output_dir})"]
        if self.sizes:
            rows: list[tuple[str, ...]] = [("form", "file", "size", "/ dense")]
            dense = self.sizes.get("dense")
            for form, size in self.sizes.items():
                ratio = f"{size / dense:.3f}" if dense else "-"
                rows.append((form, Path(self.files.get(form, "")).name, _bytes(size), ratio))
            lines.append(text_table(rows, align="llrr", rule=False, strip=True, indent="  "))
        if self.latency_ms:
            sizes = list(next(iter(self.latency_ms.values())))
            labels = [f"b{b}" for b in sizes] + (["b1 1 thread"] if self.one_thread else [])
            rows = [("latency (ms)", *labels, *(f"x dense {label}" for label in labels))]
            for variant, by in self.latency_ms.items():
                ups, stable = self.speedup.get(variant, {}), self.stable.get(variant, {})
                cells = {f"b{b}": (by[b], ups.get(b), stable.get(b, True)) for b in sizes}
                single = self.one_thread.get(variant)
                if single:
                    cells["b1 1 thread"] = (single["latency_ms"], single["speedup"], single["stable"])
                rows.append(
                    (
                        _DESCRIPTIONS.get(variant, variant),
                        *(f"{cells[label][0]:.3f}" if label in cells else "-" for label in labels),
                        *(_speedup_cell(*cells[label][1:]) if label in cells else "-" for label in labels),
                    )
                )
            lines.append(text_table(rows, rule=False, strip=True, indent="  "))
            s = self.settings
            on_one = "; b1 1 thread: batch 1 timed apart on one thread" if self.one_thread else ""
            lines.append(
                f"  (median of {s.get('repeats')} calls per block, {s.get('blocks')} blocks alternating, "
                f"{s.get('threads')} threads{on_one}; x dense: median of per-block ratios)"
            )
            if s.get("unstable_reason"):
                lines.append(f"  unstable: {s['unstable_reason']}")
        converted = [c for c in self.sparse_layers if c["kernel"] != "dense"]
        if self.sparse_layers:
            lines.append(
                f"  sparse kernels: {len(converted)} of {len(self.sparse_layers)} layers converted"
                + (": " if converted else "")
                + ", ".join(f"{c['name']} {c['kernel']} {c['speedup']:.2f}x" for c in converted if c["speedup"])
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _speedup_cell(ratio: float | None, stable: bool) -> str:
    """A speed-up as the table prints it: ``-`` when not measured, :data:`UNSTABLE` when it cannot be trusted."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if stable else UNSTABLE


def _bytes(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------------------------------------- helpers
def _check_options(
    forms: Sequence[str], batch_sizes: Sequence[int], blocks: int, repeats: int, threads: int | None
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    chosen = (forms,) if isinstance(forms, str) else tuple(forms)
    unknown = [f for f in chosen if f not in FORMS]
    if unknown:
        raise ValueError(f"`forms` must be a list of {list(FORMS)}, got unknown {unknown} in {forms!r}.")
    sizes = check_batch_sizes(batch_sizes)
    check_int("blocks", blocks, 1)
    check_int("repeats", repeats, 1)
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ValueError(f"`threads` must be None (torch's current setting) or an integer >= 1, got {threads!r}.")
    return chosen, sizes


def _refilled(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose zero Linear/Conv weights hold random values of the layer's scale."""
    dense = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in dense.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or not isinstance(weight, Tensor):
                continue
            zeros = weight == 0
            if not bool(zeros.any()):
                continue
            kept = weight[~zeros]
            scale = float(kept.float().std()) if kept.numel() > 1 else 0.0
            scale = scale if scale > 0 else 0.01
            noise = torch.randn(weight.shape, generator=generator).to(weight.dtype) * scale
            weight.copy_(torch.where(zeros, noise.to(weight.device), weight))
    return dense


def _state_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    if list(a) != list(b):
        return False
    for key, x in a.items():
        y = b[key]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        x, y = x.detach().cpu().contiguous(), y.detach().cpu().contiguous()
        if x.is_complex() or x.element_size() not in (1, 2, 4, 8):
            if not torch.equal(x, y):
                return False
            continue
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        if not torch.equal(x.view(view), y.view(view)):
            return False
    return True


def _verdict(
    per_block: Sequence[Mapping[tuple[str, int], float]], name: str, size: int, load_cores: float | None
) -> TimingVerdict:
    """How much faster than the dense model ``name`` ran at batch ``size``, judged from its blocks."""
    return judge_timing([r[("dense", size)] / r[(name, size)] for r in per_block], load_cores)


def _add_reasons(reasons: list[str], verdict: TimingVerdict, what: str, load_what: str = "") -> None:
    """Add why ``verdict`` is unstable to ``reasons``, each once: the load (after ``load_what``, the measurement it
    spoilt) and each disagreement of blocks (after ``what``, the variant and batch size)."""
    for part in verdict.reason.split("; ") if verdict.reason else []:
        if part.startswith("other processes"):
            item = f"{load_what}: {part}" if load_what else part
        else:
            item = f"{what}: {part}"
        if item not in reasons:
            reasons.append(item)


def _caller(run: Callable[..., object]) -> Callable[[tuple[Tensor, ...]], object]:
    """``run`` taking its positional inputs as one tuple."""

    def call(inputs: tuple[Tensor, ...]) -> object:
        return run(*inputs)

    return call


def _timed_blocks(
    variants: Mapping[str, Callable[[tuple[Tensor, ...]], object]],
    inputs: Mapping[int, tuple[Tensor, ...]],
    blocks: int,
    repeats: int,
) -> list[dict[tuple[str, int], float]]:
    """Per block, the median seconds of each variant at each batch size; the order rotates between blocks."""
    names = list(variants)
    results = []
    with torch.inference_mode():
        for block in range(blocks + 1):  # the first block warms up and is not kept
            order = rotated(names, block)
            result = {}
            for size, batch in inputs.items():
                for name in order:
                    run = functools.partial(variants[name], batch)
                    result[(name, size)] = statistics.median([time_call(run) for _ in range(repeats)])
            if block:
                results.append(result)
    return results


# ---------------------------------------------------------------------------------------------- export
def export_model(
    model: nn.Module,
    example_inputs: Inputs,
    output_dir: str | Path,
    *,
    masks: Any = None,
    forms: Sequence[str] = FORMS,
    sparse_kernels: bool = True,
    latency: bool = True,
    batch_sizes: Sequence[int] = (1, 64),
    blocks: int = 3,
    repeats: int = 10,
    threads: int | None = None,
    compact: CompactMode = "auto",
    reference: nn.Module | None = None,
    rtol: float = 1e-5,
) -> ExportReport:
    """Write the deployable forms of a pruned model into ``output_dir``, check them, and measure them.

    See the module's description for the files and the variants timed. Every form is checked against
    ``model``: the sparse archive decodes bit for bit to its state dict; the ``ExportedProgram`` and the ONNX
    file (reloaded from disk) agree with its outputs to ``rtol`` on ``example_inputs`` and on a batch of
    another size; the sparse-kernel copy agrees to ``rtol`` on ``example_inputs``. The model runs on the CPU
    (a copy when it is elsewhere) and is not changed.

    Args:
        model: The pruned network (an ``nn.Module`` whose forward takes ``example_inputs``).
        example_inputs: A batch of real inputs (a tensor or a tuple of positional inputs, batch first); latency
            repeats its first sample to each batch size.
        output_dir: The folder to write into (created).
        masks: Checked to be applied before anything is written: a ``MaskSet``, a fitted ``PruningCallback`` or
            a mapping of parameter names to keep-masks (see
            :func:`~lightning_prune.deploy.archive.check_masks_applied`).
        forms: Which files to write, among :data:`FORMS`.
        sparse_kernels: Convert the compacted copy's sparse enough Linear / 1x1 Conv2d layers to the fastest
            sparse kernel (measured at ``batch_sizes``) and time it.
        latency: Time the variants (otherwise only files and sizes).
        batch_sizes: The batch sizes to time and to choose sparse kernels for.
        blocks: Timed blocks (one more, untimed, comes first).
        repeats: Calls of each variant per block and batch size.
        threads: ``torch.set_num_threads`` and ONNX Runtime's threads while timing (None: torch's setting).
        compact: See :func:`~lightning_prune.deploy.export.inference_model`.
        reference: The dense model to time as "dense" (e.g. the model before pruning); default: a copy of
            ``model`` with its zero weights refilled.
        rtol: The tolerance of the output checks.

    Returns:
        An :class:`ExportReport` (also written as ``report.json``).

    Raises:
        ValueError: An option is out of range or the masks were not applied.
        ExportError: An exporter cannot handle the model (the message names the layer and why).
        RuntimeError: An exported form computes something else than ``model``.

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     report = export_model(net.eval(), torch.randn(2, 1, 8, 8), folder, forms=["torch_export"],
        ...                           batch_sizes=(1,), blocks=1, repeats=1, sparse_kernels=False)
        >>> sorted(report.latency_ms), report.notes[0]
        (['compact', 'dense', 'masked', 'torch_export'], 'compacted copy: 330 of 338 parameters, 1 BatchNorm(s) folded')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    chosen, sizes = _check_options(forms, batch_sizes, blocks, repeats, threads)
    check_flag("sparse_kernels", sparse_kernels)
    check_flag("latency", latency)
    inputs = tuple(x.detach().cpu() for x in positional_tensors(example_inputs, batch_first=True))
    check_masks_applied(model, masks)  # on the model itself: the masks refer to its parameters
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    cpu_model = model if on_cpu else copy.deepcopy(model).cpu()
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    report = ExportReport(model=type(model).__name__, output_dir=str(folder))
    params = list(cpu_model.parameters())
    report.params = {"total": sum(p.numel() for p in params), "nonzero": sum(int(p.count_nonzero()) for p in params)}

    state = cpu_model.state_dict()
    if "dense" in chosen:
        path = folder / FILE_NAMES["dense"]
        torch.save(state, path)
        report.files["dense"], report.sizes["dense"] = str(path), path.stat().st_size
    if "sparse" in chosen:
        path = save_sparse(state, folder / FILE_NAMES["sparse"])
        if not _state_equal(load_sparse_state_dict(path), state):
            raise RuntimeError(f"The sparse archive {path} does not decode to the model's state dict.")
        report.files["sparse"], report.sizes["sparse"] = str(path), path.stat().st_size

    prepared = inference_model(cpu_model, inputs, compact=compact)
    report.params["compact"] = sum(p.numel() for p in prepared.parameters())
    folded = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in cpu_model.modules()) - sum(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules()
    )
    report.notes.append(
        f"compacted copy: {report.params['compact']:,} of {report.params['total']:,} parameters, "
        f"{folded} BatchNorm(s) folded"
    )
    program = None
    if "torch_export" in chosen:
        path = folder / FILE_NAMES["torch_export"]
        program = export_program(cpu_model, inputs, path, prepared=prepared, rtol=rtol)
        report.files["torch_export"], report.sizes["torch_export"] = str(path), path.stat().st_size
    if "onnx" in chosen:
        path = export_onnx(cpu_model, inputs, folder / FILE_NAMES["onnx"], prepared=prepared, rtol=rtol)
        report.files["onnx"] = str(path)
        report.sizes["onnx"] = sum(p.stat().st_size for p in onnx_files(path))

    sparse_model = None
    threads_used = threads if threads is not None else torch.get_num_threads()
    if sparse_kernels:
        result = sparse_inference(prepared, inputs, batch_sizes=sizes, threads=threads, rtol=rtol)
        report.sparse_layers = [c.as_dict() for c in result.layers]
        if result.converted():
            sparse_model = result.model
        else:
            report.notes.append("sparse kernels: no layer is faster with one, so none was converted")

    if latency:
        variants: dict[str, Callable[[tuple[Tensor, ...]], object]] = {}
        dense = reference if reference is not None else _refilled(cpu_model)
        if reference is not None and any(t.device.type != "cpu" for t in reference.parameters()):
            dense = copy.deepcopy(reference).cpu()
        variants["dense"] = _caller(dense)
        variants["masked"] = _caller(cpu_model)
        variants["compact"] = _caller(prepared)
        if program is not None:
            variants["torch_export"] = _caller(program.module())
        if "onnx" in chosen:
            variants["onnx"] = _caller(onnx_runner(report.files["onnx"], threads=threads_used))
        if sparse_model is not None:
            variants["sparse_kernels"] = _caller(sparse_model)
        first = tuple(x[:1] for x in inputs)
        batches = {size: batched(first, size) for size in sizes}
        with num_threads(threads_used), eval_mode(dense), eval_mode(cpu_model), OtherLoad() as load:
            per_block = _timed_blocks(variants, batches, blocks, repeats)
        # Batch 1 on one thread as well: no intra-op peers to wait for, the figure a busy machine spoils least.
        single = dict(variants)
        if "onnx" in single:
            single["onnx"] = _caller(onnx_runner(report.files["onnx"], threads=1))
        with num_threads(1), eval_mode(dense), eval_mode(cpu_model), OtherLoad() as load_single:
            per_block_single = _timed_blocks(single, {1: batched(first, 1)}, blocks, repeats)
        reasons: list[str] = []
        for name in variants:
            report.latency_ms[name] = {b: 1e3 * statistics.median(r[(name, b)] for r in per_block) for b in sizes}
            verdicts = {b: _verdict(per_block, name, b, load.cores) for b in sizes}
            report.speedup[name] = {b: v.ratio for b, v in verdicts.items()}
            report.stable[name] = {b: v.stable for b, v in verdicts.items()}
            for b, v in verdicts.items():
                _add_reasons(reasons, v, f"{name} b{b}")
            verdict = _verdict(per_block_single, name, 1, load_single.cores)
            report.one_thread[name] = {
                "latency_ms": 1e3 * statistics.median(r[(name, 1)] for r in per_block_single),
                "speedup": verdict.ratio,
                "stable": verdict.stable,
            }
            _add_reasons(reasons, verdict, f"{name} b1 1 thread", load_what="b1 1 thread")
            if name != "dense":
                for b, v in verdicts.items():
                    warn_if_slower(v, f"The {_DESCRIPTIONS.get(name, name)} at batch {b}")
                warn_if_slower(verdict, f"The {_DESCRIPTIONS.get(name, name)} at batch 1 on one thread")
        report.settings = {
            "batch_sizes": list(sizes),
            "threads": threads_used,
            "blocks": blocks,
            "repeats": repeats,
            "other_load_cores": load.cores,
            "one_thread_other_load_cores": load_single.cores,
            "unstable_reason": "; ".join(reasons),
        }
        if reference is None:
            report.notes.append(
                "dense model: the model with its zero weights refilled (same shapes; dense kernels take as long "
                "whatever the values)"
            )
    (folder / "report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report


def run_export(
    options: Mapping[str, Any] | None,
    model: nn.Module,
    example_inputs: Inputs,
    run_dir: str | Path,
    *,
    masks: Any = None,
) -> tuple[dict[str, Any] | None, str]:
    """The end-of-training export: :func:`export_model` with the ``export`` config group's options.

    ``options`` are the group's keys (``forms``, ``dir``, ``sparse_kernels``, ``latency``, ``batch_sizes``,
    ``blocks``, ``repeats``, ``threads``, ``compact``); ``dir`` is relative to ``run_dir``. Nothing happens
    when ``options`` is empty or ``forms`` is. A failed export does not fail the run: the report is then
    ``{"status": "failed", "error": ...}`` and the text says what went wrong.

    Returns:
        (:meth:`ExportReport.as_dict` with ``status: "ok"``, or the failure, or None; the text for the
        run's summary).

    Example:
        >>> run_export({"forms": []}, nn.Linear(2, 2), torch.zeros(1, 2), "unused")
        (None, '')
    """
    if not options or not options.get("forms"):
        return None, ""
    arguments = dict(options)
    folder = Path(run_dir) / str(arguments.pop("dir", "export"))
    try:
        report = export_model(model, example_inputs, folder, masks=masks, **arguments)
    except (ValueError, TypeError, RuntimeError, ImportError) as err:
        error = f"{type(err).__name__}: {err}"
        return {"status": "failed", "error": error}, f"Export failed: {error}"
    return {"status": "ok", **report.as_dict()}, report.table()
