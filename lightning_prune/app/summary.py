"""Lines of the run summary that say which training aids were active: the regularization penalty and distillation.

:func:`~lightning_prune.app.train.train` adds them to its summary, so that a run's log says how the model was
trained, not only what it reached.

Example:
    >>> from omegaconf import OmegaConf
    >>> cfg = OmegaConf.create({"regularization": {"kind": "l1", "strength": 3e-4, "stop_epoch": 10}})
    >>> print("\\n".join(training_aid_lines(cfg, pruning_start=10)))
      regularization   l1, strength 0.0003, epochs 0-9 (stopped at epoch 10)
      distillation     none
"""

from __future__ import annotations

from typing import Any, cast

from omegaconf import DictConfig, OmegaConf


def training_aid_lines(cfg: DictConfig, pruning_start: int | None) -> list[str]:
    """The summary's ``regularization`` and ``distillation`` lines for the run ``cfg`` describes.

    Args:
        cfg: The run's config; its ``regularization`` group is active when it has a ``kind``, its
            ``distillation`` group when it has a ``_target_`` (``none`` options and absent groups read "none").
        pruning_start: The epoch pruning starts (distillation's default start), or None without pruning.

    Returns:
        Two lines, indented and aligned like the rest of the summary.

    Example:
        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"distillation": {"_target_": "x", "alpha": 0.5, "temperature": 4.0}})
        >>> training_aid_lines(cfg, pruning_start=3)[1]
        '  distillation     alpha 0.5, temperature 4, from epoch 3, teacher: the dense model at epoch 3'
    """
    return [
        f"  {'regularization':<16} {_regularization(cfg.get('regularization'))}",
        f"  {'distillation':<16} {_distillation(cfg.get('distillation'), pruning_start)}",
    ]


def _values(node: object) -> dict[str, Any]:
    if not isinstance(node, DictConfig):
        return {}
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))


def _regularization(node: object) -> str:
    values = _values(node)
    if "kind" not in values:
        return "none"
    warmup = values.get("warmup_epochs") or 0
    stop = values.get("stop_epoch")
    text = f"{values['kind']}, strength {values.get('strength', 0.0):g}"
    if stop is None:
        text += ", the whole run"
    else:
        epochs = {0: "never", 1: "epoch 0"}.get(stop, f"epochs 0-{stop - 1}")
        text += f", {epochs} (stopped at epoch {stop})"
    if warmup:
        text += f", ramped up over {warmup} epoch{'s' if warmup != 1 else ''}"
    if values.get("ignore"):
        text += f", not on {list(values['ignore'])}"
    return text


def _distillation(node: object, pruning_start: int | None) -> str:
    values = _values(node)
    if not values.get("_target_"):
        return "none"
    start = values.get("start_epoch")
    start = pruning_start if start is None else start
    start = 0 if start is None else start  # a given teacher without pruning teaches from the first epoch
    teacher = values.get("teacher")
    source = f"the checkpoint {teacher}" if teacher else f"the dense model at epoch {start}"
    return (
        f"alpha {values.get('alpha', 0.5):g}, temperature {values.get('temperature', 4.0):g}, "
        f"from epoch {start}, teacher: {source}"
    )
