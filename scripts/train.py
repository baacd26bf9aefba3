"""Run the main job: ``python scripts/train.py [overrides]`` (e.g. ``model=mlp pruning.sparsity=0.95``)."""

import hydra
from omegaconf import DictConfig

from lightning_prune.train import train


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Train, prune and test as ``cfg`` says; return the pruned test accuracy for sweepers."""
    return train(cfg)


if __name__ == "__main__":
    main()
