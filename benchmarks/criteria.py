"""Importance criteria, sparsity patterns and per-layer targets on the digits MLP and CNN, same seeds side by side.

    .venv/bin/python benchmarks/criteria.py                   # seeds 0, 1, 2: accuracy tables, then the overhead
    .venv/bin/python benchmarks/criteria.py --quick           # seed 0, 3 epochs, 2 overhead blocks: a smoke test
    .venv/bin/python benchmarks/criteria.py --skip-overhead --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/criteria.py --skip-accuracy --models cnn
    .venv/bin/python benchmarks/criteria.py trainer.max_epochs=20 pruning.start_epoch=5 pruning.end_epoch=12

**Accuracy.** Every run composes ``conf/config.yaml`` (the main job: dense epochs 0-9, cubic pruning over epochs
10-20, fine-tuning until epoch 29 after the learning rate drops by 10x at epoch 20) with ``seed=<s>``,
``model=mlp|cnn``, the variant's overrides and any extra overrides given, and calls
``lightning_prune.app.train.train(cfg)``; the numbers come from the run's ``metrics.json``. The config's seed fixes
the initial weights, the data split and the data order, so every variant of a (model, seed) starts from the same
weights and sees the same batches; the criteria only observe training until the first pruning step, so the dense
accuracy just before pruning must be identical across them (the script checks it). The variants:

1. unstructured, global scope, 90% and 95% of the weights: ``magnitude``, ``taylor``, ``fisher``
   (``pruning=taylor|fisher``: statistics over the last 16 optimizer steps of the epoch before each pruning
   epoch);
2. 50% of the channels (``pruning=channel``, compacted at the end): ``l1`` (the channel magnitude), ``taylor``
   and ``fisher`` (``pruning.importance=...``), ``apoz`` and ``activation`` (``pruning=apoz|activation``);
3. patterns: 2:4 (``pruning=nm``; the CNN's first convolution, with one input channel, is ignored) and 4x4
   blocks at 75% of the blocks (``pruning=block``, global scope), with ``magnitude``, ``taylor`` and ``fisher``;
   the blocks also with ``pruning.scope=layer`` (every layer loses 75% of its blocks), as a reference;
4. per-layer targets at 90% of the weights: uniform (``pruning=magnitude_layerwise``), sensitivity-derived
   (``allocation=sensitivity``: analysed at epoch 10 on the validation split, one common bound on the layers'
   drops searched to meet 90% globally) and the global magnitude threshold of part 1 (the same run).

Each (model, seed) also trains ``pruning=none`` for the same epochs with the same learning-rate drop, as the
dense reference. The tables give mean ± sample standard deviation over seeds and, most informative, the paired
difference against the reference criterion (magnitude, or l1 for channels; the global threshold for per-layer
targets) of the same seed: the same initial weights, data and schedule, only the criterion differs.

**Overhead** of collecting the statistics, two measures on the model the accuracy part uses (batch 64, torch
threads 2). (1) Training steps inside ``Trainer.fit`` (from the first callback's ``on_train_batch_start`` to the
last callback's ``on_train_batch_end``: forward, backward, the criterion's ``observe``, the optimizer step, the
masks' hooks, logging), for a ``PruningCallback`` with each criterion and a linear schedule pruning at epochs 1,
2 and 3 of a 4-epoch fit, with ``importance_batches`` = the steps of an epoch so that epochs 1 and 2 are
collection windows from their first step to their last; their steps are timed, epoch 0 is warm-up. The
reference is the same callback with ``magnitude`` (unstructured) or ``l1`` (channels): the same masks and hooks,
no statistics. Alternating blocks (one fit per variant, the order rotating, an untimed block first); per block,
the median step of each variant; the table gives the median over blocks of the extra time against the reference
of the same block. (2) The same step in a plain loop (``training_step``, ``backward``, ``observe``,
``optimizer.step`` with the masks attached), every variant with its own copy of the model, its masks pruned to the
final target and its window open throughout, the variants' steps interleaved step by step on the same batch
(the order rotating), the extra time paired per round: the steadiest measure on a shared machine. The wall time
of whole runs (the accuracy part's ``wall_time_s``) is context only: those runs are not interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    THREADS,
    add_contention_arguments,
    cpu_trainer,
    environment,
    markdown_table,
    mean_std,
    measure_quietly,
    median,
    quartiles,
    quiet_blocks,
    quiet_lightning,
    report_discarded,
    report_repeated,
    rotated,
    version,
)

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["trainer.max_epochs=3", "pruning.start_epoch=1", "pruning.end_epoch=2"]
UNSTRUCTURED = (0.9, 0.95)
STATISTICS_BATCHES = 16  # the configs' importance_batches
_LATENCY_OFF = "pruning.report_latency=false"  # compaction still runs; its CPU timing only costs time here


@dataclass(frozen=True)
class Variant:
    """One cell of the accuracy tables: a criterion in a setting, and the Hydra overrides that run it."""

    setting: str
    criterion: str
    overrides: tuple[str, ...]
    references: tuple[str, ...] = ()  # criteria of the same setting its paired differences are against


def accuracy_variants() -> list[Variant]:
    out: list[Variant] = []
    for s in UNSTRUCTURED:
        setting, sp = f"{s:.0%} of weights", f"pruning.sparsity={s}"
        out += [
            Variant(setting, "magnitude", (sp,)),
            Variant(setting, "taylor", ("pruning=taylor", sp), ("magnitude",)),
            Variant(setting, "fisher", ("pruning=fisher", sp), ("magnitude",)),
        ]
    setting, versus_l1 = "50% of channels", ("l1",)
    gradient = [f"pruning.importance_batches={STATISTICS_BATCHES}"]
    out += [
        Variant(setting, "l1", ("pruning=channel", _LATENCY_OFF)),
        Variant(
            setting, "taylor", ("pruning=channel", "pruning.importance=taylor", *gradient, _LATENCY_OFF), versus_l1
        ),
        Variant(
            setting, "fisher", ("pruning=channel", "pruning.importance=fisher", *gradient, _LATENCY_OFF), versus_l1
        ),
        Variant(setting, "apoz", ("pruning=apoz", _LATENCY_OFF), versus_l1),
        Variant(setting, "activation", ("pruning=activation", _LATENCY_OFF), versus_l1),
    ]
    for setting, base in (("2:4", ("pruning=nm",)), ("4x4 blocks, 75% of blocks", ("pruning=block",))):
        out += [
            Variant(setting, "magnitude", base),
            Variant(setting, "taylor", (*base, "pruning.importance=taylor", *gradient), ("magnitude",)),
            Variant(setting, "fisher", (*base, "pruning.importance=fisher", *gradient), ("magnitude",)),
        ]
    out.append(
        Variant(
            "4x4 blocks, 75% of blocks",
            "magnitude, scope=layer",
            ("pruning=block", "pruning.scope=layer"),
            ("magnitude",),
        )
    )
    setting, ref, uniform = "90% of weights, per-layer targets", "global threshold", "uniform per layer"
    out += [
        Variant(setting, ref, ("pruning.sparsity=0.9",)),  # the same run as part 1's magnitude at 90%
        Variant(setting, uniform, ("pruning=magnitude_layerwise", "pruning.sparsity=0.9"), (ref,)),
        Variant(setting, "sensitivity", ("allocation=sensitivity", "pruning.sparsity=0.9"), (uniform, ref)),
    ]
    return out


DENSE = ("pruning=none",)  # plus optimizer.lr_milestones=[end_epoch]


# ------------------------------------------------------------------------------------------------- helpers
def _short(name: str) -> str:
    """``model.features.1.weight`` -> ``features.1``."""
    return name.removeprefix("model.").removesuffix(".weight")


# ------------------------------------------------------------------------------------------------ accuracy
def _train(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from lightning_prune.app.train import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"output_dir={run_dir}"])
        with contextlib.redirect_stdout(io.StringIO()) as summary:  # train()'s summary: kept in the run directory
            returned = train(cfg)
    (run_dir / "summary.txt").write_text(summary.getvalue())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if abs(metrics["pruned_test_acc"] - returned) > 1e-9:
        raise RuntimeError(f"train() returned {returned}, metrics.json says {metrics['pruned_test_acc']}")
    return metrics


def run_accuracy(args: argparse.Namespace, seeds: list[int], common: list[str], base: Path) -> dict[str, Any]:
    """Every variant of every (model, seed); returns ``{"runs": {key: metrics or error}, "dense": {...}}``."""
    from hydra import compose, initialize_config_dir

    variants = accuracy_variants()
    unique = list(dict.fromkeys(v.overrides for v in variants))
    runs: dict[str, dict[str, Any]] = {}
    dense: dict[str, dict[str, Any]] = {}
    for model in args.models:
        for seed in seeds:
            head = [f"seed={seed}", f"model={model}", *common]
            for overrides in unique:
                key = _key(model, seed, overrides)
                run_dir = base / _slug(key)
                try:
                    metrics = _train([*head, *overrides], run_dir)
                except Exception as err:  # one failing variant is reported, the others still run
                    runs[key] = {"error": f"{type(err).__name__}: {err}"}
                    print(f"{key}: FAILED {runs[key]['error']}", flush=True)
                    continue
                runs[key] = metrics
                print(
                    f"{key}: dense {metrics['dense_test_acc']:.4f}  pruned {metrics['pruned_test_acc']:.4f}  "
                    f"sparsity {metrics['sparsity']:.4f} of {metrics['sparsity_of']}  "
                    f"weight sparsity {metrics['weight_sparsity']:.4f}  wall {metrics['wall_time_s']:.1f} s  "
                    "layers " + ", ".join(f"{_short(n)} {s:.3f}" for n, s in metrics["layer_sparsity"].items()),
                    flush=True,
                )
            # The dense reference: same epochs and learning-rate drop, no pruning callback.
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="config", overrides=head)
            end = int(cfg.pruning.end_epoch)
            plain = [o for o in head if not o.startswith(("pruning.", "pruning="))]
            key = _key(model, seed, DENSE)
            dense[key] = _train([*plain, *DENSE, f"optimizer.lr_milestones=[{end}]"], base / f"{model}-{seed}-dense")
            print(f"{key}: {dense[key]['pruned_test_acc']:.4f}  wall {dense[key]['wall_time_s']:.1f} s", flush=True)
    return {"runs": runs, "dense": dense}


def _key(model: str, seed: int, overrides: Sequence[str]) -> str:
    return f"{model} seed {seed} [{' '.join(overrides) or 'main job'}]"


def _slug(key: str) -> str:
    """A directory name for a run key that Hydra's override grammar accepts in ``output_dir=...``."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in key).strip("_")


def accuracy_tables(args: argparse.Namespace, seeds: list[int], results: dict[str, Any]) -> list[str]:
    runs, dense = results["runs"], results["dense"]
    variants = accuracy_variants()
    header = [
        "model",
        "setting",
        "criterion",
        "dense acc before pruning",
        "pruned test acc",
        "paired Δ vs reference (points)",
        "better / same / worse seeds",
        "achieved sparsity",
        "weight sparsity",
        "wall s",
    ]
    rows: list[list[str]] = []
    failures: list[str] = []
    dense_same: list[str] = []
    for model in args.models:
        for v in variants:
            ok = [runs[_key(model, s, v.overrides)] for s in seeds]
            errors = [m["error"] for m in ok if "error" in m]
            if errors:
                failures.append(f"{model.upper()} {v.setting} {v.criterion}: {errors[0]}")
                rows.append([model.upper(), v.setting, v.criterion, "failed", "-", "-", "-", "-", "-", "-"])
                continue
            acc = [m["pruned_test_acc"] for m in ok]
            deltas, tallies = [], []
            for reference in v.references:
                ref = next(r for r in variants if r.setting == v.setting and r.criterion == reference)
                ref_runs = [runs[_key(model, s, ref.overrides)] for s in seeds]
                if any("error" in m for m in ref_runs):
                    continue
                diffs = [a - m["pruned_test_acc"] for a, m in zip(acc, ref_runs)]
                better, worse = sum(d > 1e-12 for d in diffs), sum(d < -1e-12 for d in diffs)
                deltas.append(mean_std(diffs, 100, signed=True) + f" vs {reference}")
                tallies.append(f"{better} / {len(diffs) - better - worse} / {worse}")
            delta, tally = "; ".join(deltas) or "-", "; ".join(tallies) or "-"
            unit = ok[0]["sparsity_of"]
            rows.append(
                [
                    model.upper(),
                    v.setting,
                    v.criterion,
                    mean_std([m["dense_test_acc"] for m in ok], 100),
                    mean_std(acc, 100),
                    delta,
                    tally,
                    mean_std([m["sparsity"] for m in ok], 1.0, 4) + f" of {unit}",
                    mean_std([m["weight_sparsity"] for m in ok], 1.0, 4),
                    mean_std([m["wall_time_s"] for m in ok], 1.0, 1),
                ]
            )
        for seed in seeds:
            values = {
                round(m["dense_test_acc"], 12)
                for k, m in runs.items()
                if k.startswith(f"{model} seed {seed} [") and "error" not in m
            }
            dense_same.append(f"{model.upper()} seed {seed}: {'identical' if len(values) == 1 else sorted(values)}")
        full = [dense[_key(model, s, DENSE)] for s in seeds]
        acc = mean_std([m["pruned_test_acc"] for m in full], 100)
        wall = mean_std([m["wall_time_s"] for m in full], 1.0, 1)
        rows.append([model.upper(), "dense", "pruning=none, same epochs", "-", acc, "-", "-", "-", "-", wall])

    note = (
        f"Test accuracy in % on each seed's held-out test split (360 images: one image is 0.28 points), mean ± sample "
        f"std over seeds {seeds}. 'dense acc before pruning' is measured at the start of the first pruning epoch. "
        "Paired Δ = criterion - reference of the same seed (positive: the criterion is better). 'achieved sparsity' "
        "is of the prunable weights, channels or blocks; 'weight sparsity' is the fraction of zeros among all Linear "
        "and Conv weights (ignored layers included). Dense accuracy before pruning, per (model, seed), across all "
        "variants: " + "; ".join(dense_same) + "."
    )
    if failures:
        note += " Failed: " + "; ".join(failures) + "."
    tables = [note + "\n\n" + markdown_table(header, rows)]

    # Where each variant put its zeros: per-layer sparsities, mean over seeds.
    layer_rows = []
    for model in args.models:
        for v in variants:
            if v.setting == "2:4" or (not v.references and v.setting == "90% of weights"):
                continue  # 2:4 is 50% in every layer; the global threshold at 90% is listed with the per-layer targets
            ok = [runs[_key(model, s, v.overrides)] for s in seeds]
            if any("error" in m for m in ok):
                continue
            names = list(ok[0]["layer_sparsity"])
            layers = ", ".join(
                f"{_short(n)} {statistics.mean(m['layer_sparsity'][n] for m in ok) * 100:.0f}%" for n in names
            )
            layer_rows.append([model.upper(), v.setting, v.criterion, layers])
    layer_note = (
        "Per-layer sparsity at the end, mean over seeds: of the weights, of the blocks, or for channels of each "
        "channel group's channels (named after its root layer)."
    )
    tables.append(
        layer_note + "\n\n" + markdown_table(["model", "setting", "variant", "per-layer sparsity"], layer_rows)
    )
    return tables


# ------------------------------------------------------------------------------------------------- overhead
#: (structure, criterion); the first of each structure is the reference, which collects nothing.
OVERHEAD_VARIANTS = [
    ("unstructured", "magnitude"),
    ("unstructured", "taylor"),
    ("unstructured", "fisher"),
    ("channel", "l1"),
    ("channel", "taylor"),
    ("channel", "fisher"),
    ("channel", "apoz"),
    ("channel", "activation"),
]
_REFERENCE = {"unstructured": "magnitude", "channel": "l1"}
_TARGET = {"unstructured": 0.9, "channel": 0.5}


def _base_module(model: str) -> Any:
    import torch

    from lightning_prune.models import MLP, ImageClassifier, SmallCNN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = MLP() if model == "mlp" else SmallCNN()
    return ImageClassifier(net, lr=0.05, momentum=0.9, weight_decay=5e-4)


class _StepClock:
    """Times training steps of ``epochs``: started by the first callback of the list, stopped by the last."""

    def __init__(self, epochs: Sequence[int]) -> None:
        import lightning.pytorch as pl

        clock = self
        self.times: list[float] = []
        self._t = 0.0

        class Start(pl.Callback):
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                clock._t = time.perf_counter()

        class Stop(pl.Callback):
            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
                if trainer.current_epoch in epochs:
                    clock.times.append(time.perf_counter() - clock._t)

        self.start, self.stop = Start(), Stop()


def _fit_steps(base: Any, datamodule: Any, structure: str, criterion: str, steps_per_epoch: int) -> list[float]:
    """Step times of epochs 1-2 of a 4-epoch fit whose epochs 0-2 are collection windows from first step to last."""
    from lightning_prune import PruningCallback

    collects = criterion not in ("magnitude", "l1")
    pruning = PruningCallback(
        sparsity=_TARGET[structure],
        schedule="linear",
        start_epoch=1,
        end_epoch=3,
        importance=criterion,
        structure=structure,
        importance_batches=steps_per_epoch if collects else None,
        log_per_layer=False,
        compact=False,
        report_latency=False,
    )
    clock = _StepClock(epochs=(1, 2))
    cpu_trainer(4, [clock.start, pruning, clock.stop]).fit(copy.deepcopy(base), datamodule=datamodule)
    return clock.times


def _interleaved(base: Any, datamodule: Any, rounds: int) -> dict[tuple[str, str], list[float]]:
    """Per-step times of every variant's training step, interleaved step by step in a plain loop."""
    from lightning_prune import ChannelStructure, Unstructured
    from lightning_prune.criteria import build_importance

    batches = list(datamodule.train_dataloader())
    example = batches[0][0][:2]
    setups = {}
    for structure, criterion in OVERHEAD_VARIANTS:
        module = copy.deepcopy(base).train()
        optimizer = module.configure_optimizers()
        shape = ChannelStructure() if structure == "channel" else Unstructured()
        masks = shape.bind(module, (), example)
        shape.prune_(masks, build_importance(_REFERENCE[structure]), _TARGET[structure], "global")
        masks.attach([optimizer])
        importance = build_importance(criterion)
        if importance.collects != "nothing":
            importance = type(importance)(batches=10**9)  # a window that stays open for the whole loop
        importance.start(module, masks)
        setups[(structure, criterion)] = (module, optimizer, masks, importance)
    order = list(setups)
    warmup = 50
    times: dict[tuple[str, str], list[float]] = {v: [] for v in order}
    for r in range(warmup + rounds):
        batch = batches[r % len(batches)]
        for variant in rotated(order, r):
            module, optimizer, masks, importance = setups[variant]
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = module.training_step(batch, r)
            loss.backward()
            importance.observe(masks)
            optimizer.step()
            if r >= warmup:
                times[variant].append(time.perf_counter() - start)
    for _, _, masks, importance in setups.values():
        if importance.collects != "nothing" and importance.steps != warmup + rounds:
            raise RuntimeError(f"{importance!r} recorded {importance.steps} of {warmup + rounds} steps")
        importance.stop()
        masks.detach()
    return times


def _fit_block(
    base: Any, datamodule: Any, steps_per_epoch: int, order: list[tuple[str, str]]
) -> dict[tuple[str, str], float]:
    """One overhead block: the median step of a fit per variant, in ``order``."""
    return {
        (structure, criterion): median(_fit_steps(base, datamodule, structure, criterion, steps_per_epoch))
        for structure, criterion in order
    }


def overhead_table(
    args: argparse.Namespace, blocks: int, rounds: int, accuracy: dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """The overhead table, and its figures in milliseconds for ``results.json``."""
    import torch

    from lightning_prune.data import DigitsDataModule

    datamodule = DigitsDataModule(batch_size=64, seed=0)
    datamodule.setup()
    steps_per_epoch = len(datamodule.train_dataloader())
    rows = []
    raw: dict[str, Any] = {}
    for model in args.models:
        base = _base_module(model)
        steps, discarded, loads = quiet_blocks(
            functools.partial(_fit_block, base, datamodule, steps_per_epoch),
            OVERHEAD_VARIANTS,
            blocks,
            args,
            who=model,
            shift_by_kept=True,
            on_discard=functools.partial(report_discarded, model),
        )
        medians = {variant: [step[variant] for step in steps] for variant in OVERHEAD_VARIANTS}
        print(
            f"{model}: {len(loads)} blocks kept, {discarded} discarded; other processes used at most "
            f"{max(loads):.2f} cores during a kept block",
            flush=True,
        )
        plain, plain_load = measure_quietly(
            functools.partial(_interleaved, base, datamodule, rounds),
            args,
            functools.partial(report_repeated, f"{model}: plain loop"),
        )
        print(f"{model}: plain loop: other processes used {plain_load:.2f} cores", flush=True)
        raw[model] = {
            f"{structure} {criterion}": {
                "fit_block_medians_ms": [t * 1e3 for t in medians[(structure, criterion)]],
                "plain_loop_median_ms": median(plain[(structure, criterion)]) * 1e3,
            }
            for structure, criterion in OVERHEAD_VARIANTS
        }
        for structure, criterion in OVERHEAD_VARIANTS:
            reference = (structure, _REFERENCE[structure])
            step_ms = median(medians[(structure, criterion)]) * 1e3
            ref_ms = median(medians[reference]) * 1e3
            plain_ms = median(plain[(structure, criterion)]) * 1e3
            wall = _run_wall(accuracy, model, structure, criterion)
            if criterion == _REFERENCE[structure]:
                rows.append(
                    [
                        model.upper(),
                        structure,
                        criterion,
                        f"{step_ms:.3f}",
                        "reference",
                        f"{plain_ms:.3f}",
                        "reference",
                        wall,
                    ]
                )
                continue
            deltas = [(a - b) * 1e3 for a, b in zip(medians[(structure, criterion)], medians[reference])]
            paired = [(a - b) * 1e3 for a, b in zip(plain[(structure, criterion)], plain[reference])]
            q1, q3 = quartiles(paired)
            raw[model][f"{structure} {criterion}"]["plain_loop_paired_extra_ms"] = [median(paired), q1, q3]
            rows.append(
                [
                    model.upper(),
                    structure,
                    criterion,
                    f"{step_ms:.3f}",
                    f"{median(deltas):+.3f} [{min(deltas):+.3f}, {max(deltas):+.3f}] = "
                    f"{median(deltas) / ref_ms * 100:+.1f}%",
                    f"{plain_ms:.3f}",
                    f"{median(paired):+.3f} (IQR {q1:+.3f}..{q3:+.3f}) = {median(paired) / ref_ms * 100:+.1f}%",
                    wall,
                ]
            )
    header = [
        "model",
        "structure",
        "criterion",
        "Lightning step ms",
        "extra ms vs reference in Trainer.fit (median [min, max] over blocks) = % of its step",
        "plain-loop step ms",
        "plain loop: extra ms per step (median of paired rounds) = % of the Lightning step",
        "whole run wall s (accuracy part, context)",
    ]
    note = (
        f"Training-step time while statistics are collected (batch 64, torch threads {torch.get_num_threads()}). "
        f"Trainer.fit: {blocks} alternating blocks after an untimed one, one 4-epoch fit per variant per block, the "
        f"{2 * steps_per_epoch} steps of epochs 1-2 (collection windows of {steps_per_epoch} steps) timed, per-block "
        f"medians; blocks during which other processes used more than {args.max_other_load} cores are repeated. "
        f"Plain loop: {rounds} rounds after 50 of warm-up, the variants' steps interleaved, differences paired per "
        "round. Reference: magnitude (unstructured, masks at 90%) or l1 (channels, masks at 50%), which collect "
        "nothing. Percentages are of the reference's median Lightning step."
    )
    return note + "\n\n" + markdown_table(header, rows), raw


def _run_wall(accuracy: dict[str, Any] | None, model: str, structure: str, criterion: str) -> str:
    """Mean ± std wall time of the accuracy part's whole runs of this criterion (90% of weights, 50% of channels)."""
    if not accuracy:
        return "-"
    setting = "90% of weights" if structure == "unstructured" else "50% of channels"
    variant = next((v for v in accuracy_variants() if v.setting == setting and v.criterion == criterion), None)
    if variant is None:
        return "-"
    walls = [
        m["wall_time_s"]
        for k, m in accuracy["runs"].items()
        if k.startswith(f"{model} seed ") and k.endswith(f"[{' '.join(variant.overrides)}]") and "error" not in m
    ]
    return mean_std(walls, 1.0, 1) if walls else "-"


# ---------------------------------------------------------------------------------------------------- main
def _save(output_dir: Path | None, results: dict[str, Any]) -> None:
    """Every run's metrics and the overhead figures, as ``results.json`` in ``--output-dir``."""
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"seed 0, {' '.join(QUICK)}, 2 blocks, 100 rounds")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--blocks", type=int, default=None, help="overhead blocks (default 12, 2 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="plain-loop rounds (default 2000, 100 with --quick)")
    parser.add_argument("--output-dir", type=Path, default=None, help="keep run directories and results.json here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every accuracy run")
    add_contention_arguments(parser, unit="overhead block", quiet_timeout=120.0, max_attempts=4)
    args = parser.parse_args()
    if args.quick and not any(a.startswith("--quiet-timeout") for a in sys.argv):
        args.quiet_timeout = 10.0  # a smoke test waits little for quiet
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    blocks = args.blocks or (2 if args.quick else 12)
    rounds = args.rounds or (100 if args.quick else 2000)
    common = ["trainer.enable_progress_bar=false", *(QUICK if args.quick else []), *args.overrides]

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; quieted below)
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import lightning_prune.app.train  # noqa: F401  (registers the config schemas)

    torch.set_num_threads(THREADS)
    quiet_lightning(r".*self\.log\(\)` but the `self\.trainer` reference.*")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        shown = compose(config_name="config", overrides=[f"seed={seeds[0]}", *common])
    pruning = OmegaConf.to_container(shown.pruning, resolve=True)
    print("Importance criteria, patterns and per-layer targets: digits MLP and CNN, same seeds side by side")
    print(
        environment(
            {
                "config": f"conf/config.yaml with {common} (+ seed, model, the variant's overrides, output_dir)",
                "schedule": f"{pruning['schedule']} from epoch {pruning['start_epoch']} to {pruning['end_epoch']}, "
                f"{shown.trainer.max_epochs} epochs, optimizer {OmegaConf.to_container(shown.optimizer, resolve=True)}",
                "data": f"{shown.data._target_} batch {shown.data.batch_size}, split and order follow the seed",
                "models": args.models,
                "seeds": seeds,
                "torch-pruning": version("torch-pruning"),
            }
        )
    )
    print(flush=True)

    tables: list[str] = []
    accuracy = None
    saved: dict[str, Any] = {"seeds": seeds, "models": args.models, "overrides": common}
    start = time.perf_counter()
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory(prefix="criteria-") as tmp:
            accuracy = run_accuracy(args, seeds, common, args.output_dir or Path(tmp))
        saved["accuracy"] = accuracy
        _save(args.output_dir, saved)
        tables += accuracy_tables(args, seeds, accuracy)
        print(f"accuracy part: {time.perf_counter() - start:.0f} s", flush=True)
    if not args.skip_overhead:
        start = time.perf_counter()
        table, saved["overhead"] = overhead_table(args, blocks, rounds, accuracy)
        _save(args.output_dir, saved)
        tables.append(table)
        print(f"overhead part: {time.perf_counter() - start:.0f} s", flush=True)
    for table in tables:
        print()
        print(table)


if __name__ == "__main__":
    main()
