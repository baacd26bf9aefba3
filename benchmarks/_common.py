"""Helpers shared by the benchmarks: environment report, robust statistics, markdown tables, timing loops, and
the waits and retries that keep a shared machine's load out of the measurements."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import importlib.metadata
import logging
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

THREADS = 2

R = TypeVar("R")
T = TypeVar("T")


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


def median_iqr(values: Sequence[float]) -> str:
    """``median [q1-q3]`` with two decimals, e.g. ``1.52 [1.48-1.60]``."""
    q1, q3 = quartiles(values)
    return f"{median(values):.2f} [{q1:.2f}-{q3:.2f}]"


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    """``mean ± sample std`` of ``values`` times ``scale`` (``-`` for none), e.g. ``+0.12 ± 0.30``."""
    if not values:
        return "-"
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:{'+' if signed else ''}.{digits}f} ± {std:.{digits}f}"


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
    """Context manager: average number of cores used by other processes while the block ran (``cores``); with
    ``wall_s``, ``busy_s`` and ``own_s`` a job of several processes tells its own from others (:meth:`outside`).

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
        # The block's wall seconds, the machine's busy CPU seconds and this process's own over it.
        self.wall_s = max(time.perf_counter() - self._wall, 1e-9)
        self.busy_s, self.own_s = busy - self._busy, own - self._own
        self.cores = self.outside(self.own_s)

    def outside(self, own_s: float) -> float:
        """Cores used by processes other than those whose CPU seconds over the block add up to ``own_s`` (e.g. the
        ranks of one job, which load each other)."""
        return max(0.0, self.busy_s - own_s) / self.wall_s


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


def measure_quietly(
    measure: Callable[[], R], args: argparse.Namespace, on_busy: Callable[[float, bool], None] | None = None
) -> tuple[R, float]:
    """``measure()`` after waiting for quiet (``--quiet-cores``), repeated while other processes used more than
    ``--max-other-load`` cores during it, at most ``--max-attempts`` times in all; ``on_busy(cores, last)`` hears
    of each busy attempt. Returns the last result and the other processes' load during it, in cores."""
    for attempt in range(1, args.max_attempts + 1):
        if args.quiet_cores > 0:
            wait_for_quiet(args.quiet_cores, args.quiet_timeout)
        with OtherLoad() as load:
            result = measure()
        if load.cores <= args.max_other_load:
            break
        if on_busy is not None:
            on_busy(load.cores, attempt == args.max_attempts)
    return result, load.cores


def contention_note(args: argparse.Namespace) -> str:
    """What :func:`quiet_blocks` does with the contention options, for a benchmark's environment lines."""
    return (
        f"before each block, wait up to {args.quiet_timeout:.0f} s for other processes to use < {args.quiet_cores} "
        f"cores; a block during which they used > {args.max_other_load} cores on average is discarded and repeated"
    )


def report_discarded(who: str, cores: float) -> None:
    """Say that a block of ``who`` was discarded (an ``on_discard`` for :func:`quiet_blocks`)."""
    print(f"{who}: block discarded, other processes used {cores:.2f} cores", flush=True)


def report_repeated(who: str, cores: float, last: bool) -> None:
    """Say that ``who`` is measured again (an ``on_busy`` for :func:`measure_quietly`; silent on the last try)."""
    if not last:
        print(f"{who}: other processes used {cores:.2f} cores, repeated", flush=True)


def quiet_blocks(
    measure: Callable[[list[T]], R],
    order: Sequence[T],
    blocks: int,
    args: argparse.Namespace,
    *,
    who: str,
    shift_by_kept: bool = False,
    on_discard: Callable[[float], None] | None = None,
) -> tuple[list[R], int, list[float]]:
    """``blocks`` results of ``measure(order)``, a timed block of what ``order`` lists, in that order rotated
    (:func:`rotated`) by the attempt's number, or with ``shift_by_kept`` by the number of blocks kept so far.

    Before each block, wait for other processes to go quiet (``--quiet-cores``); the first block is untimed; a block
    during which they used more than ``--max-other-load`` cores on average is discarded (``on_discard(cores)``
    hears of it) and repeated, at most ``(blocks + 1) * --max-attempts`` blocks in all.

    Returns:
        The kept results, how many were discarded, and the other processes' load during each kept block.

    Raises:
        RuntimeError: every block was discarded (``who`` names the measurement).
    """
    kept: list[R] = []
    loads: list[float] = []
    discarded = attempt = 0
    while len(kept) < blocks and attempt < (blocks + 1) * args.max_attempts:
        shift = len(kept) if shift_by_kept else attempt
        if args.quiet_cores > 0:
            wait_for_quiet(args.quiet_cores, args.quiet_timeout)
        with OtherLoad() as load:
            result = measure(rotated(order, shift))
        attempt += 1
        if attempt == 1:
            continue  # untimed warm-up block
        if load.cores > args.max_other_load:
            discarded += 1
            if on_discard is not None:
                on_discard(load.cores)
            continue
        kept.append(result)
        loads.append(load.cores)
    if not kept:
        raise RuntimeError(f"{who}: every block was discarded; the machine never went quiet")
    return kept, discarded, loads


# ------------------------------------------------------------------------------------------------- timing
def rotated(items: Sequence[T], shift: int) -> list[T]:
    """``items`` rotated left by ``shift`` places: the order of block or round ``shift``, so that the machine's
    drifts hit every item alike."""
    start = shift % len(items)
    return [*items[start:], *items[:start]]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector collected once, then paused inside the block."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def median_seconds(run: Callable[[Any], object], x: Any, repeats: int) -> float:
    """Median wall time of ``repeats`` calls ``run(x)``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return median(times)


def warm_up(runs: Mapping[str, Callable[[Any], object]], inputs: Mapping[int, Any], calls: int = 3) -> None:
    """``calls`` untimed calls of every run on every input, under ``torch.inference_mode()``."""
    import torch

    with torch.inference_mode():
        for run in runs.values():
            for x in inputs.values():
                for _ in range(calls):
                    run(x)


def time_block(
    runs: Mapping[str, Callable[[Any], object]],
    inputs: Mapping[int, Any],
    order: Sequence[str],
    repeats: Mapping[int, int],
) -> dict[tuple[str, int], float]:
    """Median seconds per call of each run at each batch size, ``{(run, batch): seconds}``: at each batch size of
    ``inputs`` in turn, the runs in ``order``, ``repeats[batch]`` calls each; under ``torch.inference_mode()``,
    the garbage collector paused."""
    import torch

    result = {}
    with gc_paused(), torch.inference_mode():
        for batch, x in inputs.items():
            for name in order:
                result[(name, batch)] = median_seconds(runs[name], x, repeats[batch])
    return result


# ------------------------------------------------------------------------------------------------ Lightning
def quiet_lightning(*messages: str) -> None:
    """Keep a benchmark's output to its measurements: Lightning's and our info lines off, and the warnings that
    are expected here (in-memory data without workers, a deprecation inside Lightning) and ``messages`` (regular
    expressions) ignored."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "lightning_prune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    for message in messages:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def cpu_trainer(max_epochs: int, callbacks: list[Any] | None = None, *, deterministic: bool = True) -> Any:
    """A bare CPU ``Trainer`` for timing and accuracy runs: one device, no logger, checkpoints, progress bar,
    model summary or validation."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks or [],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=deterministic,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
