"""Run the main job: ``python scripts/train.py [overrides]`` (e.g. ``model=mlp pruning.sparsity=0.95``).

A config that asks for something impossible (``pruning.sparsity=1.5``), a missing dataset or checkpoint, or a
path that cannot be written stops with one message naming the key or file, the value and what to change, and
exit status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
A run that fails for any reason leaves ``metrics.json`` with ``status: "failed"`` and the ``error`` in its
run directory, so a sweep's summary can tell failed runs from missing ones.
"""

import contextlib
import json

import hydra
from omegaconf import DictConfig

from lightning_prune._files import atomic_write_json
from lightning_prune.app.errors import exit_with_message
from lightning_prune.app.train import resolve_output_dir, task_overrides, train


def record_failure(cfg: DictConfig, error: BaseException) -> None:
    """Write ``metrics.json`` with ``status: "failed"`` and the error message into the run directory, unless
    the run already wrote one that says so (with its figures); written atomically, so a full disk leaves the
    previous file, never an empty one."""
    try:
        path = resolve_output_dir(cfg) / "metrics.json"
    except ValueError:  # no folder to write into: the error itself says why
        return
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("status") == "failed":
            return
    metrics = {"status": "failed", "error": f"{type(error).__name__}: {error}", "overrides": task_overrides()}
    with contextlib.suppress(OSError):  # an unwritable run directory must not hide the error itself
        atomic_write_json(path, metrics)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Train, prune and test as ``cfg`` says; return the pruned test accuracy for sweepers."""
    try:
        return train(cfg)
    except Exception as error:
        record_failure(cfg, error)
        exit_with_message(error)  # a mistake in the input: its message alone, exit status 1
        raise


if __name__ == "__main__":
    main()
