"""Latency comparisons that say when the machine made them meaningless.

On a shared CPU, torch's intra-op threads wait for a descheduled peer at every parallel region: a tiny model that
runs in 0.3 ms on a quiet machine takes 80 ms under load, and a ratio of two such times is fiction. The reports
(:func:`~lightning_prune.deploy.profile.compaction_report`, :func:`~lightning_prune.deploy.report.export_model`)
therefore time the models side by side in alternating blocks, take the median of the per-block ratios, and judge
the measurement with :func:`judge_timing`: when other processes kept the cores busy (:class:`OtherLoad`) or the
blocks disagree, they print :data:`UNSTABLE` instead of a ratio; a stable ratio well below 1 is a real slow-down and
is warned about.

Example:
    >>> judge_timing([2.0, 2.1, 1.9], load_cores=0.0).stable
    True
    >>> judge_timing([0.01, 1.0, 3.0], load_cores=0.0).text()
    'unstable (machine busy)'
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: What a report prints instead of a ratio it cannot trust.
UNSTABLE = "unstable (machine busy)"


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), or None where ``/proc/stat`` is
    missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


class OtherLoad:
    """Context manager: the average number of cores that *other* processes kept busy while the block ran.

    ``cores`` is None where the machine's counters cannot be read (not Linux).

    Example:
        >>> with OtherLoad() as load:
        ...     pass
        >>> load.cores is None or load.cores >= 0.0
        True
    """

    cores: float | None

    def __enter__(self) -> OtherLoad:
        self._start = _cpu_seconds()
        self._wall = time.perf_counter()
        self.cores = None
        return self

    def __exit__(self, *exc: object) -> None:
        end = _cpu_seconds()
        if self._start is None or end is None:
            return
        wall = max(time.perf_counter() - self._wall, 1e-9)
        self.cores = max(0.0, (end[0] - self._start[0]) - (end[1] - self._start[1])) / wall


@dataclass(frozen=True)
class TimingVerdict:
    """Whether a ratio measured in blocks can be reported, and why not."""

    ratio: float
    """The median of the per-block ratios."""
    spread: float
    """The largest per-block ratio over the smallest (1.0: all blocks agree)."""
    load_cores: float | None
    """Cores other processes used meanwhile (None: unknown)."""
    stable: bool
    """True when the load stayed under the limit and the blocks agreed."""
    reason: str
    """Why the measurement is unstable, in words; empty when stable."""

    def text(self, fmt: str = "{:.2f}x") -> str:
        """The ratio formatted with ``fmt``, or :data:`UNSTABLE` when the measurement is unstable.

        Example:
            >>> TimingVerdict(2.0, 1.1, 0.0, True, "").text()
            '2.00x'
        """
        return fmt.format(self.ratio) if self.stable else UNSTABLE


def judge_timing(
    ratios: Sequence[float], load_cores: float | None, *, max_spread: float = 1.5, max_load: float = 0.5
) -> TimingVerdict:
    """Judge the per-block ratios of a side-by-side timing.

    Args:
        ratios: One ratio per block (e.g. dense time over pruned time), each > 0.
        load_cores: Cores other processes used during the timing (:class:`OtherLoad`), or None if unknown.
        max_spread: The largest ratio over the smallest above which the blocks are said to disagree.
        max_load: Other processes' cores above which the machine is said to be busy.

    Returns:
        A :class:`TimingVerdict`.

    Raises:
        ValueError: ``ratios`` is empty or holds a value that is not a positive finite number.

    Example:
        >>> verdict = judge_timing([1.0, 1.2], load_cores=1.7)
        >>> verdict.stable, verdict.reason
        (False, 'other processes used 1.7 cores (limit 0.5)')
    """
    values = list(ratios)
    if not values or not all(isinstance(r, (int, float)) and 0 < r < float("inf") for r in values):
        raise ValueError(f"`ratios` must be a non-empty list of positive finite numbers, got {ratios!r}.")
    spread = max(values) / min(values)
    reasons = []
    if load_cores is not None and load_cores > max_load:
        reasons.append(f"other processes used {load_cores:.1f} cores (limit {max_load:g})")
    if spread > max_spread:
        reasons.append(f"the blocks' ratios range {min(values):.2f}x-{max(values):.2f}x")
    return TimingVerdict(statistics.median(values), spread, load_cores, not reasons, "; ".join(reasons))


def time_side_by_side(
    calls: Sequence[Callable[[], object]], *, blocks: int, repeats: int, warmup: int = 2
) -> tuple[list[float], list[list[float]], float | None]:
    """Time ``calls`` in alternating blocks (the order rotates between blocks) while watching the machine's load.

    Args:
        calls: The calls to compare, e.g. two models' forwards on one batch.
        blocks: Timed blocks, at least 1.
        repeats: Calls of each per block; a block's time is their median.
        warmup: Untimed rounds first.

    Returns:
        (each call's median seconds over the blocks, each block's seconds per call, the cores other processes used
        meanwhile or None).

    Example:
        >>> medians, per_block, load = time_side_by_side([lambda: None, lambda: None], blocks=2, repeats=3)
        >>> len(medians), len(per_block), len(per_block[0])
        (2, 2, 2)
    """
    for _ in range(warmup):
        for call in calls:
            call()
    per_block: list[list[float]] = []
    with OtherLoad() as load:
        for block in range(blocks):
            times = [0.0] * len(calls)
            for i in [(block + k) % len(calls) for k in range(len(calls))]:
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    calls[i]()
                    samples.append(time.perf_counter() - start)
                times[i] = statistics.median(samples)
            per_block.append(times)
    medians = [statistics.median(block[i] for block in per_block) for i in range(len(calls))]
    return medians, per_block, load.cores


def warn_if_slower(verdict: TimingVerdict, what: str, threshold: float = 0.9) -> None:
    """Warn when a stable speed-up ``verdict`` says the new form is slower (ratio below ``threshold``).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_if_slower(TimingVerdict(0.5, 1.1, 0.0, True, ""), "the compact model at batch 1")
        >>> str(caught[0].message)
        'the compact model at batch 1 ran slower: 0.50x the speed of the model it replaces, on a quiet machine.'
    """
    if verdict.stable and verdict.ratio < threshold:
        warnings.warn(
            f"{what} ran slower: {verdict.ratio:.2f}x the speed of the model it replaces, on a quiet machine.",
            RuntimeWarning,
            stacklevel=3,
        )
