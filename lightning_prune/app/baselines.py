"""The dense accuracy each run of a sweep is compared with.

A run's own ``dense_test_acc`` is the dense model's accuracy when pruning starts (after ``pruning.start_epoch``
epochs), which a pruned model fine-tuned for the rest of the schedule can beat without pruning helping at all.
The fair baseline is a dense model trained for the same schedule: a run of the same sweep with
``pruning.sparsity=0`` (the same epochs and learning-rate changes, no weight removed) or ``pruning=none``.
:func:`match_baselines` finds such runs for each run of a sweep, matched on every other override (the seed
among them), and falls back to the run's own dense snapshot, saying so, when the sweep holds none.

Example:
    >>> from lightning_prune.app.sweep import RunResult
    >>> dense = RunResult("0", ["pruning.sparsity=0", "seed=1"], "completed",
    ...                   {"target_sparsity": 0.0, "pruned_test_acc": 0.97, "epochs": 30})
    >>> pruned = RunResult("1", ["pruning.sparsity=0.9", "seed=1"], "completed",
    ...                    {"target_sparsity": 0.9, "pruned_test_acc": 0.96, "dense_test_acc": 0.9, "epochs": 30,
    ...                     "dense_epoch": 10})
    >>> [b.describe() for b in match_baselines([dense, pruned])]
    ['dense run of the same schedule (job 0)', 'dense run of the same schedule (job 0)']
    >>> match_baselines([pruned])[0].describe()
    'dense snapshot at the start of pruning (epoch 10)'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lightning_prune._helpers import is_number

if TYPE_CHECKING:
    from lightning_prune.app.sweep import RunResult

__all__ = ["Baseline", "BaselineKind", "is_dense_run", "match_baselines", "snapshot_baseline"]

BaselineKind = Literal["dense_runs", "snapshot"]

# Overrides that only choose how much, or whether, to prune: a dense run of the same schedule differs from a
# pruned run in these alone. The first level matches on everything but the sparsity (so `pruning=channel` runs
# meet `pruning=channel pruning.sparsity=0`), the second also ignores the pruning group (`pruning=none`).
_SPARSITY_KEYS = ("pruning.sparsity",)
_PRUNING_KEYS = ("pruning.sparsity", "pruning")


@dataclass(frozen=True)
class Baseline:
    """The dense accuracy a run is compared with, and where it comes from.

    Args:
        accuracy: The dense test accuracy (a fraction).
        kind: ``"dense_runs"``: the mean final accuracy of the sweep's dense runs of the same schedule (``jobs``);
            ``"snapshot"``: the run's own dense model when pruning started (``dense_test_acc``, after ``epoch``
            epochs).
        jobs: The dense runs averaged, for ``"dense_runs"``.
        epoch: The epochs trained before the snapshot (None if the run's ``metrics.json`` does not say).

    Example:
        >>> Baseline(0.97, "snapshot", epoch=10).describe()
        'dense snapshot at the start of pruning (epoch 10)'
        >>> Baseline(0.97, "dense_runs", jobs=("0", "3")).describe()
        'mean of the dense runs of the same schedule (jobs 0, 3)'
    """

    accuracy: float
    kind: BaselineKind
    jobs: tuple[str, ...] = ()
    epoch: int | None = None

    def describe(self) -> str:
        """What the baseline is, in words, for tables and plot legends."""
        if self.kind == "dense_runs":
            if len(self.jobs) == 1:
                return f"dense run of the same schedule (job {self.jobs[0]})"
            return f"mean of the dense runs of the same schedule (jobs {', '.join(self.jobs)})"
        when = f"epoch {self.epoch}" if self.epoch is not None else "epoch not recorded"
        return f"dense snapshot at the start of pruning ({when})"


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if is_number(value) and not math.isnan(value) else None


def is_dense_run(run: RunResult) -> bool:
    """Whether ``run`` completed without pruning anything: ``target_sparsity`` 0 (``pruning.sparsity=0`` or
    ``pruning=none``), with a final accuracy to compare with.

    Example:
        >>> from lightning_prune.app.sweep import RunResult
        >>> is_dense_run(RunResult("0", [], "completed", {"target_sparsity": 0.0, "pruned_test_acc": 0.9}))
        True
    """
    return (
        run.status == "completed"
        and _number(run.metrics, "target_sparsity") == 0.0
        and _number(run.metrics, "pruned_test_acc") is not None
    )


def _key(run: RunResult, ignored: Sequence[str]) -> tuple[tuple[str, ...], Any]:
    """The run's overrides without the ``ignored`` keys (``+``/``++`` prefixes dropped), and its epochs."""
    kept = []
    for override in run.overrides:
        name = override.lstrip("+").split("=", 1)[0]
        if name not in ignored:
            kept.append(override.lstrip("+"))
    return tuple(sorted(kept)), run.metrics.get("epochs")


def snapshot_baseline(run: RunResult) -> Baseline | None:
    """The run's own dense snapshot (``dense_test_acc`` and ``dense_epoch``) as a baseline, or None without one.

    Example:
        >>> from lightning_prune.app.sweep import RunResult
        >>> snapshot_baseline(RunResult("0", [], "completed", {"dense_test_acc": 0.9, "dense_epoch": 10})).epoch
        10
    """
    accuracy = _number(run.metrics, "dense_test_acc")
    if accuracy is None:
        return None
    epoch = run.metrics.get("dense_epoch")
    return Baseline(accuracy, "snapshot", epoch=int(epoch) if is_number(epoch) else None)


def match_baselines(runs: Sequence[RunResult]) -> list[Baseline | None]:
    """The baseline of each run of ``runs`` (one sweep), in order.

    A run's baseline is the mean final test accuracy of the sweep's dense runs (:func:`is_dense_run`) whose
    overrides are the run's own but for ``pruning.sparsity`` (or, failing that, but for ``pruning.sparsity`` and
    the ``pruning`` group), and that trained as many epochs (``epochs`` in ``metrics.json``): so seeds,
    schedules and models are matched one for one. A run with no such dense run is compared with its own dense
    snapshot (``dense_test_acc``, taken when pruning started); a run with neither has no baseline (None).

    Example:
        >>> from lightning_prune.app.sweep import RunResult
        >>> runs = [RunResult(str(i), [f"pruning.sparsity={s}", f"seed={seed}"], "completed",
        ...                   {"target_sparsity": s, "pruned_test_acc": acc})
        ...         for i, (s, seed, acc) in enumerate([(0, 0, 0.97), (0, 1, 0.95), (0.9, 0, 0.96), (0.9, 1, 0.94)])]
        >>> [b.jobs for b in match_baselines(runs)]
        [('0',), ('1',), ('0',), ('1',)]
    """
    dense = [run for run in runs if is_dense_run(run)]
    levels = []
    for ignored in (_SPARSITY_KEYS, _PRUNING_KEYS):
        groups: dict[tuple[tuple[str, ...], Any], list[RunResult]] = {}
        for run in dense:
            groups.setdefault(_key(run, ignored), []).append(run)
        levels.append((ignored, groups))
    baselines: list[Baseline | None] = []
    for run in runs:
        matched = next((groups[k] for ignored, groups in levels if (k := _key(run, ignored)) in groups), None)
        if matched:
            accuracy = sum(float(r.metrics["pruned_test_acc"]) for r in matched) / len(matched)
            baselines.append(Baseline(accuracy, "dense_runs", jobs=tuple(r.job for r in matched)))
        else:
            baselines.append(snapshot_baseline(run))
    return baselines
