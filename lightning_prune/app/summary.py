"""The figures of a finished run and the lines of its summary: sparsity, parameters and MACs
(:func:`size_figures`), the compaction report (:func:`compaction_metrics`, :func:`compaction_lines`), and which
training aids were active, the regularization penalty and distillation (:func:`training_aid_lines`).

:func:`~lightning_prune.app.train.train` writes the figures to ``metrics.json`` and prints the lines, so that a
run's log says how the model was trained, not only what it reached.

Example:
    >>> from omegaconf import OmegaConf
    >>> cfg = OmegaConf.create({"regularization": {"kind": "l1", "strength": 3e-4, "stop_epoch": 10}})
    >>> print("\\n".join(training_aid_lines(cfg, pruning_start=10)))
      regularization   l1, strength 0.0003, epochs 0-9 (stopped at epoch 10)
      distillation     none
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_prune.deploy.profile import count_macs
from lightning_prune.masks.params import PRUNABLE_TYPES


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


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the weights of ``model``'s Linear and Conv layers.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> _ = nn.init.zeros_(net.weight)
        >>> weight_sparsity(net)
        1.0
    """
    weights: list[torch.Tensor] = [
        cast(torch.Tensor, m.weight) for m in model.modules() if isinstance(m, PRUNABLE_TYPES)
    ]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


def sparsity_unit(pruning: Any) -> Literal["weights", "channels", "blocks"]:
    """What ``pruning``'s sparsity counts: ``"channels"`` for channel pruning, ``"blocks"`` for block pruning, else
    ``"weights"``.

    Example:
        >>> from lightning_prune import PruningCallback
        >>> sparsity_unit(PruningCallback(sparsity=0.5, structure="channel")), sparsity_unit(None)
        ('channels', 'weights')
        >>> sparsity_unit(PruningCallback(sparsity=0.5, structure="block"))
        'blocks'
    """
    name = getattr(getattr(pruning, "structure", None), "name", None)
    return "channels" if name == "channel" else "blocks" if name == "block" else "weights"


def compaction_metrics(pruning: Any) -> dict[str, Any] | None:
    """The pruning callback's compaction report for ``metrics.json``, or None when it did not compact.

    The keys are the callback's ``compaction_report`` without the ``compact/`` prefix: ``<figure>_before``
    (the masked model) and ``<figure>_after`` (the compact one) for each figure of
    :meth:`lightning_prune.deploy.profile.ModelProfile.as_dict` (``params``, ``macs``, ``latency_b<batch>_ms`` when
    latency was measured), plus ``path``, where the compact model was saved.

    Example:
        >>> from types import SimpleNamespace
        >>> callback = SimpleNamespace(
        ...     compaction_report={"compact/params_before": 100, "compact/params_after": 40}, compact_path="c.pt"
        ... )
        >>> compaction_metrics(callback)
        {'params_before': 100, 'params_after': 40, 'path': 'c.pt'}
    """
    report = getattr(pruning, "compaction_report", None)
    if not report:
        return None
    figures: dict[str, Any] = {key.removeprefix("compact/"): value for key, value in report.items()}
    path = getattr(pruning, "compact_path", None)
    figures["path"] = None if path is None else str(path)
    return figures


def compaction_lines(compaction: dict[str, Any]) -> list[str]:
    """Summary lines: each figure of the masked and the compact model, and where the compact one is."""
    lines = ["  compaction       masked -> compact model"]
    names = [key.removesuffix("_before") for key in compaction if key.endswith("_before")]
    for name in names:
        before, after = compaction[name + "_before"], compaction.get(name + "_after")
        if after is None or before == after == 0:  # not measured (e.g. MACs of a model with several inputs)
            continue
        ratio = f"{before / after:.2f}x" if after else "-"
        if name.startswith("latency_"):
            label = "latency " + name.removeprefix("latency_").removesuffix("_ms")
            lines.append(f"    {label:<13}  {before:.2f} ms -> {after:.2f} ms  ({ratio} faster)")
        else:
            label = "MACs/sample" if name == "macs" else name
            lines.append(f"    {label:<13}  {int(before):,} -> {int(after):,}  ({ratio} smaller)")
    if "test_acc" in compaction:
        lines.append(f"    {'test acc':<13}  {compaction['test_acc']:.4f}  (the compact model's own)")
    lines.append(f"    {'saved to':<13}  {compaction['path']}  (lightning_prune.load_compact(model, path))")
    return lines


def size_figures(net: nn.Module, pruning: Any, example: torch.Tensor) -> tuple[dict[str, Any], list[str]]:
    """The pruned network's sparsity, parameters and MACs per sample: ``metrics.json`` entries and summary lines."""
    macs = count_macs(net, example.to(next(net.parameters()).device))
    total = sum(p.numel() for p in net.parameters())
    nonzero = sum(int((p != 0).sum()) for p in net.parameters())
    unit = sparsity_unit(pruning)
    figures: dict[str, Any] = {
        "target_sparsity": pruning.sparsity if pruning else 0.0,
        "sparsity": float(pruning.achieved_sparsity) if pruning else weight_sparsity(net),
        "sparsity_of": unit,
        "weight_sparsity": weight_sparsity(net),
        "layer_sparsity": dict(pruning.layer_sparsity()) if pruning else {},
        "nonzero_params": nonzero,
        "total_params": total,
        "macs": macs.macs,
        "dense_macs": macs.dense_macs,
    }
    lines = [
        f"  sparsity         {figures['sparsity']:.4f}  (of the prunable {unit}; target "
        f"{figures['target_sparsity']:.4f})",
    ]
    schedule = getattr(pruning, "schedule", None)
    if schedule is not None:
        lines.append(f"  schedule         {schedule.describe()}")
    if unit != "weights":
        lines.append(f"  weight sparsity  {figures['weight_sparsity']:.4f}  (zeros among all Linear/Conv weights)")
    lines += [
        f"  nonzero params   {nonzero} / {total}  ({nonzero / total:.1%})",
        f"  MACs per sample  {macs.macs} / {macs.dense_macs}  ({macs.macs / max(1, macs.dense_macs):.1%})",
    ]
    return figures, lines
