"""CPU speed of channel-pruned, compacted networks: ours against Torch-Pruning's MagnitudePruner.

    .venv/bin/python benchmarks/compaction.py            # VGG-11, ResNet-20, ResNet-18 at 30/50/70%, 15 blocks
    .venv/bin/python benchmarks/compaction.py --quick    # ResNet-20 and VGG-11 at 50%, 3 blocks: a smoke test

Models (random initialisation, eval mode, input 3x32x32): ``vgg11()`` (CIFAR VGG-11 with BatchNorm),
``resnet20()`` and torchvision's ResNet-18 with the CIFAR stem, ``torchvision_model("resnet18",
small_inputs=True)`` (3x3 stride-1 first convolution, no max pool; with the ImageNet stem a 32x32 image is
down to 8x8 before the first stage and to 1x1 in the last). For each model and fraction ``r`` of channels
pruned, these variants are built from the same dense model:

* ``dense``: the model itself, the reference of every "dense/x" ratio;
* ``dense deployable``: ``deployable(dense, x)`` (BatchNorm folded, channels-last), what deployment alone gives;
* ``ours``: ``prune_channels_(copy, x, sparsity=r, importance="l1", scope=--scope, round_to=--round-to,
  ignore=[<classifier>])``, then ``compact(copy, x)``, then ``deployable(small, x)``;
* ``ours, round_to=16``: the same with ``round_to=16`` (``--alt-round-to``): every pruned layer keeps a multiple
  of 16 channels, the width of an AVX-512 register of float32;
* ``ours, compact only``: the ``ours`` compacted model before ``deployable`` (BatchNorm kept, contiguous);
* ``TP``: ``tp.pruner.MagnitudePruner(copy, x, importance=tp.importance.MagnitudeImportance(p=1),
  pruning_ratio=r, ignored_layers=[<classifier>], global_pruning=False)`` then ``pruner.step()``, Torch-Pruning's
  own compacted model (uniform ratio per layer, BatchNorm kept, contiguous);
* ``TP deployable``: ``deployable`` applied to TP's model, so that ours and TP's can be compared like for like.

``--ablation`` adds ``ours, fold only`` and ``ours, channels-last only`` (``deployable`` with one switch off).

MACs per sample are counted with ``count_flop_macs`` (``torch.utils.flop_counter.FlopCounterMode``, FLOPs / 2).
Latency: ``torch.set_num_threads(2)``, ``model.eval()``, ``torch.inference_mode()``, contiguous float32
inputs. Every variant is warmed up (3 forwards at each batch size) and then timed side by side in one
process: a block times each variant at batch 1 (median of ``--repeats-b1`` forwards) and at batch 64 (median
of ``--repeats-b64``), the variants in an order that rotates from block to block; one untimed block comes
first. Each ratio is computed per block and the table gives the median over blocks with the interquartile
range. "realised" is the latency ratio at batch 64 over the MACs ratio (1.0: the time falls as much as the
work). "x/ours b64" is the variant's batch-64 latency over ours: above 1, ours is faster.

Noise control (see /work/shared/MEASURING.md): before each block, wait for other processes on the machine to
go quiet; a block during which they used more than ``--max-other-load`` cores on average is discarded and
repeated (the count is printed); the cyclic garbage collector is paused during a block.
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

from _common import (
    THREADS,
    add_contention_arguments,
    contention_note,
    environment,
    markdown_table,
    median,
    median_iqr,
    quiet_blocks,
    time_block,
    version,
    warm_up,
)

RATIOS = (0.3, 0.5, 0.7)
BATCHES = (1, 64)
ALT_ROUND_TO = 16
ABLATION_VARIANTS = ("ours, fold only", "ours, channels-last only")


def _main_variants(alt_round_to: int) -> tuple[str, ...]:
    return ("dense", "dense deployable", "ours", _alt(alt_round_to), "ours, compact only", "TP", "TP deployable")


def _alt(round_to: int) -> str:
    return f"ours, round_to={round_to}"


def _models() -> dict[str, tuple[str, str, Callable[[], Any]]]:
    """key -> (label, name of the classifier module, builder)."""
    from lightning_prune.models import resnet20, torchvision_model, vgg11

    return {
        "vgg11": ("VGG-11 (CIFAR, BN)", "head", vgg11),
        "resnet20": ("ResNet-20", "head", resnet20),
        "resnet18": (
            "ResNet-18 (torchvision, CIFAR stem)",
            "fc",
            lambda: torchvision_model("resnet18", num_classes=10, small_inputs=True),
        ),
    }


def _variants(
    dense: Any, head: str, ratio: float, x: Any, scope: str, round_to: int, alt_round_to: int, ablation: bool
) -> dict[str, Any]:
    """The variants of one (model, ratio), all in eval mode; a variant ``prune_channels_`` refuses (a ``round_to``
    that cannot reach the ratio) maps to the refusal's message instead."""
    import torch_pruning as tp

    from lightning_prune.deploy.compact import compact
    from lightning_prune.deploy.fold import deployable
    from lightning_prune.structures.channel import prune_channels_

    masked = copy.deepcopy(dense)
    prune_channels_(masked, x, sparsity=ratio, importance="l1", scope=scope, round_to=round_to, ignore=[head])
    small = compact(masked, x).eval()

    theirs = copy.deepcopy(dense)
    pruner = tp.pruner.MagnitudePruner(
        theirs,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[theirs.get_submodule(head)],
        global_pruning=False,
    )
    pruner.step()
    theirs.eval()

    out = {
        "dense": dense,
        "dense deployable": deployable(dense, x),
        "ours": deployable(small, x),
        "ours, compact only": small,
        "TP": theirs,
        "TP deployable": deployable(theirs, x),
    }
    rounded = copy.deepcopy(dense)
    try:
        prune_channels_(rounded, x, sparsity=ratio, importance="l1", scope=scope, round_to=alt_round_to, ignore=[head])
        out[_alt(alt_round_to)] = deployable(compact(rounded, x).eval(), x)
    except ValueError as err:
        out[_alt(alt_round_to)] = f"not built: {err}"
    if ablation:
        out["ours, fold only"] = deployable(small, x, channels_last=False)
        out["ours, channels-last only"] = deployable(small, x, fold_bn=False)
    return out


def _widths(model: Any) -> str:
    from torch import nn

    return ",".join(str(m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20 and VGG-11 at 50%%, 3 blocks, fewer repeats")
    parser.add_argument("--models", nargs="+", choices=list(_models()), default=None)
    parser.add_argument("--ratios", nargs="+", type=float, default=None, help="fractions of channels pruned")
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks per (model, ratio) (default 15)")
    parser.add_argument("--repeats-b1", type=int, default=None, help="forwards per variant per block at batch 1")
    parser.add_argument("--repeats-b64", type=int, default=None, help="forwards per variant per block at batch 64")
    parser.add_argument("--scope", choices=["layer", "global"], default="layer", help="prune_channels_'s scope")
    parser.add_argument("--round-to", type=int, default=1, help="prune_channels_'s round_to for ours")
    parser.add_argument("--alt-round-to", type=int, default=ALT_ROUND_TO, help="round_to of the second variant")
    parser.add_argument("--ablation", action="store_true", help="also time deployable with one switch off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads (default 2)")
    add_contention_arguments(parser, unit="block", quiet_timeout=60.0, max_attempts=3)
    args = parser.parse_args()
    keys = args.models or (["resnet20", "vgg11"] if args.quick else list(_models()))
    ratios = tuple(args.ratios or ((0.5,) if args.quick else RATIOS))
    blocks = args.blocks if args.blocks is not None else (3 if args.quick else 15)
    repeats = {
        1: args.repeats_b1 if args.repeats_b1 is not None else (5 if args.quick else 15),
        64: args.repeats_b64 if args.repeats_b64 is not None else (2 if args.quick else 3),
    }

    import torch

    from lightning_prune.deploy.profile import count_flop_macs, count_parameters

    torch.set_num_threads(args.threads)
    names = _main_variants(args.alt_round_to) + (ABLATION_VARIANTS if args.ablation else ())
    settings = (
        f"scope={args.scope!r}, round_to={args.round_to}, importance='l1', ignore=[<classifier>], "
        "max_layer_sparsity=0.9"
    )
    print("Channel pruning on CPU: MACs and latency of compacted models, ours against Torch-Pruning")
    print(
        environment(
            {
                "tp": f"torch-pruning {version('torch-pruning')}; torchvision {version('torchvision')}",
                "models": ", ".join(_models()[k][0] for k in keys) + "; random init, eval, input 3x32x32",
                "ratios": ", ".join(f"{r:.0%}" for r in ratios) + " of channels pruned",
                "ours": f"prune_channels_({settings}) -> compact -> deployable; also with round_to={args.alt_round_to}",
                "TP": "MagnitudePruner(MagnitudeImportance(p=1), pruning_ratio=r, global_pruning=False, "
                "ignored_layers=[<classifier>]) -> step()",
                "timing": f"batch 1: median of {repeats[1]} forwards, batch 64: median of {repeats[64]}, per "
                f"variant per block; {blocks} blocks (+1 untimed), order rotating; inference_mode",
                "contention": contention_note(args),
            },
            threads=args.threads,
        )
    )
    print()

    rows: list[list[str]] = []
    notes: list[str] = []
    generator = torch.Generator().manual_seed(args.seed)
    inputs = {b: torch.randn(b, 3, 32, 32, generator=generator) for b in BATCHES}
    example = inputs[1]

    for key in keys:
        label, head, build = _models()[key]
        torch.manual_seed(args.seed)
        dense = build().eval()
        for ratio in ratios:
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                models = {
                    k: v
                    for k, v in _variants(
                        dense, head, ratio, example, args.scope, args.round_to, args.alt_round_to, args.ablation
                    ).items()
                    if k in names
                }
            for w in caught:
                print(f"{label} {ratio:.0%}: warning while building: {w.message}")
            refused = {k: v for k, v in models.items() if isinstance(v, str)}
            models = {k: v for k, v in models.items() if k not in refused}
            for k, reason in refused.items():
                print(f"{label} {ratio:.0%}: {k}: {reason}")
            present = tuple(k for k in names if k in models)
            macs = {k: count_flop_macs(m, example) for k, m in models.items()}
            params = {k: count_parameters(m) for k, m in models.items()}
            print(
                f"{label} {ratio:.0%}: built in {time.perf_counter() - start:.1f} s; conv widths ours "
                f"[{_widths(models['ours'])}], round_to={args.alt_round_to} "
                f"[{_widths(models[_alt(args.alt_round_to)]) if _alt(args.alt_round_to) in models else '-'}], TP "
                f"[{_widths(models['TP'])}]",
                flush=True,
            )
            warm_up(models, inputs)
            per_block, discarded, loads = quiet_blocks(
                functools.partial(time_block, models, inputs, repeats=repeats),
                present,
                blocks,
                args,
                who=f"{label} {ratio:.0%}",
            )
            notes.append(
                f"{label} {ratio:.0%}: {len(per_block)} blocks kept, {discarded} discarded, other load median "
                f"{median(loads):.2f} cores"
            )
            dense_ms = {b: 1e3 * median([r[("dense", b)] for r in per_block]) for b in BATCHES}
            print(
                f"{label} {ratio:.0%}: {len(per_block)} blocks ({discarded} discarded); median ms at batch 1 / 64: "
                + ", ".join(
                    f"{k} {1e3 * median([r[(k, 1)] for r in per_block]):.2f} / "
                    f"{1e3 * median([r[(k, 64)] for r in per_block]):.1f}"
                    for k in present
                ),
                flush=True,
            )
            for k in names:
                if k in refused:
                    rows.append([label, f"{ratio:.0%}", k, "not built: round_to cannot reach the ratio", *["-"] * 6])
                    continue
                if k == "dense":
                    rows.append(
                        [
                            label,
                            f"{ratio:.0%}",
                            k,
                            f"{params[k]:,}",
                            f"{macs[k] / 1e6:.1f}M",
                            "1.00",
                            f"{dense_ms[1]:.2f} ms",
                            f"{dense_ms[64]:.1f} ms",
                            "-",
                            "-",
                        ]
                    )
                    continue
                speed = {b: [r[("dense", b)] / r[(k, b)] for r in per_block] for b in BATCHES}
                mac_ratio = macs["dense"] / macs[k]
                realised = [s / mac_ratio for s in speed[64]]
                vs_ours = [r[(k, 64)] / r[("ours", 64)] for r in per_block]
                rows.append(
                    [
                        label,
                        f"{ratio:.0%}",
                        k,
                        f"{params[k]:,}",
                        f"{macs[k] / 1e6:.1f}M",
                        f"{mac_ratio:.2f}",
                        median_iqr(speed[1]),
                        median_iqr(speed[64]),
                        f"{median(realised):.2f}",
                        "-" if k == "ours" else median_iqr(vs_ours),
                    ]
                )

    print()
    print(
        "dense/x: the dense model's MACs or latency over the variant's (above 1: the variant is cheaper), median "
        "[interquartile range] over blocks; for the dense rows, its absolute median latency. realised: latency "
        "ratio at batch 64 / MACs ratio. x/ours b64: the variant's batch-64 latency over ours (above 1: ours is "
        "faster)."
    )
    print(f"Blocks: {'; '.join(notes)}.")
    print(
        f"Measured with torch {version('torch')}, torch-pruning {version('torch-pruning')}, "
        f"torch.set_num_threads({args.threads}), {repeats[1]} / {repeats[64]} forwards per block at batch 1 / 64, "
        f"ours: {settings}."
    )
    print()
    header = [
        "model",
        "pruned",
        "variant",
        "params",
        "MACs/sample",
        "dense/x MACs",
        "dense/x b1",
        "dense/x b64",
        "realised b64",
        "x/ours b64",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
