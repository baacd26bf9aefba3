"""Depth pruning in the Hydra application: ``pruning=depth`` (or ``pruning.depth`` beside a pruning callback) in
``train(cfg)``, and what the run reports about it.

``pruning.depth`` holds the arguments of :class:`~lightning_prune.callbacks.DepthPruning` (``num_blocks``, ``score``,
``num_samples``, ``blocks``): the least important blocks leave the model when fitting starts, and the run fine-tunes
the shallower model (with a ``PruningCallback`` beside it, that one then prunes the kept blocks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_prune._files import ArtifactWriteError
from lightning_prune.callbacks.depth import DepthPruning
from lightning_prune.deploy.compact import save_compact

__all__ = ["depth_figures", "instantiate_depth"]


def instantiate_depth(cfg: DictConfig) -> DepthPruning | None:
    """The :class:`~lightning_prune.callbacks.DepthPruning` of ``cfg.pruning.depth``; None without that node.

    Example:
        >>> instantiate_depth(OmegaConf.create({"pruning": {"depth": {"num_blocks": 2}}})).num_blocks
        2
        >>> instantiate_depth(OmegaConf.create({"pruning": {"sparsity": 0.5}})) is None
        True
    """
    node = (cfg.get("pruning") or {}).get("depth")
    if not node:
        return None
    arguments = cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))
    arguments.pop("_target_", None)
    return DepthPruning(**arguments)


def depth_figures(
    depth: DepthPruning | None, net: nn.Module, path: Path | None
) -> tuple[dict[str, Any] | None, list[str]]:
    """What a run reports about depth pruning: figures for ``metrics.json`` and summary lines.

    Args:
        depth: the run's callback (None: no depth pruning, nothing reported).
        net: the trained network, shallower now.
        path: where to save it (:func:`~lightning_prune.deploy.compact.save_compact`; reload with
            ``lightning_prune.load_compact`` into a fresh model), or None when another compact model was saved.

    Returns:
        ``{"removed", "blocks_before", "blocks_after", "score", "scores", "path"}`` (plus ``save_error`` when the file
        could not be written), or None; and the summary lines.

    Example:
        >>> depth_figures(None, nn.Linear(2, 2), None)
        (None, [])
    """
    if depth is None or depth.removed is None or depth.scores is None:
        return None, []
    scores = depth.scores
    before = len(scores.names)
    figures: dict[str, Any] = {
        "removed": list(depth.removed),
        "blocks_before": before,
        "blocks_after": before - len(depth.removed),
        "score": scores.score,
        "scores": [float(s) for s in scores.scores],
        "path": str(path) if path is not None else None,
    }
    if path is not None:
        try:
            save_compact(net, path)
        except ArtifactWriteError as err:
            figures["save_error"] = str(err)
    lines = [
        f"  depth pruning    removed blocks {depth.removed} of {scores.container!r} by {scores.score} "
        f"({before} -> {figures['blocks_after']} blocks)"
    ]
    if path is not None:
        lines.append(f"  shallow model    {path}  (lightning_prune.load_compact(model, path))")
    return figures, lines
