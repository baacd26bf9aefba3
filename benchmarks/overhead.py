"""Training-throughput overhead of pruning at 90% sparsity: PruningCallback against Lightning's ModelPruning.

    .venv/bin/python benchmarks/overhead.py            # MLP, CNN and transformer, 30 blocks of 1 + 3 epochs each
    .venv/bin/python benchmarks/overhead.py --quick    # 3 blocks of 1 + 1 epochs: a smoke test

Three variants train the same network (same seed within a block) on the 8x8 digits, one after another in
one process, block after block:

* ``none``: no pruning callback;
* ``PruningCallback``: ``lightning_prune.PruningCallback(sparsity=0.9, schedule="one_shot", start_epoch=0)``,
  which prunes to 90% at the start of epoch 0 and keeps the masks (one in-place gradient pass per optimizer step
  in ``on_before_optimizer_step``; SGD needs no re-mask after its steps);
* ``ModelPruning``: ``lightning.pytorch.callbacks.ModelPruning("l1_unstructured", amount=0.9,
  use_global_unstructured=True, make_pruning_permanent=False, apply_pruning=lambda epoch: epoch == 0)``
  on the same (module, "weight") pairs our callback prunes (Linear and Conv weights). ModelPruning prunes in
  ``on_train_epoch_end``, so it reaches 90% at the end of epoch 0 and keeps it through
  ``torch.nn.utils.prune``'s forward pre-hooks (``weight = weight_orig * weight_mask``).

Epoch 0 is therefore warm-up for every variant. Timing starts at ``on_train_batch_start`` of batch
``--warmup`` of epoch 1 and ends at ``on_train_batch_end`` of the last batch of the last epoch, so every
timed step runs at 90% sparsity (checked after each fit); the epoch boundaries inside the window are
included (our callback logs its sparsity there). Validation is off (``limit_val_batches=0``).

Noise control (see /work/shared/MEASURING.md): one untimed block first; before each block, wait for the other
processes on the machine to go quiet, then run a short untimed fit (so no variant runs first after an idle
pause); a block during which other processes used more than ``--max-other-load`` cores on average is
discarded and run again (the count is printed); the order within a block rotates (A B C, B C A, C A B) so
that each variant takes each position equally often; the cyclic garbage collector is collected before, and
paused during, each fit. Per block, each pruning variant's throughput over ``none``'s gives an overhead
``(1 - ratio) * 100``; the table reports the median over blocks with [min, max]. Two further estimates are
printed beside it: the same overhead from each fit's *median* step time (robust to stalls inside a fit), and
the time spent inside the pruning hooks themselves, measured in separate instrumented fits (ours: the
gradient pass and the optimizer post-step hook; ModelPruning: its forward pre-hooks only, the backward
of ``weight_orig * weight_mask`` is not included). Last, the same training step runs in a plain PyTorch loop
with the three variants interleaved step by step (the per-step work each callback leaves on the model, without
Lightning's own per-step cost), which cancels the machine's drifts best; it is repeated, like a block, when
other processes were busy meanwhile. A fourth network in that loop multiplies its gradients by the same masks in
one bare ``torch._foreach_mul_`` before each step, without hooks: the floor of any per-step gradient masking; and
a fifth zeroes its gradients in one bare ``torch._foreach_zero_`` instead: the floor of any pass that writes the
gradients at all (no mask read), which shows how much of the multiply's cost is the gradients' memory itself.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from _common import (
    THREADS,
    OtherLoad,
    add_contention_arguments,
    cpu_trainer,
    environment,
    gc_paused,
    markdown_table,
    measure_quietly,
    median,
    quartiles,
    quiet_lightning,
    rotated,
    wait_for_quiet,
)

VARIANTS = ("none", "PruningCallback", "ModelPruning")
#: The plain loop's extra variant: the same masks, each gradient multiplied by its mask in one bare
#: ``torch._foreach_mul_`` per step, no hooks: what any per-step masking of the gradients costs at the least.
FLOOR = "floor: one fused multiply"
#: And a fifth: the same gradients zeroed in one bare ``torch._foreach_zero_`` per step: what any pass that writes
#: them costs, before reading a mask.
ZERO_FLOOR = "floor: zero the gradients"
PLAIN_VARIANTS = (*VARIANTS, FLOOR, ZERO_FLOOR)
SPARSITY = 0.9


def _transformer() -> Any:
    """A small transformer stack on the digits: the 8 rows of an image as 8 tokens, 2 encoder layers of width 64."""
    import torch
    from torch import nn

    class RowTransformer(nn.Module):
        def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, classes: int = 10) -> None:
            super().__init__()
            self.embed = nn.Linear(8, width)
            self.position = nn.Parameter(torch.zeros(8, width))
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(width, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.embed(x.reshape(x.shape[0], 8, 8)) + self.position
            return self.head(self.encoder(tokens).mean(1))

    return RowTransformer()


def _models() -> dict[str, tuple[str, Callable[[], Any]]]:
    from lightning_prune.models import MLP, SmallCNN

    return {
        "mlp": ("MLP 64-300-100-10", lambda: MLP(input_shape=(1, 8, 8), num_classes=10, hidden=(300, 100))),
        "cnn": ("SmallCNN conv32-conv64-fc128", lambda: SmallCNN(in_channels=1, num_classes=10)),
        "transformer": ("Transformer 8 tokens x 64, 2 layers, 4 heads", _transformer),
    }


class HookClock:
    """Accumulated wall time inside wrapped functions (used by instrumented fits only)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.available = True


@contextlib.contextmanager
def _instrument(variant: str, clock: HookClock) -> Iterator[None]:
    """Wrap the pruning hooks of ``variant`` so that their wall time adds up in ``clock``."""
    from torch.nn.utils import prune

    from lightning_prune.masks import maskset as masking

    targets: list[tuple[Any, str]] = []
    if variant == "PruningCallback":
        targets = [
            (getattr(masking, "MaskSet", None), "_after_step"),
            (getattr(masking, "MaskSet", None), "mask_gradients_"),
        ]
    elif variant == "ModelPruning":
        targets = [(prune.BasePruningMethod, "__call__")]
    originals = []
    for owner, name in targets:
        fn = getattr(owner, "__dict__", {}).get(name)
        if fn is None:  # the library's internals changed: report the hook time as unavailable
            clock.available = False
            continue

        def timed(*args: Any, _fn: Callable[..., Any] = fn, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start

        setattr(owner, name, timed)
        originals.append((owner, name, fn))
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def _timer_class() -> type:
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        """Step times from batch ``warmup`` of epoch ``start_epoch`` to the end of the last training batch."""

        def __init__(self, start_epoch: int, warmup: int, clock: HookClock | None) -> None:
            self.start_epoch, self.warmup, self.clock = start_epoch, warmup, clock
            self.marks: list[float] = []  # perf_counter at each timed batch start
            self.end = 0.0
            self.hook_start = self.hook_end = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.marks or (trainer.current_epoch == self.start_epoch and batch_idx == self.warmup):
                self.marks.append(time.perf_counter())
                if len(self.marks) == 1 and self.clock is not None:
                    self.hook_start = self.clock.seconds

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.marks:
                self.end = time.perf_counter()
                if self.clock is not None:
                    self.hook_end = self.clock.seconds

        def result(self) -> dict[str, float]:
            if not self.marks:
                raise RuntimeError("the timing window was never opened: too few batches or epochs")
            steps = len(self.marks)
            durations = [b - a for a, b in zip(self.marks, [*self.marks[1:], self.end])]
            return {
                "steps": steps,
                "steps_per_s": steps / (self.end - self.marks[0]),
                "median_step_ms": 1e3 * statistics.median(durations),
                "hook_ms_per_step": 1e3 * (self.hook_end - self.hook_start) / steps,
            }

    return StepTimer


def _prunable(net: Any) -> list[tuple[Any, str]]:
    """The (module, "weight") pairs of Linear and Conv layers that ``torch.nn.utils.prune`` can mask.

    ``nn.MultiheadAttention`` calls its ``out_proj`` through the functional API, never through the module, so the
    forward pre-hook of ``torch.nn.utils.prune`` does not run: the masked weight computed once at pruning time keeps
    its autograd graph, and the second backward fails ("Trying to backward through the graph a second time").
    ModelPruning therefore gets every Linear and Conv weight but those; ``PruningCallback`` prunes them too (and the
    attention's ``in_proj_weight``), so on the transformer it masks more than ModelPruning does.
    """
    from torch import nn

    skip = {id(m.out_proj) for m in net.modules() if isinstance(m, nn.MultiheadAttention)}
    return [(m, "weight") for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in skip]


def _sparsity(pairs: list[tuple[Any, str]], variant: str) -> float:
    """Fraction of zeros among the prunable weights as the forward pass sees them."""
    zeros = total = 0
    for module, name in pairs:
        mask = getattr(module, f"{name}_mask", None) if variant == "ModelPruning" else None
        weight = getattr(module, name) if mask is None else mask
        zeros += int(weight.numel() - weight.count_nonzero())
        total += weight.numel()
    return zeros / total


def _fit(
    build: Callable[[], Any], variant: str, seed: int, epochs: int, warmup: int, instrument: bool = False
) -> dict[str, float]:
    """One fit: the timer's results and the sparsity of the prunable weights at the end."""
    import torch
    from lightning.pytorch.callbacks import ModelPruning

    from lightning_prune import PruningCallback
    from lightning_prune.data import DigitsDataModule
    from lightning_prune.models import ImageClassifier

    torch.manual_seed(seed)
    net = build()
    module = ImageClassifier(net, num_classes=10, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4)
    datamodule = DigitsDataModule(batch_size=64, seed=seed)
    clock = HookClock() if instrument else None
    timer = _timer_class()(start_epoch=1, warmup=warmup, clock=clock)
    callbacks: list[Any] = [timer]
    pairs = _prunable(net)
    if variant == "PruningCallback":
        callbacks.append(PruningCallback(sparsity=SPARSITY, schedule="one_shot", start_epoch=0))
    elif variant == "ModelPruning":
        callbacks.append(
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=pairs,
                amount=SPARSITY,
                use_global_unstructured=True,
                make_pruning_permanent=False,
                apply_pruning=lambda epoch: epoch == 0,
                verbose=0,
            )
        )
    trainer = cpu_trainer(epochs, callbacks, deterministic=False)
    with gc_paused(), _instrument(variant, clock) if clock is not None else contextlib.nullcontext():
        trainer.fit(module, datamodule=datamodule)
    result = {**timer.result(), "sparsity": _sparsity(pairs, variant) if variant != "none" else 0.0}
    if clock is not None and not clock.available:
        result["hook_ms_per_step"] = float("nan")
    return result


def _interleaved(build: Callable[[], Any], seed: int, rounds: int, warmup: int) -> dict[str, Any]:
    """The same training step in a plain PyTorch loop, the variants interleaved step by step.

    Copies of one initialised network, each with its own SGD optimizer: plain; pruned to 90% with
    ``MaskSet`` + ``Unstructured`` and the masks attached (the per-step work ``PruningCallback`` adds: one
    in-place gradient pass before the step and the optimizer post-step hook); pruned to 90% with
    ``torch.nn.utils.prune`` (what ``ModelPruning`` leaves on the model); and the two floors (:data:`FLOOR`,
    :data:`ZERO_FLOOR`) on the same masks. Each round times one step of each, in rotating order, on the same
    batch, so drifts of the machine's speed cancel in the per-round ratios.
    """
    import copy

    import torch
    import torch.nn.functional as F
    from torch.nn.utils import prune

    from lightning_prune.criteria.magnitude import MagnitudeImportance
    from lightning_prune.data import DigitsDataModule
    from lightning_prune.masks.maskset import MaskSet
    from lightning_prune.masks.params import prunable_parameters
    from lightning_prune.structures.unstructured import Unstructured

    torch.manual_seed(seed)
    base = build()
    nets = {v: copy.deepcopy(base) for v in PLAIN_VARIANTS}
    opts = {v: torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for v, net in nets.items()}
    masks = MaskSet(prunable_parameters(nets["PruningCallback"]))
    Unstructured().prune_(masks, MagnitudeImportance(), sparsity=SPARSITY, scope="global")
    masks.attach([opts["PruningCallback"]])
    floor_params = [p for p, _ in zip(prunable_parameters(nets[FLOOR]).values(), masks.masks)]
    floor_mults = [m.to(p.dtype) for p, m in zip(floor_params, masks.masks)]
    zero_params = [p for p, _ in zip(prunable_parameters(nets[ZERO_FLOOR]).values(), masks.masks)]
    with torch.no_grad():
        torch._foreach_mul_(floor_params, floor_mults)
        torch._foreach_mul_(zero_params, floor_mults)
    pairs = _prunable(nets["ModelPruning"])
    prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=SPARSITY)

    datamodule = DigitsDataModule(batch_size=64, seed=seed)
    datamodule.setup("fit")
    batches = [b for b in datamodule.train_dataloader() if len(b[1]) == 64]

    def step(v: str, i: int) -> float:
        x, y = batches[i % len(batches)]
        start = time.perf_counter()
        loss = F.cross_entropy(nets[v](x), y)
        opts[v].zero_grad(set_to_none=True)
        loss.backward()
        if v == FLOOR:
            torch._foreach_mul_([p.grad for p in floor_params], floor_mults)
        elif v == ZERO_FLOOR:
            torch._foreach_zero_([p.grad for p in zero_params])
        opts[v].step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {v: [] for v in PLAIN_VARIANTS}
    with gc_paused():
        for i in range(warmup + rounds):
            t = {v: step(v, i) for v in rotated(PLAIN_VARIANTS, i)}
            if i >= warmup:
                for v in PLAIN_VARIANTS:
                    times[v].append(t[v])
    masks.detach()
    sparsity = {
        "PruningCallback": masks.sparsity(),
        FLOOR: sum(int((p == 0).sum()) for p in floor_params) / masks.numel(),
        ZERO_FLOOR: sum(int((p == 0).sum()) for p in zero_params) / masks.numel(),
        "ModelPruning": _sparsity(pairs, "ModelPruning"),
    }
    return {"times": times, "sparsity": sparsity}


def _report_busy_plain_loop(label: str, cores: float, last: bool) -> None:
    print(f"{label}: plain loop: other processes used {cores:.2f} cores", end="")
    print(", kept (last attempt)" if last else ", repeated", flush=True)


def _added(times: dict[str, list[float]], variant: str, lightning_step_ms: float) -> str:
    """The plain loop's cell: per-round overhead over ``none`` (median and IQR), the median added time per step
    and that as a share of a Lightning step."""
    per_round = [(t / b - 1) * 100 for t, b in zip(times[variant], times["none"])]
    q1, q3 = quartiles(per_round)
    added_ms = 1e3 * median([t - b for t, b in zip(times[variant], times["none"])])
    return (
        f"{median(per_round):+.1f} (IQR {q1:+.1f}..{q3:+.1f}); {added_ms:+.3f} ms = "
        f"{100 * added_ms / lightning_step_ms:+.1f}% of the Lightning step"
    )


def _spread(values: list[float]) -> str:
    return f"{median(values):+.1f} [{min(values):+.1f}, {max(values):+.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 blocks of 1 + 1 epochs, 1 instrumented fit")
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks (default 30; 3 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs after the pruning epoch (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches at the start of epoch 1")
    parser.add_argument("--instrumented", type=int, default=None, help="instrumented fits per variant (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="plain-loop rounds (default 3000; 200 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--models", nargs="+", choices=["mlp", "cnn", "transformer"], default=["mlp", "cnn", "transformer"]
    )
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads (default 2)")
    add_contention_arguments(parser, unit="block", quiet_timeout=120.0, max_attempts=4)
    args = parser.parse_args()
    blocks = args.blocks if args.blocks is not None else (3 if args.quick else 30)
    epochs = 1 + (args.epochs if args.epochs is not None else (1 if args.quick else 3))
    instrumented = args.instrumented if args.instrumented is not None else (1 if args.quick else 3)
    rounds = args.rounds if args.rounds is not None else (200 if args.quick else 3000)

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; quieted below)
    import torch

    torch.set_num_threads(args.threads)
    # Keep the output to the measurements: Lightning's per-Trainer info lines, our end-of-fit sparsity table
    # and the warnings that are expected here, fewer batches per epoch than the logging interval among them.
    quiet_lightning(r".*smaller than the logging interval.*")

    models = dict(_models()[key] for key in args.models)
    orders = [VARIANTS[i:] + VARIANTS[:i] for i in range(len(VARIANTS))]
    print("Training throughput at 90% sparsity: no callback vs PruningCallback vs ModelPruning")
    print(
        environment(
            {
                "data": "sklearn 8x8 digits via DigitsDataModule(batch_size=64), 19 training batches/epoch",
                "models": ", ".join(models),
                "optimizer": "SGD lr 0.05, momentum 0.9, weight decay 5e-4 (ImageClassifier)",
                "trainer": f"max_epochs={epochs}, cpu, deterministic=False, no validation/logger/checkpoints",
                "window": f"epoch 1 batch {args.warmup} to the last batch of epoch {epochs - 1} (epoch 0 = pruning)",
                "blocks": f"{blocks} timed (+1 untimed); order rotates {' / '.join(' '.join(o) for o in orders)}; "
                "same seed within a block",
                "contention": f"before each block, wait up to {args.quiet_timeout:.0f} s for other processes to "
                f"use < {args.quiet_cores} cores, then one untimed 2-epoch fit; a block during which they used "
                f"> {args.max_other_load} cores on average is discarded and repeated",
                "hooks": f"{instrumented} instrumented fit(s) per pruning variant, separate from the timed blocks",
                "plain loop": f"{rounds} rounds (+50 warm-up) of one step per variant, order rotating, batch 64",
            },
            threads=args.threads,
        )
    )
    print()

    rows = []
    notes: list[str] = []
    for label, build in models.items():
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        loads: list[float] = []
        discarded = attempt = 0
        while len(loads) < blocks and attempt < blocks * args.max_attempts:
            block = len(loads) + 1
            seed = args.seed + block
            order = orders[block % len(orders)]
            if args.quiet_cores > 0 and attempt > 0:
                wait_for_quiet(args.quiet_cores, args.quiet_timeout)
            _fit(build, "none", seed, 2, 0)  # untimed: leaves the idle wait behind before the timed fits
            with OtherLoad() as load:
                result = {v: _fit(build, v, seed, epochs, args.warmup) for v in order}
            attempt += 1
            if attempt == 1:
                continue  # untimed warm-up block
            verdict = ""
            if load.cores > args.max_other_load:
                discarded += 1
                verdict = "  DISCARDED (other processes busy), repeated"
            else:
                loads.append(load.cores)
                for v, r in result.items():
                    runs[v].append(r)
            print(
                f"{label}: block {block:2d}/{blocks}  "
                + "  ".join(
                    f"{v} {result[v]['steps_per_s']:6.1f} steps/s (median step {result[v]['median_step_ms']:.2f} ms)"
                    for v in VARIANTS
                )
                + f"  [{result['none']['steps']:.0f} timed steps; sparsity PC "
                f"{result['PruningCallback']['sparsity']:.4f}, MP {result['ModelPruning']['sparsity']:.4f}; "
                f"other processes {load.cores:.2f} cores]{verdict}",
                flush=True,
            )
        if not loads:
            raise RuntimeError(f"{label}: every block was discarded; the machine never went quiet")
        hooks: dict[str, list[float]] = {v: [] for v in VARIANTS[1:]}
        for i in range(instrumented):
            if args.quiet_cores > 0:
                wait_for_quiet(args.quiet_cores, args.quiet_timeout)
            for v in VARIANTS[1:]:
                hooks[v].append(_fit(build, v, args.seed + i, epochs, args.warmup, instrument=True)["hook_ms_per_step"])
        print(f"{label}: hook time per step (instrumented fits): {hooks}", flush=True)
        plain, plain_load = measure_quietly(
            functools.partial(_interleaved, build, args.seed, rounds, warmup=50),
            args,
            functools.partial(_report_busy_plain_loop, label),
        )
        print(
            f"{label}: plain loop, {rounds} rounds step-interleaved: median step ms "
            + ", ".join(f"{v} {1e3 * median(t):.3f}" for v, t in plain["times"].items())
            + f"; sparsity {plain['sparsity']}; other processes {plain_load:.2f} cores",
            flush=True,
        )
        notes.append(
            f"{label}: {len(loads)} blocks kept, {discarded} discarded; other load median {median(loads):.2f}, "
            f"max {max(loads):.2f} cores"
        )

        base = runs["none"]
        base_step = median([r["median_step_ms"] for r in base])
        for v in VARIANTS:
            speed = [r["steps_per_s"] for r in runs[v]]
            plain_t = plain["times"]
            if v == "none":
                wall, robust, hook = "-", "-", "-"
                loop = f"{1e3 * median(plain_t[v]):.3f} ms"
            else:
                loop = _added(plain_t, v, base_step)
                wall = _spread([(1 - s / b["steps_per_s"]) * 100 for s, b in zip(speed, base)])
                robust = _spread([(r["median_step_ms"] / b["median_step_ms"] - 1) * 100 for r, b in zip(runs[v], base)])
                hook_ms = median(hooks[v])
                hook = f"{hook_ms:.3f} ({100 * hook_ms / base_step:.1f}%)"
            over = [(1 - s / b["steps_per_s"]) * 100 for s, b in zip(speed, base)] if v != "none" else [0.0]
            q1, q3 = quartiles(over)
            iqr = f"{q1:+.1f}..{q3:+.1f}" if v != "none" else "-"
            rows.append([label, v, f"{median(speed):.1f}", wall, iqr, robust, hook, loop])
        for floor in (FLOOR, ZERO_FLOOR):
            rows.append([label, floor, "-", "-", "-", "-", "-", _added(plain["times"], floor, base_step)])

    print()
    print(
        "steps/s: median over blocks of the window's steps / wall time. Overhead vs none: per block "
        "(1 - steps/s / none's steps/s) * 100, median [min, max] and interquartile range over blocks; negative = "
        "faster than no callback. From median step: per block (median step time / none's - 1) * 100. "
        "Hook ms/step: wall time inside the pruning hooks per timed step (instrumented fits), and as % of "
        "none's median step. Plain loop: the same step without Lightning, the variants interleaved step by step "
        "(none: its median step time; others: median and IQR over rounds of (step time / none's - 1) * 100, then the "
        "median added time per step and that as a share of none's median step time under Lightning)."
    )
    print(f"Blocks: {'; '.join(notes)}.")
    print()
    header = [
        "model",
        "variant",
        "steps/s median",
        "overhead vs none % (median, [min, max])",
        "IQR",
        "from median step %",
        "hook ms/step (% of step)",
        "plain loop, step-interleaved %",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
