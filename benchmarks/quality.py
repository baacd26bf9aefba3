"""Accuracy of the main job at 90% sparsity over seeds: dense test accuracy, pruned test accuracy, the drop.

    .venv/bin/python benchmarks/quality.py                  # seeds 0, 1, 2 of the main job (conf/config.yaml)
    .venv/bin/python benchmarks/quality.py --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/quality.py --quick          # seed 0, 4 epochs (prune in epochs 1-2): a smoke test
    .venv/bin/python benchmarks/quality.py model=mlp        # any extra Hydra overrides

Each seed composes ``conf/config.yaml`` with ``seed=<s>``, ``output_dir=<run dir>`` and
``trainer.enable_progress_bar=false`` (plus the overrides given) and calls ``lightning_prune.app.train.train``,
which trains densely, prunes on the configured schedule, fine-tunes, tests, and writes ``metrics.json``: the
dense test accuracy (measured just before pruning starts), the pruned test accuracy (after training), the
achieved sparsity of the prunable weights and the wall time. Runs are in this process, one after another.

The dense accuracy above comes from a model trained for ``pruning.start_epoch`` epochs only, while the pruned
one has trained for ``trainer.max_epochs``. Unless ``--no-dense-baseline`` is given, every seed therefore also
runs ``pruning=none`` with the same epochs, learning-rate milestones (the drop at ``pruning.end_epoch``), data
split and initialisation, and the table adds that dense accuracy and the drop against it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import THREADS, environment, markdown_table, mean_std, quiet_lightning

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["trainer.max_epochs=4", "pruning.start_epoch=1", "pruning.end_epoch=2"]


def _test_size(cfg: object) -> int | None:
    """Images in the test split of the configured datamodule, when it can tell."""
    from hydra.utils import instantiate

    try:
        datamodule = instantiate(cfg.data)  # type: ignore[attr-defined]
        return len(datamodule.split_indices()[2])
    except Exception:  # a datamodule without `split_indices`: the note just leaves the count out
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"seed 0 and {' '.join(QUICK)}")
    parser.add_argument(
        "--no-dense-baseline",
        action="store_true",
        help="skip the extra pruning=none run per seed (a dense model trained for as many epochs)",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="keep run directories here (default: temp)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model=mlp")
    args = parser.parse_args()
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    overrides = ["trainer.enable_progress_bar=false", *(QUICK if args.quick else []), *args.overrides]

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; quieted below)
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_prune.app.train import train

    torch.set_num_threads(THREADS)
    quiet_lightning()

    def resolved(node: object) -> object:
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[arg-type]

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        shown = compose(config_name="config", overrides=[f"seed={seeds[0]}", *overrides])
    print("Main job at 90% sparsity: dense vs pruned test accuracy over seeds")
    print(
        environment(
            {
                "config": f"conf/config.yaml with overrides {overrides} (+ seed, output_dir)",
                "model": f"{shown.model._target_} {resolved(shown.model)}",
                "pruning": resolved(shown.pruning) if shown.get("pruning") else "none",
                "training": f"{shown.trainer.max_epochs} epochs, optimizer {resolved(shown.optimizer)}",
                "data": f"{shown.data._target_} batch {shown.data.batch_size}, split and shuffling follow the seed",
                "seeds": seeds,
            },
        )
    )
    print(flush=True)

    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        base = args.output_dir or Path(tmp)
        results = []
        for seed in seeds:
            run_dir = base / f"seed{seed}"
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="config", overrides=[f"seed={seed}", f"output_dir={run_dir}", *overrides])
                returned = train(cfg)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            if abs(metrics["pruned_test_acc"] - returned) > 1e-9:
                raise RuntimeError(f"train() returned {returned}, metrics.json says {metrics['pruned_test_acc']}")
            if not args.no_dense_baseline:
                dense_dir = base / f"seed{seed}-dense"
                # Same epochs and learning-rate milestones as the pruned run, no pruning callback.
                milestones = list(OmegaConf.to_container(cfg.optimizer, resolve=True)["lr_milestones"])
                dense_overrides = [o for o in overrides if not o.startswith(("pruning.", "pruning="))]
                with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                    cfg = compose(
                        config_name="config",
                        overrides=[
                            f"seed={seed}",
                            f"output_dir={dense_dir}",
                            *dense_overrides,
                            "pruning=none",
                            f"optimizer.lr_milestones={milestones}",
                        ],
                    )
                    metrics["full_dense_test_acc"] = train(cfg)
            results.append((seed, metrics))
            full = metrics.get("full_dense_test_acc")
            print(
                f"seed {seed}: dense {metrics['dense_test_acc']:.4f}  pruned {metrics['pruned_test_acc']:.4f}  "
                f"sparsity {metrics['sparsity']:.4f}  wall {metrics['wall_time_s']:.1f} s"
                + (f"  dense (pruning=none, same epochs) {full:.4f}" if full is not None else ""),
                flush=True,
            )

    baseline = not args.no_dense_baseline
    rows = []
    for seed, m in results:
        drop = (m["dense_test_acc"] - m["pruned_test_acc"]) * 100
        rows.append(
            [
                seed,
                f"{m['dense_test_acc'] * 100:.2f}",
                f"{m['pruned_test_acc'] * 100:.2f}",
                f"{drop:+.2f}",
                f"{m['sparsity']:.4f}",
                f"{m['wall_time_s']:.1f}",
            ]
        )
        if baseline:
            full = m["full_dense_test_acc"]
            rows[-1] += [f"{full * 100:.2f}", f"{(full - m['pruned_test_acc']) * 100:+.2f}"]
    keys = ("dense_test_acc", "pruned_test_acc", "sparsity", "wall_time_s")
    col = {key: [m[key] for _, m in results] for key in keys}
    drops = [d - p for d, p in zip(col["dense_test_acc"], col["pruned_test_acc"])]
    summary = [
        "mean ± std",
        mean_std(col["dense_test_acc"], 100),
        mean_std(col["pruned_test_acc"], 100),
        mean_std(drops, 100, signed=True),
        mean_std(col["sparsity"], digits=4),
        mean_std(col["wall_time_s"], digits=1),
    ]
    header = ["seed", "dense test acc", "pruned test acc", "drop (points)", "achieved sparsity", "wall s"]
    if baseline:
        full = [m["full_dense_test_acc"] for _, m in results]
        summary += [
            mean_std(full, 100),
            mean_std([f - p for f, p in zip(full, col["pruned_test_acc"])], 100, signed=True),
        ]
        header += ["dense, pruning=none, same epochs", "drop vs it (points)"]
    rows.append(summary)
    test_size = _test_size(shown)
    print()
    print(
        "Accuracies in %, on the held-out test split of each seed"
        + (f" ({test_size} images: one image is {100 / test_size:.2f} points)" if test_size else "")
        + "; drop = dense - pruned in points (positive: pruning lost accuracy); std is the sample standard "
        "deviation over seeds. 'dense test acc' is measured just before pruning starts; wall s is the pruned run's."
    )
    print()
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
