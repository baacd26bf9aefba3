"""Sensitivity analysis of the configured model: ``python scripts/sensitivity.py [overrides]``.

Trains the model densely for ``pruning.start_epoch`` epochs (or loads ``sensitivity.checkpoint``), prunes each
layer alone at every ratio of ``sensitivity.ratios``, measures validation accuracy, allocates per-layer
sparsities for ``sensitivity.target_sparsity`` (default ``pruning.sparsity``) or ``sensitivity.macs_budget``
within ``sensitivity.max_drop``, and writes ``sensitivity.csv``, ``sensitivity.md``, ``sensitivity.png`` and
``allocation.yaml`` into the run directory (``outputs/sensitivity/<date>/``). The options live in
``conf/sensitivity/default.yaml``; every group of ``conf/config.yaml`` works as for ``scripts/train.py``::

    python scripts/sensitivity.py model=mlp sensitivity.max_drop=0.01
    python scripts/sensitivity.py pruning=channel sensitivity.macs_budget=0.5
    python scripts/sensitivity.py sensitivity.checkpoint=outputs/train/<date>/csv/version_0/checkpoints/last.ckpt

An invalid config stops with one message naming the key and exit status 1 (``HYDRA_FULL_ERROR=1`` shows the
traceback instead).
"""

from pathlib import Path

import hydra
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from lightning_prune.app.errors import exit_with_message
from lightning_prune.app.sensitivity import run_sensitivity

CONF = Path(__file__).resolve().parents[1] / "conf"


def app_defaults() -> list:
    """The project's config plus the `sensitivity` group (an override once config.yaml lists the group)."""
    listed = yaml.safe_load((CONF / "config.yaml").read_text()).get("defaults", [])
    present = any(isinstance(d, dict) and any(str(k).split()[-1] == "sensitivity" for k in d) for d in listed)
    return ["config", {("override sensitivity" if present else "sensitivity"): "default"}, "_self_"]


ConfigStore.instance().store(name="sensitivity_app", node={"defaults": app_defaults(), "task_name": "sensitivity"})


@hydra.main(config_path="../conf", config_name="sensitivity_app", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Analyse, allocate and write the report as ``cfg`` says."""
    try:
        run_sensitivity(cfg)
    except Exception as error:
        exit_with_message(error)  # a mistake in the input: its message alone, exit status 1
        raise


if __name__ == "__main__":
    main()
