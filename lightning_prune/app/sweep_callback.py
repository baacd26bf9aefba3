"""The Hydra callback of sweeps: records each failed run and writes the sweep's summary when the multirun ends.

The summary itself is :func:`lightning_prune.app.sweep.summarize_sweep`, a pure function of the sweep directory; this
callback only calls it at the right moments and writes ``failure.json``
(:func:`~lightning_prune.app.sweep.failure_record`) where a job raised.
"""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from typing_extensions import override

from lightning_prune._files import atomic_write_text
from lightning_prune._helpers import is_number
from lightning_prune.app.sweep import FAILURE_FILE, SweepSummary, failure_record, summarize_sweep

__all__ = ["SweepSummaryCallback"]

log = logging.getLogger(__name__)


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
              _target_: lightning_prune.app.sweep_callback.SweepSummaryCallback

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
