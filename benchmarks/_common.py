"""Helpers shared by the benchmarks: environment report, robust statistics and markdown tables."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

THREADS = 2


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(package: str) -> str:
    """The installed version of ``package``, read from its metadata (without importing it)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_digest() -> str:
    """A short digest of the package's Python sources, naming the code state that was measured."""
    root = Path(__file__).resolve().parents[1] / "lightning_prune"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def git_commit() -> str:
    """``commit <sha>`` of the checkout (``+ local changes`` when dirty), or ``(no commit)``."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lightning_prune"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(no commit)"
    return f"commit {sha}" + (" + local changes" if dirty else "")


def environment(extra: dict[str, object] | None = None, threads: int = THREADS) -> str:
    """A few lines saying where and with what a benchmark ran. Imports nothing heavy, so that a driver
    process stays small (a child's ``ru_maxrss`` starts at its parent's resident size)."""
    lines = [
        f"date:      {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine:   {cpu_name()}, {os.cpu_count()} logical cores, {_total_ram_gib():.0f} GiB RAM, no GPU used",
        f"python:    {platform.python_version()}",
        f"torch:     {version('torch')} (torch.set_num_threads({threads}))",
        f"lightning: {version('lightning')}",
        f"package:   lightning_prune {git_commit()}, sources sha256 {source_digest()}",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"{key + ':':<10} {value}")
    return "\n".join(lines)


def _total_ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method); the value itself for a single sample."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table with padded columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- contention
# The machine is shared: with 2 torch threads on 2 cores, another busy process stalls every parallel op.
# These helpers measure how much CPU *other* processes use and wait for a quiet moment before timing.
_HZ = os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> tuple[float, float]:
    """(busy seconds of the whole machine, CPU seconds of this process and its waited-for children)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    t = os.times()
    return busy / _HZ, t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """Context manager: average number of cores used by other processes while the block ran (``cores``).

    Example:
        >>> with OtherLoad() as load:
        ...     pass
        >>> load.cores >= 0.0
        True
    """

    def __enter__(self) -> OtherLoad:
        self._busy, self._own = _cpu_seconds()
        self._wall = time.perf_counter()
        self.cores = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own = _cpu_seconds()
        wall = max(time.perf_counter() - self._wall, 1e-9)
        self.cores = max(0.0, (busy - self._busy) - (own - self._own)) / wall


def wait_for_quiet(max_cores: float, timeout_s: float, sample_s: float = 1.0) -> tuple[float, float]:
    """Sleep until other processes use less than ``max_cores`` cores over ``sample_s``, or ``timeout_s``.

    Returns (seconds waited, the other processes' load in the last sample, in cores).
    """
    start = time.perf_counter()
    while True:
        with OtherLoad() as load:
            time.sleep(sample_s)
        waited = time.perf_counter() - start
        if load.cores < max_cores or waited >= timeout_s:
            return waited, load.cores


def add_contention_arguments(
    parser: argparse.ArgumentParser, *, unit: str = "block", quiet_timeout: float = 60.0, max_attempts: int = 3
) -> None:
    """The options every timing script shares: wait for quiet before each ``unit``, discard a busy one."""
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.25,
        help=f"before each {unit}, wait until other processes use fewer cores than this (0 = never wait)",
    )
    parser.add_argument("--quiet-timeout", type=float, default=quiet_timeout, help="longest wait for quiet, seconds")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.2,
        help=f"discard and repeat a {unit} during which other processes used more cores than this on average",
    )
    parser.add_argument("--max-attempts", type=int, default=max_attempts, help=f"at most this many attempts per {unit}")
