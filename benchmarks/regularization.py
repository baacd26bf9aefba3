"""Sparsity-inducing training and accuracy recovery on the digits MLP and CNN, same seeds side by side.

    .venv/bin/python benchmarks/regularization.py                  # seeds 0-4: accuracy tables, then the overhead
    .venv/bin/python benchmarks/regularization.py --quick          # seed 0, short training: a smoke test
    .venv/bin/python benchmarks/regularization.py --seeds 0 1 2 3 4 --skip-overhead

**Accuracy.** For every model (LeNet-300-100 ``MLP`` and ``SmallCNN``, ``ImageClassifier`` with SGD, lr 0.05,
momentum 0.9, weight decay 5e-4, batch 64) and seed, dense models are trained for ``--epochs`` epochs (the last
third at a tenth of the rate) from the same initial weights and the same data order: without a penalty, with
L1 (``--l1``, default 3e-4) and with group lasso (``--group-lasso``, default 3e-3). The two defaults were
picked on another seed (7) and its validation split, from 3e-5, 1e-4 and 3e-4 (L1) and 1e-3, 3e-3 and 1e-2
(group lasso), as the values with the best validation accuracy right after pruning at 95% (L1) and 50% of the
channels (group lasso) on both models; 1e-4 and 1e-3 did not raise it above the plain models'. Each trained
model is then pruned once:

* unstructured, global magnitude at 80%, 90% and 95% (plain and L1 models);
* 50% of the channels, global L1 channel importance (plain and group-lasso models, and for the CNN a model
  trained with BN slimming, ``--bn-slimming``, default 1e-2, picked the same way from 1e-4, 1e-3 and 1e-2);

and its test accuracy is measured right away ("at pruning", no fine-tuning). Then a copy of the same dense
model is pruned the same way by a ``PruningCallback`` (one-shot at epoch 0, ``finetune_lr_scale=0.1``: Han et
al.'s tenth of the initial rate) and fine-tuned for ``--finetune-epochs`` epochs without the penalty, once
alone and once with a ``DistillationCallback`` (alpha 0.5, T 4) whose teacher is that dense model. Accuracies
are on each seed's held-out test split (360 images); the tables give mean and sample standard deviation over
seeds, and paired differences (the same seed's two variants) for the comparisons the expectations are about.

**Overhead.** Two measures, for the plain module, each penalty and distillation. (1) Training steps inside
``Trainer.fit`` (from ``on_train_batch_start`` to ``on_train_batch_end``: forward, penalty, backward, optimizer
step, logging), in alternating blocks with the order rotating; each block is one short fit per variant, the
steps after its first epoch timed; per block, the extra median step time against the plain module. (2) The
same step (``training_step`` with the mixins, backward, optimizer step) in a plain loop, the variants
interleaved step by step, which cancels the machine's drifts best; the extra time is paired per round. Also
the penalty's own forward and backward (``regularization_penalty().backward()``) alone.
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
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
)

SPARSITIES = (0.8, 0.9, 0.95)
CHANNEL_SPARSITY = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0-4 (0 with --quick)")
    parser.add_argument("--quick", action="store_true", help="seed 0, 6 dense and 2 fine-tuning epochs")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs (default 30)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default 10)")
    parser.add_argument("--l1", type=float, default=3e-4, help="lambda of the L1 penalty")
    parser.add_argument("--group-lasso", type=float, default=3e-3, help="lambda of the group-lasso penalty")
    parser.add_argument("--bn-slimming", type=float, default=1e-2, help="lambda of BN slimming (CNN only)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--blocks", type=int, default=None, help="overhead blocks (default 12, 2 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="plain-loop rounds (default 2000, 200 with --quick)")
    add_contention_arguments(parser, unit="overhead block", quiet_timeout=120.0, max_attempts=4)
    args = parser.parse_args()
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2, 3, 4])
    epochs = args.epochs or (6 if args.quick else 30)
    finetune_epochs = args.finetune_epochs or (2 if args.quick else 10)
    blocks = args.blocks or (2 if args.quick else 12)
    rounds = args.rounds or (200 if args.quick else 2000)

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; quieted below)
    import torch

    torch.set_num_threads(THREADS)
    quiet_lightning(r".*`self.trainer` reference is not registered.*")  # the plain loop

    print("Sparsity-inducing training, fine-tuning and distillation on the digits MLP and CNN")
    print(
        environment(
            {
                "models": "MLP 64-300-100-10 (LeNet-300-100), SmallCNN conv32-conv64-fc128 (BatchNorm)",
                "training": f"ImageClassifier, SGD lr 0.05 momentum 0.9 wd 5e-4, batch 64, {epochs} dense epochs, "
                f"lr x 0.1 from epoch {epochs * 2 // 3}",
                "penalties": f"L1 lambda {args.l1:g}, group lasso lambda {args.group_lasso:g} (every Linear/Conv "
                f"weight), BN slimming lambda {args.bn_slimming:g} (CNN), the whole dense training",
                "pruning": f"one-shot global magnitude at {list(SPARSITIES)}; {CHANNEL_SPARSITY:.0%} of channels, "
                "global L1 channel importance",
                "fine-tuning": f"{finetune_epochs} epochs at lr x 0.1 (finetune_lr_scale), no penalty; "
                "KD alpha 0.5, T 4",
                "seeds": seeds,
            }
        )
    )
    print(flush=True)

    tables: list[str] = []
    if not args.skip_accuracy:
        tables += accuracy_tables(args, seeds, epochs, finetune_epochs)
    if not args.skip_overhead:
        tables.append(overhead_table(args, blocks, rounds))
    for table in tables:
        print()
        print(table)


# ------------------------------------------------------------------------------------------------- accuracy
def _module(model: str, seed: int, reg_kind: str = "l1", reg_lambda: float = 0.0, milestones: tuple = ()) -> Any:
    import torch

    from lightning_prune.models import MLP, ImageClassifier, SmallCNN

    torch.manual_seed(seed)  # the same initial weights for every variant of a seed
    net = MLP() if model == "mlp" else SmallCNN()
    return ImageClassifier(
        net,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        lr_milestones=milestones,
        reg_kind=reg_kind,
        reg_lambda=reg_lambda,
    )


def _prune_now(module: Any, structure: str, sparsity: float, example: Any) -> Any:
    """A copy of ``module`` pruned once, without training."""
    from lightning_prune import ChannelStructure, MagnitudeImportance, MaskSet, Unstructured, prunable_parameters
    from lightning_prune.criteria import build_importance

    pruned = copy.deepcopy(module)
    if structure == "channel":
        channels = ChannelStructure()
        masks = channels.bind(pruned, (), example)
        channels.prune_(masks, build_importance("l1"), sparsity, "global")
    else:
        masks = MaskSet(prunable_parameters(pruned))
        Unstructured().prune_(masks, MagnitudeImportance(), sparsity, "global")
    return pruned


def _finetune(module: Any, datamodule: Any, structure: str, sparsity: float, epochs: int, kd: bool) -> Any:
    from lightning_prune import DistillationCallback, PruningCallback

    student = copy.deepcopy(module)
    student.reg_lambda = 0.0  # fine-tuning without the penalty
    student.lr_milestones = []  # from the initial rate, 0.05 x finetune_lr_scale
    extra: dict[str, Any] = {"importance": "l1", "compact": False} if structure == "channel" else {}
    callbacks: list[Any] = [
        PruningCallback(
            sparsity=sparsity,
            schedule="one_shot",
            start_epoch=0,
            structure=structure,
            finetune_lr_scale=0.1,
            log_per_layer=False,
            **extra,
        )
    ]
    if kd:
        callbacks.append(DistillationCallback(alpha=0.5, temperature=4.0))  # teacher: the dense model at epoch 0
    cpu_trainer(epochs, callbacks).fit(student, datamodule=datamodule)
    return student


def accuracy_tables(args: argparse.Namespace, seeds: list[int], epochs: int, finetune_epochs: int) -> list[str]:
    from lightning_prune.app.train import evaluate_accuracy
    from lightning_prune.data import DigitsDataModule

    # (model, trained, structure, sparsity) -> stage -> [accuracy per seed]
    results: dict[tuple[str, str, str, float], dict[str, list[float]]] = {}
    dense: dict[tuple[str, str], list[float]] = {}
    for model in args.models:
        for seed in seeds:
            datamodule = DigitsDataModule(batch_size=64, seed=seed)
            datamodule.setup()
            test = datamodule.test_dataloader()
            example = next(iter(datamodule.train_dataloader()))[0][:2]
            drop = (epochs * 2 // 3,)  # the last third at lr 0.005, so that the last epoch's model is a settled one
            trained = {
                "plain": _module(model, seed, milestones=drop),
                "l1": _module(model, seed, "l1", args.l1, drop),
                "group_lasso": _module(model, seed, "group_lasso", args.group_lasso, drop),
            }
            if model == "cnn":  # BatchNorm scales: the CNN only
                trained["bn_slimming"] = _module(model, seed, "bn_slimming", args.bn_slimming, drop)
            for name, module in trained.items():
                start = time.perf_counter()
                cpu_trainer(epochs).fit(module, datamodule=datamodule)
                dense.setdefault((model, name), []).append(evaluate_accuracy(module, test))
                print(
                    f"{model} seed {seed}: {name} dense {dense[(model, name)][-1]:.4f} "
                    f"({time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
            plans = [(t, "unstructured", s) for t in ("plain", "l1") for s in SPARSITIES]
            plans += [(t, "channel", CHANNEL_SPARSITY) for t in ("plain", "group_lasso", "bn_slimming") if t in trained]
            for name, structure, sparsity in plans:
                module = trained[name]
                cell = results.setdefault((model, name, structure, sparsity), {})
                cell.setdefault("dense", []).append(dense[(model, name)][-1])
                now = _prune_now(module, structure, sparsity, example)
                cell.setdefault("at pruning", []).append(evaluate_accuracy(now, test))
                for kd in (False, True):
                    tuned = _finetune(module, datamodule, structure, sparsity, finetune_epochs, kd)
                    cell.setdefault("fine-tuned + KD" if kd else "fine-tuned", []).append(
                        evaluate_accuracy(tuned, test)
                    )
                print(
                    f"{model} seed {seed}: {name} {structure} {sparsity:.0%}: "
                    + "  ".join(f"{stage} {values[-1]:.4f}" for stage, values in cell.items()),
                    flush=True,
                )

    header = [
        "model",
        "trained with",
        "pruning",
        "dense",
        "at pruning (no fine-tuning)",
        "drop at pruning",
        "fine-tuned",
        "fine-tuned + KD",
    ]
    rows = []
    for (model, name, structure, sparsity), cell in results.items():
        what = f"{sparsity:.0%} of weights" if structure == "unstructured" else f"{sparsity:.0%} of channels"
        drops = [d - a for d, a in zip(cell["dense"], cell["at pruning"])]
        rows.append(
            [
                model.upper(),
                name.replace("_", " "),
                what,
                mean_std(cell["dense"], 100),
                mean_std(cell["at pruning"], 100),
                mean_std(drops, 100, signed=True),
                mean_std(cell["fine-tuned"], 100),
                mean_std(cell["fine-tuned + KD"], 100),
            ]
        )
    main_table = markdown_table(header, rows)

    paired_header = [
        "model",
        "pruning",
        "regularised - plain, at pruning",
        "regularised - plain, fine-tuned",
        "KD - no KD (plain)",
        "KD - no KD (regularised)",
    ]
    paired = []
    for model in args.models:
        cases = [("l1", "unstructured", s) for s in SPARSITIES] + [("group_lasso", "channel", CHANNEL_SPARSITY)]
        if model == "cnn":
            cases.append(("bn_slimming", "channel", CHANNEL_SPARSITY))
        for name, structure, sparsity in cases:
            plain, reg = results[(model, "plain", structure, sparsity)], results[(model, name, structure, sparsity)]

            def diff(a: list[float], b: list[float]) -> str:
                return mean_std([x - y for x, y in zip(a, b)], 100, signed=True)

            what = f"{sparsity:.0%} weights" if structure == "unstructured" else f"{sparsity:.0%} channels"
            paired.append(
                [
                    model.upper(),
                    f"{what} ({name.replace('_', ' ')})",
                    diff(reg["at pruning"], plain["at pruning"]),
                    diff(reg["fine-tuned"], plain["fine-tuned"]),
                    diff(plain["fine-tuned + KD"], plain["fine-tuned"]),
                    diff(reg["fine-tuned + KD"], reg["fine-tuned"]),
                ]
            )
    test_size = 360
    note = (
        f"Test accuracy in % (mean ± sample std over seeds {seeds}; {test_size} test images, one image = "
        f"{100 / test_size:.2f} points). 'drop at pruning' = dense - at pruning."
    )
    paired_note = "Paired differences in points (same seed, same initial weights and data order), mean ± std."
    return [note + "\n\n" + main_table, paired_note + "\n\n" + markdown_table(paired_header, paired)]


# ------------------------------------------------------------------------------------------------- overhead
class _StepTimer:
    """Times each training step after the first epoch, from batch start to batch end."""

    def __init__(self) -> None:
        import lightning.pytorch as pl

        outer = self

        class Timer(pl.Callback):
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                outer._start = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
                if trainer.current_epoch >= 1:
                    outer.times.append(time.perf_counter() - outer._start)

        self.callback = Timer()
        self.times: list[float] = []
        self._start = 0.0


def _interleaved(model: str, datamodule: Any, variants: list[str], lambdas: dict[str, float], rounds: int) -> Any:
    """Per-step times of the same training step for every variant, interleaved step by step in a plain loop.

    Each variant has its own module and optimizer; a round runs one step of each on the same batch, the order
    rotating. A step is ``training_step`` (wrapped: with the penalty or the distillation term), backward and the
    optimizer step; without a Trainer, Lightning's logging is left out for every variant alike.
    """
    batches = list(datamodule.train_dataloader())
    modules = {}
    for variant in variants:
        module = _module(model, 0, variant if variant in lambdas else "l1", lambdas.get(variant, 0.0)).train()
        if variant == "kd":
            module.set_teacher(_module(model, 1), alpha=0.5, temperature=4.0)
        modules[variant] = (module, module.configure_optimizers())
    warmup = 50
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(warmup + rounds):
        batch = batches[r % len(batches)]
        for variant in rotated(variants, r):
            module, optimizer = modules[variant]
            start = time.perf_counter()
            loss = module.training_step(batch, r)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if r >= warmup:
                times[variant].append(time.perf_counter() - start)
    return times


def _penalty_alone(model: str, kind: str, lam: float) -> float:
    """Median time of ``regularization_penalty().backward()`` alone (1000 calls after 100 of warm-up)."""
    module = _module(model, 0, kind, lam).train()
    times = []
    for i in range(1100):
        start = time.perf_counter()
        module.regularization_penalty(epoch=0).backward()
        if i >= 100:
            times.append(time.perf_counter() - start)
    return median(times)


def _fit_block(model: str, datamodule: Any, lambdas: dict[str, float], order: list[str]) -> dict[str, float]:
    """One overhead block: the median step of a 3-epoch fit per variant, in ``order``."""
    from lightning_prune import DistillationCallback

    step: dict[str, float] = {}
    for variant in order:
        module = _module(model, 0, variant if variant in lambdas else "l1", lambdas.get(variant, 0.0))
        timer = _StepTimer()
        callbacks = [timer.callback]
        if variant == "kd":
            callbacks.append(DistillationCallback(teacher=_module(model, 1), start_epoch=0))
        cpu_trainer(3, callbacks).fit(module, datamodule=datamodule)
        step[variant] = median(timer.times)
    return step


def overhead_table(args: argparse.Namespace, blocks: int, rounds: int) -> str:
    import torch

    from lightning_prune.data import DigitsDataModule

    datamodule = DigitsDataModule(batch_size=64, seed=0)
    datamodule.setup()
    lambdas = {"l1": args.l1, "group_lasso": args.group_lasso, "bn_slimming": args.bn_slimming}
    rows = []
    for model in args.models:
        variants = ["none", "l1", "group_lasso"] + (["bn_slimming"] if model == "cnn" else []) + ["kd"]
        steps, discarded, loads = quiet_blocks(
            functools.partial(_fit_block, model, datamodule, lambdas),
            variants,
            blocks,
            args,
            who=model,
            shift_by_kept=True,
            on_discard=functools.partial(report_discarded, model),
        )
        medians = {variant: [step[variant] for step in steps] for variant in variants}
        extra = {variant: [step[variant] - step["none"] for step in steps] for variant in variants if variant != "none"}
        print(
            f"{model}: {len(loads)} blocks kept, {discarded} discarded; other processes used at most "
            f"{max(loads):.2f} cores during a kept block",
            flush=True,
        )
        plain, plain_load = measure_quietly(
            functools.partial(_interleaved, model, datamodule, variants, lambdas, rounds),
            args,
            functools.partial(report_repeated, f"{model}: plain loop"),
        )
        print(f"{model}: plain loop: other processes used {plain_load:.2f} cores", flush=True)
        own = {v: _penalty_alone(model, v, lambdas[v]) for v in variants if v in lambdas}
        base = median(medians["none"])
        for variant in variants:
            step_ms = median(medians[variant]) * 1e3
            plain_ms = median(plain[variant]) * 1e3
            if variant == "none":
                rows.append([model.upper(), variant, f"{step_ms:.3f}", "-", f"{plain_ms:.3f}", "-", "-"])
                continue
            deltas = [d * 1e3 for d in extra[variant]]
            paired = [(a - b) * 1e3 for a, b in zip(plain[variant], plain["none"])]
            q1, q3 = quartiles(paired)
            rows.append(
                [
                    model.upper(),
                    variant,
                    f"{step_ms:.3f}",
                    f"{median(deltas):+.3f} [{min(deltas):+.3f}, {max(deltas):+.3f}]",
                    f"{plain_ms:.3f}",
                    f"{median(paired):+.3f} (IQR {q1:+.3f}..{q3:+.3f}) = "
                    f"{median(paired) / (base * 1e3) * 100:+.1f}% of the Lightning step",
                    f"{own[variant] * 1e3:.3f}" if variant in own else "-",
                ]
            )
    header = [
        "model",
        "variant",
        "Lightning step ms",
        "extra ms vs none (median [min, max] over blocks)",
        "plain-loop step ms",
        "plain loop: extra ms per step (median of paired rounds)",
        "penalty fwd+bwd alone ms",
    ]
    note = (
        f"Training-step time inside Trainer.fit (batch 64, {blocks} alternating blocks after a warm-up block, "
        "3-epoch fits, steps of epochs 1-2 timed; blocks during which other processes used more than "
        f"{args.max_other_load} cores are repeated; torch threads {torch.get_num_threads()}). Plain loop: "
        f"{rounds} rounds with the variants' steps interleaved, differences paired per round. 'kd' runs a "
        "teacher of the same architecture forward on every step."
    )
    return note + "\n\n" + markdown_table(header, rows)


if __name__ == "__main__":
    main()
