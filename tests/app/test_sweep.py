import csv
import errno
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _checks import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_prune import _files
from lightning_prune._files import ArtifactWriteError, file_digest, verify_sidecar
from lightning_prune.app.sweep import (
    RESULT_COLUMNS,
    RunResult,
    SweepResultsError,
    SweepSummaryCallback,
    accuracy_figure,
    collect_runs,
    common_overrides,
    failure_record,
    results_table,
    search_objective,
    summarize_sweep,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A tiny version of the main job: about a second of training per run.
TINY = [
    "trainer.max_epochs=2",
    "pruning.start_epoch=0",
    "pruning.end_epoch=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_checkpointing=false",
    "model.channels=[8,16]",
    "model.hidden=32",
]


def _metrics(sparsity: float, pruned: float, dense: float = 0.97, **extra) -> dict:
    return {
        "dense_test_acc": dense,
        "pruned_test_acc": pruned,
        "target_sparsity": sparsity,
        "sparsity": sparsity,
        "layer_sparsity": {"fc": sparsity},
        "nonzero_params": round(1000 * (1 - sparsity)),
        "total_params": 1000,
        "wall_time_s": 1.5,
        "overrides": [f"pruning.sparsity={sparsity}", "seed=0"],
        **extra,
    }


def _job(sweep: Path, name: str, overrides: list[str], metrics: dict | None = None, error: str | None = None) -> Path:
    """A job directory as Hydra, train() and the callback leave it."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (job / "failure.json").write_text(json.dumps({"status": "failed", "error": error, "traceback": "..."}))
    return job


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Three completed runs, one failed, one that never finished; job 10 sorts after job 2."""
    sweep = tmp_path / "sweep"
    for name, sparsity, acc in (("0", 0.5, 0.97), ("1", 0.8, 0.965), ("10", 0.95, 0.90)):
        _job(sweep, name, [f"pruning.sparsity={sparsity}", "seed=0"], metrics=_metrics(sparsity, acc))
    _job(sweep, "2", ["pruning.sparsity=1.5", "seed=0"], error="ValueError: `sparsity` must be in [0, 1), got 1.5.")
    _job(sweep, "3", ["pruning.sparsity=0.9", "seed=0"])
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ the summary


def test_summary_has_one_row_per_run_in_job_order(sweep):
    summary = summarize_sweep(sweep)
    rows = _read_csv(sweep / "results.csv")
    assert summary.csv_path == sweep / "results.csv"
    assert list(rows[0]) == list(RESULT_COLUMNS)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "10"]
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "incomplete", "completed"]
    first = rows[0]
    assert first["overrides"] == "pruning.sparsity=0.5 seed=0"
    assert float(first["dense_test_acc"]) == 0.97 and float(first["pruned_test_acc"]) == 0.97
    assert float(first["sparsity"]) == 0.5 and int(first["nonzero_params"]) == 500
    assert float(first["wall_time_s"]) == 1.5
    assert float(rows[4]["accuracy_drop"]) == pytest.approx(0.07)
    assert first["macs"] == ""  # not in these metrics.json files


def test_failed_run_is_reported_with_its_error(sweep):
    summary = summarize_sweep(sweep)
    failed = _read_csv(sweep / "results.csv")[2]
    assert failed["status"] == "failed" and failed["overrides"] == "pruning.sparsity=1.5 seed=0"
    assert failed["error"] == "ValueError: `sparsity` must be in [0, 1), got 1.5."
    assert failed["pruned_test_acc"] == ""
    assert [r.job for r in summary.failed] == ["2"]
    markdown = (sweep / "results.md").read_text()
    assert "## Failed runs" in markdown
    assert "- job 2 (`pruning.sparsity=1.5 seed=0`): ValueError: `sparsity` must be in [0, 1), got 1.5." in markdown


def test_markdown_has_a_table_of_the_runs_and_links_the_plot(sweep):
    summarize_sweep(sweep, max_accuracy_drop=0.01)
    lines = (sweep / "results.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 5  # header, separator, one row per run
    assert [c.strip() for c in table[0].strip("|").split("|")][:6] == [
        "job",
        "overrides",
        "status",
        "baseline acc",
        "pruned acc",
        "drop",
    ]
    # seed=0 is common to every run: stated once above the table, not repeated in it.
    assert table[2].startswith("| 0   | pruning.sparsity=0.5  | completed  | 0.9700       | 0.9700     | +0.00 pp |")
    assert "Overrides of every run (left out of the table): `seed=0`." in lines
    assert "Highest sparsity within a drop of 1.00 pp: 0.8000 (job 1)." in lines
    assert "![accuracy against sparsity](accuracy_vs_sparsity.png)" in lines
    # No dense run in the sweep: the baseline is each run's snapshot, and the summary says so.
    assert (
        "Baseline: dense snapshot at the start of pruning (epoch not recorded), not a dense model trained for the "
        "same schedule; add dense runs to the sweep (`-m pruning.sparsity=0,...`) to compare with one." in lines
    )


def test_plot_is_a_valid_png(sweep):
    summary = summarize_sweep(sweep)
    data = summary.plot_path.read_bytes()
    assert summary.plot_path == sweep / "accuracy_vs_sparsity.png"
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (720, 480)  # 6 x 4 inches at 120 dpi
    from matplotlib.image import imread

    assert imread(summary.plot_path).shape[:2] == (480, 720)


def test_no_plot_skips_the_png(sweep):
    summary = summarize_sweep(sweep, plot=False)
    assert summary.plot_path is None and not (sweep / "accuracy_vs_sparsity.png").exists()
    assert "accuracy_vs_sparsity.png" not in (sweep / "results.md").read_text()


def test_missing_or_empty_sweep_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SweepResultsError, match=r"Sweep directory `.*nowhere` does not exist"):
        summarize_sweep(tmp_path / "nowhere")
    (tmp_path / "empty" / "logs").mkdir(parents=True)
    with pytest.raises(
        SweepResultsError, match=r"No run results in `.*empty`: expected job directories .*metrics\.json"
    ):
        summarize_sweep(tmp_path / "empty")
    assert not (tmp_path / "empty" / "results.csv").exists()


def test_unreadable_metrics_name_the_file(tmp_path):
    job = _job(tmp_path, "0", ["seed=0"])
    (job / "metrics.json").write_text("{not json")
    with pytest.raises(SweepResultsError, match=r"Could not read `.*0/metrics\.json`"):
        collect_runs(tmp_path)


def test_the_newer_of_failure_and_metrics_decides_a_rerun(tmp_path):
    job = _job(tmp_path, "0", ["seed=0"], metrics=_metrics(0.5, 0.9), error="RuntimeError: boom")
    os.utime(job / "metrics.json", (time.time() - 60, time.time() - 60))
    assert collect_runs(tmp_path)[0].status == "failed"
    os.utime(job / "failure.json", (time.time() - 120, time.time() - 120))
    assert collect_runs(tmp_path)[0].status == "completed"


def test_metrics_with_a_failed_status_count_as_failed(tmp_path):
    _job(tmp_path, "0", ["seed=0"], metrics=_metrics(0.5, 0.9, status="completed", macs=2_000_000))
    _job(tmp_path, "1", ["seed=1"], metrics={"status": "failed", "error": "RuntimeError: diverged"})
    first, second = collect_runs(tmp_path)
    assert first.status == "completed" and first.row()["macs"] == 2_000_000
    assert second.status == "failed" and second.error == "RuntimeError: diverged"


def test_nested_job_dirs_and_files_deeper_inside_a_job(tmp_path):
    _job(tmp_path, "sparsity=0.5/seed=0", ["pruning.sparsity=0.5"], metrics=_metrics(0.5, 0.9))
    deeper = tmp_path / "sparsity=0.5" / "seed=0" / "csv" / "version_0"
    deeper.mkdir(parents=True)
    (deeper / "metrics.json").write_text("{}")  # not a job of its own
    assert [r.job for r in collect_runs(tmp_path)] == ["sparsity=0.5/seed=0"]


def test_results_table_and_common_overrides():
    runs = [
        RunResult("0", ["a=1", "b=2"], "completed", _metrics(0.5, 0.9)),
        RunResult("1", ["a=1", "b=3"], "failed", error="E: x"),
    ]
    assert common_overrides(runs) == ["a=1"]
    table = results_table(runs).splitlines()
    assert table[2].startswith("| 0   | b=2       | completed | 0.9700")
    assert table[3].startswith("| 1   | b=3       | failed    |")


def test_failure_record_keeps_the_cause_on_one_line():
    try:
        raise ValueError("Error in call to target 'X':\nMisconfigurationException('bad `sparsity`')")
    except ValueError as e:
        record = failure_record(e)
    assert record["error"] == "ValueError: Error in call to target 'X': MisconfigurationException('bad `sparsity`')"
    assert record["traceback"].startswith("Traceback") and "test_failure_record" in record["traceback"]
    assert failure_record(KeyboardInterrupt())["error"] == "KeyboardInterrupt"


# ------------------------------------------------------------------------------------------------ baselines


def _schedule_sweep(sweep: Path, dense_overrides: str = "pruning.sparsity=0") -> Path:
    """Sparsities 0 (or `dense_overrides`) and 0.9 at seeds 0 and 1, 30 epochs, pruning from epoch 10: the pruned
    runs beat their dense snapshots (0.90, 0.92) but not the dense runs of the same schedule (0.97, 0.95)."""
    for i, (seed, dense, pruned) in enumerate([(0, 0.97, 0.96), (1, 0.95, 0.93)]):
        common = {"epochs": 30, "seed": seed}
        overrides = [dense_overrides, f"seed={seed}"]
        metrics = _metrics(0.0, dense, dense=dense, dense_epoch=30, overrides=overrides, **common)
        _job(sweep, str(2 * i), overrides, metrics=metrics)
        overrides = ["pruning.sparsity=0.9", f"seed={seed}"]
        metrics = _metrics(0.9, pruned, dense=0.9 + 0.02 * seed, dense_epoch=10, overrides=overrides, **common)
        _job(sweep, str(2 * i + 1), overrides, metrics=metrics)
    return sweep


def test_dense_runs_of_the_same_schedule_are_the_baseline_matched_per_seed(tmp_path):
    sweep = _schedule_sweep(tmp_path / "sweep")
    summarize_sweep(sweep, max_accuracy_drop=0.015)
    rows = _read_csv(sweep / "results.csv")
    assert [r["baseline"] for r in rows] == [
        "dense run of the same schedule (job 0)",
        "dense run of the same schedule (job 0)",
        "dense run of the same schedule (job 2)",
        "dense run of the same schedule (job 2)",
    ]
    assert [float(r["baseline_test_acc"]) for r in rows] == [0.97, 0.97, 0.95, 0.95]
    assert [float(r["accuracy_drop"]) for r in rows] == pytest.approx([0.0, 0.01, 0.0, 0.02])
    assert [float(r["dense_test_acc"]) for r in rows] == [0.97, 0.9, 0.95, 0.92]  # metrics.json's, kept
    lines = (sweep / "results.md").read_text().splitlines()
    assert (
        "Baselines: dense run of the same schedule (job 0) for jobs 0, 1; "
        "dense run of the same schedule (job 2) for jobs 2, 3." in lines
    )
    assert "Highest sparsity within a drop of 1.50 pp: 0.9000 (job 1)." in lines  # job 3 drops 2 pp
    assert any(line.startswith("| 3   | pruning.sparsity=0.9 seed=1 | completed | 0.9500") for line in lines)


def test_pruning_none_runs_are_dense_baselines_and_other_schedules_are_not(tmp_path):
    sweep = _schedule_sweep(tmp_path / "sweep", dense_overrides="pruning=none")
    assert [r.baseline.jobs for r in collect_runs(sweep)] == [("0",), ("0",), ("2",), ("2",)]
    # A dense run trained for fewer epochs is another schedule: the pruned runs keep their snapshots.
    for job in ("0", "2"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        (sweep / job / "metrics.json").write_text(json.dumps({**metrics, "epochs": 20}))
    assert [r.baseline.describe() for r in collect_runs(sweep)][1::2] == [
        "dense snapshot at the start of pruning (epoch 10)"
    ] * 2


def _legend_and_title(figure) -> tuple[list[str], str]:
    ax = figure.axes[0]
    return [t.get_text() for t in ax.get_legend().get_texts()], ax.get_title()


def test_plot_names_the_baseline_it_shows(tmp_path):
    sweep = _schedule_sweep(tmp_path / "sweep")
    legend, title = _legend_and_title(accuracy_figure(collect_runs(sweep), max_drop=0.01))
    assert legend == ["pruned", "dense, same schedule (mean of 2 runs)", "baseline - 1.00 pp"]
    assert title == "Test accuracy against sparsity\nbaseline: dense runs of the same schedule"
    for job in ("0", "2"):
        (sweep / job / "metrics.json").unlink()
        (sweep / job / ".hydra" / "overrides.yaml").unlink()
    legend, title = _legend_and_title(accuracy_figure(collect_runs(sweep)))
    assert legend == ["pruned", "dense snapshot at the start of pruning (epoch 10, mean of 2 runs)"]
    assert title == (
        "Test accuracy against sparsity\nbaseline: dense snapshot at the start of pruning (epoch 10), not the same "
        "schedule"
    )


# --------------------------------------------------------------------------------------------- table digests


def test_tables_are_written_with_a_digest_beside_them(sweep):
    summarize_sweep(sweep, plot=False)
    for name in ("results.csv", "results.md"):
        path = sweep / name
        assert (sweep / f"{name}.sha256").read_text() == f"{file_digest(path)}  {name}\n"
        assert verify_sidecar(path) is True
    (sweep / "results.md").write_text("edited")
    with pytest.raises(ValueError, match=r"results\.md' is damaged: its bytes do not match the digest"):
        verify_sidecar(sweep / "results.md")


def test_a_failing_write_leaves_the_previous_tables(sweep, monkeypatch):
    summarize_sweep(sweep, plot=False)
    before = {p.name: p.read_bytes() for p in sweep.glob("results.*")}
    _job(sweep, "4", ["pruning.sparsity=0.7", "seed=0"], metrics=_metrics(0.7, 0.96))

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_files, "_os_write", disk_full)
    with pytest.raises(ArtifactWriteError, match=r"results\.csv'.*the disk is full"):
        summarize_sweep(sweep, plot=False)
    assert {p.name: p.read_bytes() for p in sweep.glob("results.*")} == before
    assert not list(sweep.glob(".results*"))  # no temporary file left


# ------------------------------------------------------------------------------------------ the search objective


def test_search_objective_is_the_sparsity_within_the_budget():
    assert search_objective(_metrics(0.9, pruned=0.965, dense=0.97), 0.01) == 0.9
    assert search_objective(_metrics(0.9, pruned=0.96, dense=0.97), 0.01) == 0.9  # exactly at the bound
    assert search_objective(_metrics(0.5, pruned=0.99, dense=0.97), 0.0) == 0.5  # pruned beats dense


def test_search_objective_ranks_every_feasible_run_above_every_infeasible_one():
    feasible = search_objective(_metrics(0.0, pruned=0.97), 0.01)
    slightly_over = search_objective(_metrics(0.99, pruned=0.955), 0.01)
    far_over = search_objective(_metrics(0.99, pruned=0.5), 0.01)
    assert feasible > slightly_over > far_over
    assert slightly_over == pytest.approx(-0.005)


@pytest.mark.parametrize("max_drop", [None, -0.1, 1.5, True, "0.01"])
def test_search_objective_rejects_a_bad_bound(max_drop):
    with pytest.raises(ValueError, match=r"`max_drop` must be a number in \[0, 1\], got .*max_accuracy_drop"):
        search_objective(_metrics(0.9, 0.96), max_drop)


def test_search_objective_rejects_missing_metrics():
    with pytest.raises(ValueError, match=r"`metrics\['pruned_test_acc'\]` must be a number, got None"):
        search_objective({"dense_test_acc": 0.9, "sparsity": 0.5}, 0.01)
    with pytest.raises(ValueError, match=r"`metrics\['sparsity'\]` must be a number, got nan"):
        search_objective({"dense_test_acc": 0.9, "pruned_test_acc": 0.9, "sparsity": float("nan")}, 0.01)


# ------------------------------------------------------------------------------------------------ the callback


def _hydra_config(job_dir: Path, sweep_dir: Path | None = None, **top):
    return OmegaConf.create(
        {"hydra": {"runtime": {"output_dir": str(job_dir)}, "sweep": {"dir": str(sweep_dir or job_dir.parent)}}, **top}
    )


def test_callback_records_a_failed_job_and_clears_it_on_success(tmp_path):
    job_dir = _job(tmp_path, "0", ["pruning.sparsity=1.5"])
    callback = SweepSummaryCallback()
    try:
        raise ValueError("`sparsity` must be in [0, 1), got 1.5.")
    except ValueError as e:
        failed = JobReturn(overrides=["pruning.sparsity=1.5"], status=JobStatus.FAILED, _return_value=e)
    callback.on_job_end(_hydra_config(job_dir), failed)
    record = json.loads((job_dir / "failure.json").read_text())
    assert record["status"] == "failed" and record["overrides"] == ["pruning.sparsity=1.5"]
    assert record["error"] == "ValueError: `sparsity` must be in [0, 1), got 1.5."
    assert "Traceback" in record["traceback"]
    assert collect_runs(tmp_path)[0].status == "failed"

    callback.on_job_end(_hydra_config(job_dir), JobReturn(status=JobStatus.COMPLETED, _return_value=0.9))
    assert not (job_dir / "failure.json").exists()


def test_callback_summarises_when_the_multirun_ends(sweep):
    callback = SweepSummaryCallback(plot=False)
    config = _hydra_config(sweep / "0", sweep, max_accuracy_drop=0.01)
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    assert len(_read_csv(sweep / "results.csv")) == 5
    assert "Highest sparsity within a drop of 1.00 pp" in (sweep / "results.md").read_text()
    assert not (sweep / "accuracy_vs_sparsity.png").exists()


def test_callback_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"`plot` must be a bool, got 'yes'"):
        SweepSummaryCallback(plot="yes")
    with pytest.raises(ValueError, match=r"`max_accuracy_drop` must be None or a number in \[0, 1\], got 2"):
        SweepSummaryCallback(max_accuracy_drop=2)


# ----------------------------------------------------------------------------------------------------- configs


def _compose_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    ("option", "target", "settings"),
    [
        ("parallel", "hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {"n_jobs": 2}),
        ("slurm", "hydra_submitit_launcher.submitit_launcher.SlurmLauncher", {"partition": None, "max_num_timeout": 0}),
        ("slurm_local", "hydra_submitit_launcher.submitit_launcher.LocalLauncher", {"cpus_per_task": 1}),
    ],
)
def test_launcher_configs_compose_on_the_plugins_schemas(option, target, settings):
    launcher = _compose_hydra([f"hydra/launcher={option}"]).hydra.launcher
    assert launcher._target_ == f"hydra_plugins.{target}"
    assert {key: launcher[key] for key in settings} == settings
    assert sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")) == ["parallel", "slurm", "slurm_local"]


def test_summary_callback_config_instantiates():
    callbacks = _compose_hydra(["hydra/callbacks=summary"]).hydra.callbacks
    callback = instantiate(callbacks.summary)
    assert isinstance(callback, SweepSummaryCallback) and callback.plot and callback.max_accuracy_drop is None


def test_optuna_config_searches_sparsity_for_the_highest_within_the_drop():
    cfg = _compose_hydra(["hparams_search=optuna"])
    assert cfg.objective == "max_sparsity" and cfg.max_accuracy_drop == 0.01
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.sampler.seed == cfg.seed
    assert sweeper.params == {"pruning.sparsity": "interval(0.5, 0.99)"}
    assert cfg.hydra.mode == RunMode.MULTIRUN  # no -m needed


# ------------------------------------------------------------------------------------------- end to end, Hydra


def _train(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *args, *TINY, "hydra/callbacks=summary"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_multirun_writes_the_summary_and_records_a_failed_run(tmp_path):
    # Sparsity 0 is the dense run of the same schedule: same epochs, same callbacks, no weight removed. Hydra's basic
    # sweeper re-raises the failure of job 2 once every job has run: the exit status says so, and the summary is
    # written all the same.
    sweep = tmp_path / "sweep"
    result = _train(tmp_path, "-m", "pruning.sparsity=0,0.8,1.5", f"hydra.sweep.dir={sweep}", check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    rows = _read_csv(sweep / "results.csv")
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    assert "sparsity" in rows[2]["error"] and "1.5" in rows[2]["error"]
    assert json.loads((sweep / "2" / "failure.json").read_text())["status"] == "failed"
    rows = rows[:2]
    assert [float(r["target_sparsity"]) for r in rows] == [0.0, 0.8]
    assert [float(r["sparsity"]) for r in rows] == pytest.approx([0.0, 0.8], abs=0.01)
    assert all(r["overrides"].startswith(f"pruning.sparsity={s}") for r, s in zip(rows, ("0", "0.8")))
    assert int(rows[1]["nonzero_params"]) < int(rows[0]["nonzero_params"]) == int(rows[0]["total_params"])
    metrics = [json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")]
    assert [(m["epochs"], m["dense_epoch"]) for m in metrics] == [(2, 0), (2, 0)]
    assert rows[1]["baseline"] == "dense run of the same schedule (job 0)"
    assert float(rows[1]["baseline_test_acc"]) == metrics[0]["pruned_test_acc"]
    assert float(rows[1]["accuracy_drop"]) == pytest.approx(
        metrics[0]["pruned_test_acc"] - metrics[1]["pruned_test_acc"]
    )
    assert (sweep / "accuracy_vs_sparsity.png").read_bytes()[:8] == PNG_SIGNATURE
    markdown = (sweep / "results.md").read_text()
    assert "| 1   | pruning.sparsity=0.8 | completed |" in markdown
    assert "Baseline: dense run of the same schedule (job 0)." in markdown


def _summarize_script():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "scripts" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summarize_script_rebuilds_the_summary(sweep, capsys):
    assert _summarize_script().main([str(sweep), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| 10  | pruning.sparsity=0.95" in out
    assert "job 2 failed: ValueError" in out and "3/5 runs completed" in out
    assert len(_read_csv(sweep / "results.csv")) == 5
    assert not (sweep / "accuracy_vs_sparsity.png").exists()


def test_summarize_script_names_a_directory_without_results(tmp_path, capsys):
    assert _summarize_script().main([str(tmp_path)]) == 2  # the script's exit status
    assert capsys.readouterr().err.startswith(f"error: No run results in `{tmp_path}`: expected job directories")


@pytest.mark.slow
def test_parallel_launcher_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = _train(tmp_path, "-m", "hydra/launcher=parallel", "pruning.sparsity=0.5,0.8", f"hydra.sweep.dir={sweep}")
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert [r["status"] for r in _read_csv(sweep / "results.csv")] == ["completed", "completed"]


@pytest.mark.slow
def test_submitit_local_launcher_records_a_failure(tmp_path):
    sweep = tmp_path / "sweep"
    result = _train(
        tmp_path,
        "-m",
        "hydra/launcher=slurm_local",
        "pruning.sparsity=0.5,1.5",
        f"hydra.sweep.dir={sweep}",
        check=False,
    )
    assert result.returncode == 1
    assert (sweep / ".submitit").is_dir()
    rows = _read_csv(sweep / "results.csv")
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert "pruning.sparsity=1.5" in rows[1]["error"]


def _optuna_sweep(tmp_path: Path) -> tuple[Path, dict, list[RunResult]]:
    sweep = tmp_path / "sweep"
    _train(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweep.dir={sweep}",
    )
    return sweep, yaml.safe_load((sweep / "optimization_results.yaml").read_text()), collect_runs(sweep)


@pytest.mark.slow
def test_optuna_search_runs_and_is_summarised(tmp_path):
    sweep, best, runs = _optuna_sweep(tmp_path)
    assert [r.status for r in runs] == ["completed"] * 3
    sparsities = [float(r.metrics["target_sparsity"]) for r in runs]
    assert all(0.5 <= s <= 0.99 for s in sparsities) and len(set(sparsities)) == 3
    assert best["best_params"]["pruning.sparsity"] in sparsities
    assert "Highest sparsity within a drop of 1.00 pp" in (sweep / "results.md").read_text()


@pytest.mark.slow
def test_optuna_maximises_the_search_objective(tmp_path):
    _, best, runs = _optuna_sweep(tmp_path)
    values = [search_objective(r.metrics, 0.01) for r in runs]
    assert best["best_value"] == pytest.approx(max(values))
