"""Export a trained run: ``python scripts/export.py <run dir | checkpoint.ckpt> [--out DIR] [options]``.

Rebuilds the model from the run's Hydra config (``<run dir>/.hydra/config.yaml``, found above a checkpoint
too, or ``--config``), loads the checkpoint's weights (the newest ``*.ckpt`` under a run directory) and the
pruning masks the ``PruningCallback`` saved in it, and runs ``lightning_prune.deploy.report.export_model``:
``dense.pt``, ``sparse.pt`` (sparse archive), ``model.pt2`` (``torch.export``) and ``model.onnx`` in
``--out`` (default ``<run dir>/export``), each checked against the model, then file sizes and CPU latencies
at batch 1 and 64 of the dense, masked, compacted, exported, ONNX Runtime and sparse-kernel versions. The
report is printed and written to ``report.json``.

The checkpoint is read with ``torch.load(weights_only=True)``, allowing the OmegaConf containers that
Lightning stores with the hyperparameters; a checkpoint holding other objects is refused unless ``--trust``
is given (then it is unpickled: only for files you trust). Exits with status 2 and a message naming what is
missing or wrong, e.g. masks that were not applied to the saved weights.
"""

from __future__ import annotations

import argparse
import collections
import sys
import typing
from pathlib import Path
from typing import Any

import torch


def _find_config(path: Path) -> Path | None:
    for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
        candidate = folder / ".hydra" / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def _find_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    checkpoints = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise ValueError(
            f"No checkpoint (*.ckpt) under {str(path)!r}: train with trainer.enable_checkpointing=true (the "
            "default) or pass the checkpoint file."
        )
    return checkpoints[-1]


def load_checkpoint(path: Path, *, trust: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint, read without unpickling code (see the module's description)."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    allowed = [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, list, dict, int, float]
    allowed += [str, bool, tuple, set, collections.defaultdict, collections.OrderedDict]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not trust:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # not a zip checkpoint at all: torch's own message says what it is
                unsafe = [str(err).strip().splitlines()[0]]
            allowed_names = {f"{getattr(a, '__module__', '')}.{getattr(a, '__qualname__', a)}" for a in allowed}
            named = [u for u in unsafe if u not in allowed_names] or unsafe
            raise ValueError(
                f"{str(path)!r} holds objects that torch.load(weights_only=True) does not read: {named}. If you "
                "trust the file, pass --trust to unpickle it."
            ) from err
    return torch.load(path, map_location="cpu", weights_only=False)


def _masks(checkpoint: dict[str, Any], prefix: str) -> dict[str, torch.Tensor] | None:
    """The keep-masks a PruningCallback saved, renamed for the inner network (``prefix`` removed)."""
    states = [s for key, s in checkpoint.get("callbacks", {}).items() if str(key).startswith("PruningCallback")]
    masks = {}
    for state in states:
        for name, mask in (state.get("masks") or {}).items():
            masks[name.removeprefix(prefix)] = mask
    return masks or None


def _example_inputs(cfg: Any) -> tuple[torch.Tensor, str]:
    from hydra.utils import instantiate

    from lightning_prune.app.train import example_input

    datamodule = instantiate(cfg.data)
    try:
        datamodule.prepare_data()
        datamodule.setup("test")
        inputs, _ = next(iter(datamodule.test_dataloader()))
        return inputs[:8], "the first 8 test samples"
    except Exception as err:  # a dataset that is not on this machine: zeros of the declared shape still check shapes
        return example_input(datamodule).repeat(2, *([1] * len(datamodule.input_shape))), f"zeros ({err})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a run directory (outputs/train/<date>) or a .ckpt file")
    parser.add_argument("--config", type=Path, default=None, help="the run's config.yaml (default: .hydra/ above)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <run dir>/export)")
    parser.add_argument("--forms", nargs="+", default=None, help="dense sparse torch_export onnx (default: all)")
    parser.add_argument("--no-latency", action="store_true", help="write and check the files, do not time them")
    parser.add_argument("--no-sparse-kernels", action="store_true", help="do not try sparse CPU kernels")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--blocks", type=int, default=5, help="alternating timing blocks (default 5)")
    parser.add_argument("--repeats", type=int, default=10, help="calls per version per block (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads while timing")
    parser.add_argument("--compact", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--trust", action="store_true", help="unpickle a checkpoint that weights_only cannot read")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    from lightning_prune.app.train import instantiate_module
    from lightning_prune.deploy.report import FORMS, export_model

    try:
        if not args.path.exists():
            raise ValueError(f"{str(args.path)!r} does not exist: pass a run directory or a checkpoint file.")
        config = args.config or _find_config(args.path)
        if config is None or not config.is_file():
            raise ValueError(
                f"No Hydra config for {str(args.path)!r}: expected .hydra/config.yaml in the run directory (or above "
                "the checkpoint); pass --config."
            )
        checkpoint_path = _find_checkpoint(args.path)
        cfg = OmegaConf.load(config)
        module = instantiate_module(cfg)  # type: ignore[arg-type]
        checkpoint = load_checkpoint(checkpoint_path, trust=args.trust)
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            raise ValueError(f"{str(checkpoint_path)!r} has no `state_dict`: not a Lightning checkpoint.")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"The checkpoint does not fit the model of {config}: {err}") from err
        net = getattr(module, "model", module)
        prefix = "model." if net is not module else ""
        masks = _masks(checkpoint, prefix)
        inputs, described = _example_inputs(cfg)
        run_dir = args.path if args.path.is_dir() else config.parent.parent
        out = args.out or run_dir / "export"
        print(f"Exporting {type(net).__name__} from {checkpoint_path} (checked on {described}) into {out}")
        report = export_model(
            net,
            inputs,
            out,
            masks=masks,
            forms=tuple(args.forms) if args.forms else FORMS,
            sparse_kernels=not args.no_sparse_kernels,
            latency=not args.no_latency,
            batch_sizes=tuple(args.batch_sizes),
            blocks=args.blocks,
            repeats=args.repeats,
            threads=args.threads,
            compact={"auto": "auto", "true": True, "false": False}[args.compact],  # type: ignore[arg-type]
        )
    except (ValueError, TypeError, RuntimeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"report: {Path(report.output_dir) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
