"""Prune a saved checkpoint in one shot: ``python scripts/oneshot.py <run dir | ckpt> [--out PATH] [options]``.

Rebuilds the LightningModule from the run's Hydra config (``<run dir>/.hydra/config.yaml``, found above a
checkpoint too, or ``--config``), loads the checkpoint's weights (the newest ``*.ckpt`` under a run directory),
prunes them with ``lightning_prune.oneshot.prune_one_shot`` (Wanda, SparseGPT or magnitude; unstructured or N:M;
OWL layer sparsity with ``--allocation owl``) from the first ``--samples`` training samples of the run's data, and
writes the pruned checkpoint (default ``<checkpoint>.pruned.ckpt``) atomically: the whole file or nothing. Its masks
are saved as a ``PruningCallback(schedule="one_shot", start_epoch=0)`` saves them, so ``scripts/export.py`` exports
it and a fine-tuning run resumed from it keeps them exact; the optimizer state is dropped. Prints the per-layer
table (target, sparsity, relative reconstruction error). Exits with status 2 and a message naming what is wrong.

    python scripts/oneshot.py outputs/train/2026-12-01_10-00-00 --method sparsegpt --structure 2:4
    python scripts/oneshot.py last.ckpt --config run/.hydra/config.yaml --method wanda --sparsity 0.7 --allocation owl
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _export_script() -> ModuleType:
    """``scripts/export.py``, whose checkpoint and config look-ups this script shares."""
    spec = importlib.util.spec_from_file_location(
        "lightning_prune_export_script", Path(__file__).with_name("export.py")
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a run directory (outputs/train/<date>) or a .ckpt file")
    parser.add_argument("--config", type=Path, default=None, help="the run's config.yaml (default: .hydra/ above)")
    parser.add_argument("--out", type=Path, default=None, help="the pruned checkpoint (default: <ckpt>.pruned.ckpt)")
    parser.add_argument("--method", default="wanda", help="wanda | sparsegpt | magnitude (default wanda)")
    parser.add_argument("--sparsity", type=float, default=None, help="per layer (default 0.5, n/m for N:M)")
    parser.add_argument("--structure", default="unstructured", help="unstructured or an N:M pattern such as 2:4")
    parser.add_argument("--allocation", default=None, help="owl: OWL's non-uniform layer sparsity, same total")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    parser.add_argument("--blocks", default=None, help="the repeated blocks' container (default: found)")
    parser.add_argument("--ignore", nargs="*", default=[], help="module-name patterns to keep dense")
    parser.add_argument("--trust", action="store_true", help="unpickle a checkpoint that weights_only cannot read")
    args = parser.parse_args(argv)

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lightning_prune._files import atomic_save
    from lightning_prune.app.oneshot import prune_checkpoint
    from lightning_prune.app.train import instantiate_module

    export = _export_script()
    try:
        if not args.path.exists():
            raise ValueError(f"{str(args.path)!r} does not exist: pass a run directory or a checkpoint file.")
        config = args.config or export._find_config(args.path)
        if config is None or not config.is_file():
            raise ValueError(
                f"No Hydra config for {str(args.path)!r}: expected .hydra/config.yaml in the run directory (or above "
                "the checkpoint); pass --config."
            )
        checkpoint_path = export._find_checkpoint(args.path)
        cfg = OmegaConf.load(config)
        checkpoint = export.load_checkpoint(checkpoint_path, trust=args.trust)
        pruned, report = prune_checkpoint(
            checkpoint,
            instantiate_module(cfg),  # type: ignore[arg-type]
            instantiate(cfg.data),
            method=args.method,
            sparsity=args.sparsity,
            structure=args.structure,
            allocation=args.allocation,
            num_samples=args.samples,
            ignore=args.ignore,
            blocks=args.blocks,
        )
        out = args.out or checkpoint_path.with_suffix(".pruned.ckpt")
        if out.resolve() == checkpoint_path.resolve():
            raise ValueError(f"--out {str(out)!r} is the checkpoint itself: write the pruned one elsewhere.")
        atomic_save(pruned, out)
    except (ValueError, TypeError, RuntimeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"pruned checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
