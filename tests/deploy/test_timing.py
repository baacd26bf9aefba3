"""Honest timing in the reports: side-by-side blocks, the load check, "unstable (machine busy)" instead of a ratio,
and a warning on a real slow-down. The clock and the load are replaced by given values, so that each test checks
the decision and never depends on how busy the machine is."""

import warnings

import pytest
import torch
from torch import nn

from lightning_prune.deploy import profile, report, timing
from lightning_prune.deploy.profile import compaction_report
from lightning_prune.deploy.report import ExportReport
from lightning_prune.deploy.timing import UNSTABLE, judge_timing, warn_if_slower


@pytest.mark.parametrize(
    ("ratios", "load", "stable", "reason"),
    [
        ([2.0, 2.1, 1.9], 0.0, True, ""),
        ([2.0, 2.1, 1.9], None, True, ""),  # load unknown: the blocks decide
        ([2.0, 2.1, 1.9], 0.6, False, "other processes used 0.6 cores (limit 0.5)"),
        ([0.5, 1.0, 0.9], 0.1, False, "the blocks' ratios range 0.50x-1.00x"),
        ([0.01, 1.0], 1.7, False, "other processes used 1.7 cores (limit 0.5); the blocks' ratios range 0.01x-1.00x"),
    ],
)
def test_a_busy_machine_or_disagreeing_blocks_make_a_ratio_unstable(ratios, load, stable, reason):
    verdict = judge_timing(ratios, load)
    assert (verdict.stable, verdict.reason) == (stable, reason)
    assert verdict.ratio == sorted(ratios)[len(ratios) // 2] if len(ratios) % 2 else True
    assert verdict.text() == (f"{verdict.ratio:.2f}x" if stable else UNSTABLE)


@pytest.mark.parametrize("ratios", [[], [1.0, 0.0], [float("inf")], [-1.0]])
def test_bad_ratios_are_refused(ratios):
    with pytest.raises(ValueError, match=r"`ratios` must be a non-empty list of positive finite numbers, got"):
        judge_timing(ratios, 0.0)


def test_only_a_stable_slow_down_is_warned_about():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_slower(judge_timing([0.5, 0.52], 0.0), "The compact model at batch 1")
        warn_if_slower(judge_timing([0.5, 0.52], 2.0), "busy")  # unstable: no claim either way
        warn_if_slower(judge_timing([0.95, 0.96], 0.0), "within noise")
    assert [str(w.message) for w in caught] == [
        "The compact model at batch 1 ran slower: 0.51x the speed of the model it replaces, on a quiet machine."
    ]


def fake_side_by_side(per_block_ms, load):
    """A ``time_side_by_side`` that returns given block times (ms) and load instead of reading the clock."""

    def run(calls, *, blocks, repeats, warmup=2):
        for call in calls:
            call()  # the calls still run: the models must accept the batch
        blocks_s = [[t / 1e3 for t in block] for block in per_block_ms]
        medians = [sorted(b[i] for b in blocks_s)[len(blocks_s) // 2] for i in range(len(calls))]
        return medians, blocks_s, load

    return run


@pytest.mark.parametrize(
    ("per_block_ms", "load", "cell"),
    [
        ([[2.0, 1.0], [2.2, 1.0], [2.1, 1.0]], 0.0, "2.10x"),
        ([[2.0, 1.0], [2.2, 1.0], [2.1, 1.0]], 1.9, UNSTABLE),
        ([[0.3, 84.0], [0.3, 0.3], [0.3, 0.25]], 0.0, UNSTABLE),  # one stalled block: the 0.00x
    ],
)
def test_the_compaction_report_prints_unstable_instead_of_a_busy_ratio(per_block_ms, load, cell, monkeypatch):
    monkeypatch.setattr(profile, "time_side_by_side", fake_side_by_side(per_block_ms, load))
    figures, text = compaction_report(nn.Linear(8, 4), nn.Linear(8, 2), torch.zeros(1, 8))
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("latency")}
    assert rows["b1"].endswith(cell) and rows["b64"].endswith(cell)
    assert figures["compact/latency_b1_stable"] == (cell != UNSTABLE)
    assert ("b1 unstable: " in text) == (cell == UNSTABLE)
    assert "b1 on 1 thread" in text


def test_the_compaction_report_warns_about_a_stable_slow_down(monkeypatch):
    monkeypatch.setattr(profile, "time_side_by_side", fake_side_by_side([[1.0, 2.0], [1.0, 2.1], [1.0, 1.9]], 0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compaction_report(nn.Linear(8, 4), nn.Linear(8, 2), torch.zeros(1, 8))
    assert [str(w.message) for w in caught] == [
        f"The compact model at batch {b} ran slower: 0.50x the speed of the model it replaces, on a quiet machine."
        for b in (1, 64)
    ]


def test_the_export_table_prints_unstable_where_a_speed_up_cannot_be_trusted():
    r = ExportReport(
        "MLP",
        "out",
        latency_ms={"dense": {1: 0.3}, "compact": {1: 0.2}},
        speedup={"dense": {1: 1.0}, "compact": {1: 1.5}},
        stable={"dense": {1: True}, "compact": {1: False}},
        settings={"repeats": 10, "blocks": 3, "threads": 2, "unstable_reason": "other processes used 1.7 cores"},
    )
    rows = r.table().splitlines()
    assert rows[2].split()[-1] == "1.00x" and rows[3].endswith(UNSTABLE)
    assert rows[-1] == "  unstable: other processes used 1.7 cores"
    assert r.as_dict()["stable"] == {"dense": {"1": True}, "compact": {"1": False}}


def test_export_model_judges_each_speed_up_from_its_blocks(monkeypatch, tmp_path):
    # Block times: compact is 2x faster than dense in every block; masked disagrees between blocks.
    def timed_blocks(variants, inputs, blocks, repeats):
        per = {"dense": [1.0, 1.0, 1.0], "masked": [0.2, 1.0, 3.0], "compact": [0.5, 0.5, 0.5]}
        return [{(n, b): per[n][k] for n in variants for b in inputs} for k in range(blocks)]

    monkeypatch.setattr(report, "_timed_blocks", timed_blocks)
    monkeypatch.setattr(timing.OtherLoad, "__exit__", lambda self, *exc: setattr(self, "cores", 0.0))
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    result = report.export_model(
        net, torch.randn(2, 4), tmp_path, forms=("dense",), sparse_kernels=False, batch_sizes=(1,), blocks=3
    )
    assert result.speedup["compact"] == {1: 2.0} and result.stable["compact"] == {1: True}
    assert result.speedup["masked"] == {1: 1.0} and result.stable["masked"] == {1: False}
    assert result.settings["unstable_reason"] == (
        "masked b1: the blocks' ratios range 0.33x-5.00x; masked b1 1 thread: the blocks' ratios range 0.33x-5.00x"
    )
    (masked,) = [line for line in result.table().splitlines() if line.lstrip().startswith("masked")]
    assert masked.endswith(UNSTABLE)


def _row(table: str, description: str) -> list[str]:
    """The cells of a latency row (separated by two spaces or more)."""
    (line,) = [line for line in table.splitlines() if line.lstrip().startswith(description)]
    return [cell.strip() for cell in line.strip().split("  ") if cell.strip()]


def test_the_export_report_times_batch_1_on_one_thread_and_guards_it_apart(monkeypatch, tmp_path):
    # The main measurement is quiet; the one-thread one is contended (other processes used 1.7 cores).
    threads_seen = []

    def timed_blocks(variants, inputs, blocks, repeats):
        threads_seen.append((torch.get_num_threads(), sorted(inputs)))
        per = {"dense": 1.0, "masked": 1.0, "compact": 0.5}
        return [{(n, b): per[n] for n in variants for b in inputs} for _ in range(blocks)]

    def busy_on_one_thread(self, *exc):
        self.cores = 1.7 if torch.get_num_threads() == 1 else 0.0

    monkeypatch.setattr(report, "_timed_blocks", timed_blocks)
    monkeypatch.setattr(timing.OtherLoad, "__exit__", busy_on_one_thread)
    before = torch.get_num_threads()
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    result = report.export_model(
        net, torch.randn(2, 4), tmp_path, forms=("dense",), sparse_kernels=False, batch_sizes=(1, 4), threads=2
    )
    assert threads_seen == [(2, [1, 4]), (1, [1])] and torch.get_num_threads() == before
    assert result.speedup["compact"] == {1: 2.0, 4: 2.0} and result.stable["compact"] == {1: True, 4: True}
    assert result.one_thread["compact"] == {"latency_ms": 500.0, "speedup": 2.0, "stable": False}
    assert result.settings["unstable_reason"] == "b1 1 thread: other processes used 1.7 cores (limit 0.5)"
    table = result.table()
    assert _row(table, "latency (ms)") == [
        "latency (ms)",
        "b1",
        "b4",
        "b1 1 thread",
        "x dense b1",
        "x dense b4",
        "x dense b1 1 thread",
    ]
    assert _row(table, "compacted") == [
        "compacted + BN folded",
        "500.000",
        "500.000",
        "500.000",
        "2.00x",
        "2.00x",
        UNSTABLE,
    ]
    assert "  unstable: b1 1 thread: other processes used 1.7 cores (limit 0.5)" in table.splitlines()


def test_a_real_export_report_has_batch_1_on_its_threads_and_on_one_thread(tmp_path):
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    before = torch.get_num_threads()
    result = report.export_model(
        net,
        torch.randn(2, 16),
        tmp_path,
        forms=("dense",),
        sparse_kernels=False,
        batch_sizes=(1, 4),
        blocks=1,
        repeats=2,
    )
    assert torch.get_num_threads() == before
    assert set(result.one_thread) == set(result.latency_ms) == {"dense", "masked", "compact"}
    assert all(m["latency_ms"] > 0 and m["speedup"] > 0 for m in result.one_thread.values())
    table = result.table()
    for variant in ("dense model", "masked (pruned, dense kernels)", "compacted + BN folded"):
        cells = _row(table, variant)
        assert len(cells) == 7 and all(float(c) > 0 for c in cells[1:4])  # b1, b4, b1 1 thread
        assert all(c == UNSTABLE or c.endswith("x") for c in cells[4:])  # each with its guard
    assert "b1 1 thread: batch 1 timed apart on one thread" in table
    saved = (tmp_path / "report.json").read_text()
    assert '"one_thread"' in saved and '"one_thread_other_load_cores"' in saved
