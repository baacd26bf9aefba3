"""Sweep results: one summary (CSV, markdown, plot) of every run under a Hydra sweep directory.

:func:`summarize_sweep` is a pure function of the sweep directory: it reads each run's ``metrics.json`` (written
by :func:`lightning_prune.app.train.train`) or ``failure.json`` (written by :class:`SweepSummaryCallback` when a run
raised) and writes ``results.csv``, ``results.md`` and ``accuracy_vs_sparsity.png`` next to them; the two tables
get a ``.sha256`` digest file beside them. Each run is compared with a dense model trained for the same schedule
when the sweep holds one (``-m pruning.sparsity=0,0.5,0.9``: see :mod:`lightning_prune.app.baselines`), else with
its dense snapshot from when pruning started, and the table and plot say which.
:class:`SweepSummaryCallback` is the Hydra callback that records failures and calls it when a multirun ends;
``python scripts/summarize.py <sweep_dir>`` rebuilds the same files later. :func:`search_objective` is the
value an Optuna search for the highest sparsity within an accuracy budget maximises
(``conf/hparams_search/optuna.yaml``).
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import logging
import math
import re
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from typing_extensions import override

from lightning_prune._files import atomic_write, atomic_write_text, verify_json_digest, write_sidecar
from lightning_prune._helpers import is_number
from lightning_prune.app.baselines import Baseline, match_baselines, snapshot_baseline
from lightning_prune.app.sweep_plots import accuracy_figure, perplexity_figure
from lightning_prune.app.sweep_tables import _write_markdown, is_language_sweep
from lightning_prune.app.sweep_tables import baseline_text as baseline_text  # the summary's names, importable here
from lightning_prune.app.sweep_tables import common_overrides as common_overrides
from lightning_prune.app.sweep_tables import results_table as results_table

log = logging.getLogger(__name__)


METRICS_FILE = "metrics.json"


FAILURE_FILE = "failure.json"


OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"


CSV_FILE = "results.csv"


MARKDOWN_FILE = "results.md"


PLOT_FILE = "accuracy_vs_sparsity.png"


_MAX_ERROR_CHARS = 500


Status = Literal["completed", "failed", "incomplete"]


# One row per run in results.csv, in this order. `accuracy_drop` is `baseline_test_acc - pruned_test_acc`;
# `baseline` says what the baseline is (dense runs of the same schedule, or the run's dense snapshot).
# Language-model runs (module=language) fill the perplexity columns instead of the accuracy ones (validation
# perplexity of the dense, pruned and compact models).
RESULT_COLUMNS = (
    "job",
    "overrides",
    "status",
    "dense_test_acc",
    "pruned_test_acc",
    "accuracy_drop",
    "dense_val_ppl",
    "pruned_val_ppl",
    "compact_val_ppl",
    "ppl_increase",
    "target_sparsity",
    "sparsity",
    "nonzero_params",
    "total_params",
    "compact_params",
    "macs",
    "dense_macs",
    "wall_time_s",
    "error",
    "baseline_test_acc",
    "baseline",
)


# The columns read from a run's metrics.json as they are; the others describe the run or are computed.
_METRIC_COLUMNS = tuple(
    c
    for c in RESULT_COLUMNS
    if c
    not in ("job", "overrides", "status", "accuracy_drop", "ppl_increase", "error", "baseline_test_acc", "baseline")
)


class SweepResultsError(FileNotFoundError):
    """A directory holds no run results to summarise."""


@dataclass(frozen=True)
class RunResult:
    """What one run of a sweep left in its job directory.

    Args:
        job: The job directory, relative to the sweep directory (``"."`` for the sweep directory itself).
        overrides: The run's task overrides, e.g. ``["pruning.sparsity=0.9"]``.
        status: ``"completed"`` (``metrics.json``), ``"failed"`` (``failure.json``, or a ``metrics.json`` whose
            ``status`` says so) or ``"incomplete"`` (neither: still running, killed or timed out).
        metrics: The run's ``metrics.json``; empty unless completed.
        error: One line, ``"<ExceptionType>: <message>"``, for a failed run.
        baseline: The dense accuracy the run is compared with (set by :func:`collect_runs`); None: the run's own
            dense snapshot (:attr:`dense_baseline`).

    Example:
        >>> RunResult(job="0", overrides=["pruning.sparsity=0.9"], status="incomplete").row()["status"]
        'incomplete'
    """

    job: str
    overrides: list[str]
    status: Status
    metrics: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""
    baseline: Baseline | None = None

    @property
    def dense_baseline(self) -> Baseline | None:
        """:attr:`baseline`, or the run's dense snapshot when none was matched; None when neither is known."""
        return self.baseline if self.baseline is not None else snapshot_baseline(self)

    @property
    def accuracy_drop(self) -> float | None:
        """Baseline (:attr:`dense_baseline`) minus pruned test accuracy, or None when either is missing."""
        baseline, pruned = self.dense_baseline, self.metrics.get("pruned_test_acc")
        if baseline is None or pruned is None:
            return None
        return baseline.accuracy - float(pruned)

    @property
    def ppl_increase(self) -> float | None:
        """Pruned over dense validation perplexity, minus 1 (0.05: 5% higher), or None when either is missing."""
        dense, pruned = self.metrics.get("dense_val_ppl"), self.metrics.get("pruned_val_ppl")
        if dense is None or pruned is None:
            return None
        return float(pruned) / float(dense) - 1.0

    def row(self) -> dict[str, Any]:
        """The run as a ``results.csv`` row: every key of :data:`RESULT_COLUMNS`, None where unknown."""
        row: dict[str, Any] = {key: self.metrics.get(key) for key in _METRIC_COLUMNS}
        baseline = self.dense_baseline if self.status == "completed" else None
        row.update(
            job=self.job,
            overrides=" ".join(self.overrides),
            status=self.status,
            accuracy_drop=self.accuracy_drop,
            ppl_increase=self.ppl_increase,
            error=self.error,
            baseline_test_acc=None if baseline is None else baseline.accuracy,
            baseline="" if baseline is None else baseline.describe(),
        )
        return {key: row[key] for key in RESULT_COLUMNS}


@dataclass(frozen=True)
class SweepSummary:
    """The runs of a sweep and the files :func:`summarize_sweep` wrote for them.

    Example:
        >>> SweepSummary(sweep_dir=Path("s"), runs=[], csv_path=Path("s/results.csv"),
        ...              markdown_path=Path("s/results.md"), plot_path=None).failed
        []
    """

    sweep_dir: Path
    runs: list[RunResult]
    csv_path: Path
    markdown_path: Path
    plot_path: Path | None

    @property
    def completed(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "completed"]

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "failed"]


def search_objective(metrics: Mapping[str, Any], max_drop: float | None) -> float:
    """The value an Optuna search for the highest sparsity within an accuracy budget maximises.

    A run is feasible when its pruned test accuracy is at most ``max_drop`` below its dense one (its own
    ``dense_test_acc``: one run cannot see the sweep's dense runs); its value is
    then its achieved sparsity, in [0, 1]. An infeasible run scores minus the excess drop, below every feasible
    run and the higher the closer it came to the budget, so the sampler still learns from it.

    Args:
        metrics: A run's ``metrics.json``: needs ``dense_test_acc``, ``pruned_test_acc`` and ``sparsity``.
        max_drop: The largest allowed accuracy drop, a fraction (0.01 is one percentage point).

    Returns:
        The achieved sparsity if the drop is within ``max_drop``, else ``-(drop - max_drop)``.

    Example:
        >>> search_objective({"dense_test_acc": 0.98, "pruned_test_acc": 0.975, "sparsity": 0.9}, 0.01)
        0.9
        >>> round(search_objective({"dense_test_acc": 0.98, "pruned_test_acc": 0.95, "sparsity": 0.95}, 0.01), 4)
        -0.02
    """
    if not is_number(max_drop) or not 0.0 <= max_drop <= 1.0:
        raise ValueError(
            f"`max_drop` must be a number in [0, 1], got {max_drop!r}. Set `max_accuracy_drop` in the config "
            "(e.g. `max_accuracy_drop: 0.01` for one percentage point)."
        )
    values = {}
    for key in ("dense_test_acc", "pruned_test_acc", "sparsity"):
        value = metrics.get(key)
        if not is_number(value) or math.isnan(value):
            raise ValueError(f"`metrics[{key!r}]` must be a number, got {value!r}.")
        values[key] = float(value)
    excess = values["dense_test_acc"] - values["pruned_test_acc"] - float(max_drop)
    # A float tolerance: a drop of exactly max_drop (e.g. 0.98 - 0.97 vs 0.01) is within the budget.
    return values["sparsity"] if excess <= 1e-12 else -excess


def failure_record(error: BaseException) -> dict[str, str]:
    """The ``failure.json`` content for a run that raised ``error``.

    Example:
        >>> failure_record(ValueError("bad"))["error"]
        'ValueError: bad'
    """
    # One line: Hydra's InstantiationException, for one, puts the cause on the lines after the first.
    message = _one_line(error)
    return {
        "status": "failed",
        "error": f"{type(error).__name__}: {message}" if message else type(error).__name__,
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    }


def _one_line(text: object) -> str:
    message = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."


def _natural_key(path: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path)]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories under ``sweep_dir`` (itself included) that a Hydra job wrote to."""
    markers = (METRICS_FILE, FAILURE_FILE, OVERRIDES_FILE.as_posix())
    found = {p.parent for marker in markers[:2] for p in sweep_dir.rglob(marker)}
    found |= {p.parent.parent for p in sweep_dir.rglob(markers[2])}
    # Lightning and other tools may write files named like ours deeper inside a job directory: keep the outermost.
    jobs = [d for d in found if not any(other != d and other in d.parents for other in found)]
    return sorted(jobs, key=lambda d: _natural_key(d.relative_to(sweep_dir).as_posix()))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SweepResultsError(f"Could not read `{path}`: {e}") from e
    if not isinstance(data, dict):
        raise SweepResultsError(f"`{path}` must hold a JSON object, got {type(data).__name__}.")
    try:
        verify_json_digest(data, path)
    except ValueError as e:
        raise SweepResultsError(str(e)) from e
    data.pop("digest", None)
    return data


def _read_run(sweep_dir: Path, job_dir: Path) -> RunResult:
    job = job_dir.relative_to(sweep_dir).as_posix()
    metrics_path, failure_path = job_dir / METRICS_FILE, job_dir / FAILURE_FILE
    overrides: list[str] = []
    if (job_dir / OVERRIDES_FILE).is_file():
        overrides = [str(o) for o in yaml.safe_load((job_dir / OVERRIDES_FILE).read_text()) or []]
    # A rerun into the same directory leaves both files: the newer one describes the last attempt.
    failed = failure_path.is_file() and (
        not metrics_path.is_file() or failure_path.stat().st_mtime >= metrics_path.stat().st_mtime
    )
    if failed:
        record = _read_json(failure_path)
        return RunResult(job, overrides, "failed", error=_one_line(record.get("error") or "unknown error"))
    if not metrics_path.is_file():
        return RunResult(job, overrides, "incomplete")
    metrics = _read_json(metrics_path)
    overrides = [str(o) for o in metrics.get("overrides", overrides)]
    status = str(metrics.get("status", "completed")).lower()
    if status not in ("completed", "ok", "success", "succeeded"):
        return RunResult(
            job, overrides, "failed", metrics, error=_one_line(metrics.get("error") or f"status {status!r}")
        )
    return RunResult(job, overrides, "completed", metrics)


def collect_runs(sweep_dir: str | Path) -> list[RunResult]:
    """Every run under ``sweep_dir``, in job order (``0, 1, ..., 10``), each with its baseline
    (:func:`~lightning_prune.app.baselines.match_baselines`).

    A job directory is one holding ``metrics.json``, ``failure.json`` or ``.hydra/overrides.yaml``.

    Raises:
        SweepResultsError: ``sweep_dir`` is missing, or holds no job directory.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepResultsError(f"Sweep directory `{sweep_dir}` does not exist.")
    runs = [_read_run(sweep_dir, job_dir) for job_dir in _job_dirs(sweep_dir)]
    if not runs:
        raise SweepResultsError(
            f"No run results in `{sweep_dir}`: expected job directories (e.g. `{sweep_dir / '0'}`) holding "
            f"`{METRICS_FILE}` (written by train()), `{FAILURE_FILE}` (written by SweepSummaryCallback for a "
            f"failed run) or `{OVERRIDES_FILE.as_posix()}` (written by Hydra). Is this the directory of a "
            "`python scripts/train.py -m ...` sweep (hydra.sweep.dir)?"
        )
    return [replace(run, baseline=baseline) for run, baseline in zip(runs, match_baselines(runs), strict=True)]


def _write_csv(runs: Sequence[RunResult], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=RESULT_COLUMNS)
    writer.writeheader()
    for run in runs:
        writer.writerow({k: "" if v is None else v for k, v in run.row().items()})
    atomic_write_text(path, text.getvalue())
    write_sidecar(path)


def _plot(runs: Sequence[RunResult], path: Path, max_drop: float | None) -> None:
    image = io.BytesIO()
    figure = perplexity_figure(runs) if is_language_sweep(runs) else accuracy_figure(runs, max_drop)
    figure.savefig(image, dpi=120, format="png")
    atomic_write(path, image.getbuffer())


def summarize_sweep(
    sweep_dir: str | Path, *, max_accuracy_drop: float | None = None, plot: bool = True
) -> SweepSummary:
    """Write ``results.csv``, ``results.md`` and ``accuracy_vs_sparsity.png`` for the runs under ``sweep_dir``.

    Completed runs come from their ``metrics.json``; a run that raised is listed as failed with its error (from
    ``failure.json``), and a job directory with neither file as incomplete. Each run is compared with the dense
    runs of the same schedule in the sweep (``pruning.sparsity=0``, matched per seed), or, without any, with its
    dense snapshot from when pruning started; ``results.md`` and the plot say which. The plot shows the pruned
    test accuracy of the completed runs against their achieved sparsity, with the baseline as a dashed line
    (:func:`accuracy_figure`); for language-model runs (:func:`is_language_sweep`) the table and the plot show
    validation perplexity instead (:func:`perplexity_figure`). ``results.csv`` and ``results.md`` are written
    atomically, each with a ``<name>.sha256`` file beside it holding the SHA-256 of its bytes, as exports have.

    Args:
        sweep_dir: A Hydra sweep directory (``hydra.sweep.dir``), or a single run's directory.
        max_accuracy_drop: If given, ``results.md`` names the highest sparsity within this drop and the plot
            marks the bound.
        plot: Whether to write the PNG (needs matplotlib).

    Returns:
        The runs and the paths written.

    Raises:
        SweepResultsError: ``sweep_dir`` is missing or holds no run results.

    Example:
        >>> summary = summarize_sweep("multirun/train/2024-01-01_00-00-00")  # doctest: +SKIP
        >>> [run.status for run in summary.runs]  # doctest: +SKIP
        ['completed', 'completed', 'failed']
    """
    sweep_dir = Path(sweep_dir)
    runs = collect_runs(sweep_dir)
    plot_path = sweep_dir / PLOT_FILE if plot else None
    if plot_path is not None:
        _plot(runs, plot_path, max_accuracy_drop)
    csv_path, markdown_path = sweep_dir / CSV_FILE, sweep_dir / MARKDOWN_FILE
    _write_csv(runs, csv_path)
    _write_markdown(runs, markdown_path, sweep_dir, plot_path, max_accuracy_drop)
    return SweepSummary(sweep_dir, runs, csv_path, markdown_path, plot_path)


class SweepSummaryCallback(Callback):
    """Hydra callback: records failed runs and summarises the sweep when a multirun ends.

    ``on_job_end`` writes ``failure.json`` (error and traceback) into the directory of a job that raised; it runs
    where the job runs, so it works with every launcher. ``on_multirun_end`` calls :func:`summarize_sweep` on
    ``hydra.sweep.dir``. Hydra's basic sweeper re-raises a failed job's exception once its batch is done, and
    then never calls ``on_multirun_end``: for that case the callback also summarises when the process exits.

    Enable it with ``hydra.callbacks`` (see ``conf/hydra/callbacks/summary.yaml``)::

        hydra:
          callbacks:
            summary:
              _target_: lightning_prune.app.sweep.SweepSummaryCallback

    Args:
        plot: Whether to write the accuracy-against-sparsity PNG.
        max_accuracy_drop: Passed to :func:`summarize_sweep`; when None, the composed config's top-level
            ``max_accuracy_drop`` (set by ``hparams_search=optuna``) is used if present.

    Example:
        >>> callback = SweepSummaryCallback(plot=False)
        >>> callback.plot
        False
    """

    def __init__(self, plot: bool = True, max_accuracy_drop: float | None = None) -> None:
        if not isinstance(plot, bool):
            raise TypeError(f"`plot` must be a bool, got {plot!r}.")
        if max_accuracy_drop is not None and (not is_number(max_accuracy_drop) or not 0.0 <= max_accuracy_drop <= 1.0):
            raise ValueError(f"`max_accuracy_drop` must be None or a number in [0, 1], got {max_accuracy_drop!r}.")
        self.plot = plot
        self.max_accuracy_drop = max_accuracy_drop
        self._pending: Path | None = None
        self._pending_drop: float | None = None

    @override
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        job_dir = Path(config.hydra.runtime.output_dir)
        failure_path = job_dir / FAILURE_FILE
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # `.return_value` re-raises a failed job's exception
            record = failure_record(error) if isinstance(error, BaseException) else {"error": repr(error)}
            record["status"] = "failed"
            atomic_write_text(
                failure_path, json.dumps({**record, "overrides": list(job_return.overrides or [])}, indent=2)
            )
            log.error(f"Job {job_dir} failed: {record['error']} (recorded in {failure_path})")
        elif job_return.status == JobStatus.COMPLETED:
            failure_path.unlink(missing_ok=True)  # left by an earlier attempt in the same directory

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._pending = Path(config.hydra.sweep.dir)
        self._pending_drop = self._max_drop(config)
        atexit.register(self._summarize_at_exit)

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self._summarize_at_exit)
        self._pending = None
        summary = summarize_sweep(config.hydra.sweep.dir, max_accuracy_drop=self._max_drop(config), plot=self.plot)
        self._report(summary)

    def _max_drop(self, config: DictConfig) -> float | None:
        if self.max_accuracy_drop is not None:
            return self.max_accuracy_drop
        value = config.get("max_accuracy_drop")
        return float(value) if is_number(value) else None

    def _summarize_at_exit(self) -> None:
        sweep_dir, self._pending = self._pending, None
        if sweep_dir is None:
            return
        try:
            summary = summarize_sweep(sweep_dir, max_accuracy_drop=self._pending_drop, plot=self.plot)
        except Exception as e:  # the process is exiting: report, never raise
            log.error(f"The sweep ended early and its summary could not be written: {e}")
            return
        self._report(summary)

    @staticmethod
    def _report(summary: SweepSummary) -> None:
        failed = f", {len(summary.failed)} failed" if summary.failed else ""
        log.info(
            f"Sweep summary: {len(summary.completed)}/{len(summary.runs)} runs completed{failed}. "
            f"Results in {summary.csv_path} and {summary.markdown_path}"
            + (f"; plot in {summary.plot_path}" if summary.plot_path else "")
        )
