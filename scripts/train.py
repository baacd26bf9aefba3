"""Run the main job: ``python scripts/train.py [overrides]`` (e.g. ``model=mlp pruning.sparsity=0.95``).

A config that asks for something impossible (``pruning.sparsity=1.5``) stops with one message naming the
key, the value and what is allowed, and exit status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
A run that fails for any reason leaves ``metrics.json`` with ``status: "failed"`` and the ``error`` in its
run directory, so a sweep's summary can tell failed runs from missing ones.
"""

import contextlib
import json
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lightning_prune.app.config import ConfigError
from lightning_prune.app.train import resolve_output_dir, task_overrides, train


def record_failure(cfg: DictConfig, error: BaseException) -> None:
    """Write ``metrics.json`` with ``status: "failed"`` and the error message into the run directory."""
    metrics = {"status": "failed", "error": f"{type(error).__name__}: {error}", "overrides": task_overrides()}
    with contextlib.suppress(OSError):  # an unwritable run directory must not hide the error itself
        (resolve_output_dir(cfg) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Train, prune and test as ``cfg`` says; return the pruned test accuracy for sweepers."""
    try:
        return train(cfg)
    except Exception as error:
        record_failure(cfg, error)
        single_run = HydraConfig.get().mode == RunMode.RUN
        if isinstance(error, ConfigError) and single_run and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"Error: {error}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
