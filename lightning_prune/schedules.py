"""Sparsity schedules: the target fraction of zeros at a given epoch.

Each schedule is a small frozen object whose :meth:`SparsitySchedule.sparsity_at` is a pure function of the
epoch. Sparsity is always *absolute*: the fraction of prunable weights that are zero, never a fraction of what
is still left (the trap of ``torch.nn.utils.prune``'s ``amount``, which compounds on every call).

Pruning happens on *pruning epochs*: ``start_epoch``, ``start_epoch + every_n_epochs``, ... and always
``end_epoch``. Between pruning epochs the target stays at the value of the last pruning epoch; before
``start_epoch`` it is 0; from ``end_epoch`` on it is ``final_sparsity``.

Example:
    >>> s = CubicSchedule(final_sparsity=0.9, start_epoch=2, end_epoch=6)
    >>> [round(s.sparsity_at(e), 4) for e in range(8)]
    [0.0, 0.0, 0.0, 0.5203, 0.7875, 0.8859, 0.9, 0.9]
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from lightning_prune._helpers import check_int, check_sparsity, is_int

ScheduleName = Literal["one_shot", "linear", "cubic", "exponential", "iterative"]


@dataclass(frozen=True)
class SparsitySchedule(ABC):
    """Base class: target sparsity as a pure function of the epoch.

    Args:
        final_sparsity: fraction of zeros reached at ``end_epoch``, in [0, 1).
        start_epoch: first pruning epoch.
        end_epoch: last pruning epoch (``>= start_epoch``). ``None`` means "the last training epoch";
            resolve it with :meth:`with_end_epoch` before asking for sparsities.
        every_n_epochs: spacing of the pruning epochs between start and end.
        initial_sparsity: target at ``start_epoch`` for the gradual schedules.
    """

    final_sparsity: float = 0.9
    start_epoch: int = 0
    end_epoch: int | None = None
    every_n_epochs: int = 1
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity, "final_sparsity")
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        check_int("start_epoch", self.start_epoch, 0)
        check_int("every_n_epochs", self.every_n_epochs, 1)
        if self.end_epoch is not None:
            check_int("end_epoch", self.end_epoch, 0)
            if self.end_epoch < self.start_epoch:
                raise ValueError(
                    f"`end_epoch` ({self.end_epoch}) must not be before `start_epoch` ({self.start_epoch}): "
                    "the schedule would end before it starts."
                )
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"`initial_sparsity` ({self.initial_sparsity}) must not exceed `final_sparsity` "
                f"({self.final_sparsity}): pruned weights are never revived."
            )

    def with_end_epoch(self, end_epoch: int) -> SparsitySchedule:
        """Return a copy whose open ``end_epoch`` is set (no-op when it is already set)."""
        if self.end_epoch is not None:
            return self
        return dataclasses.replace(self, end_epoch=max(end_epoch, self.start_epoch))

    @property
    def _end(self) -> int:
        if self.end_epoch is None:
            raise ValueError(f"{type(self).__name__} has no `end_epoch`; set it or call `with_end_epoch(last_epoch)`.")
        return self.end_epoch

    def pruning_epochs(self) -> list[int]:
        """The epochs at which the target changes: start, start + n, ..., and end."""
        end = self._end
        epochs = list(range(self.start_epoch, end, self.every_n_epochs))
        return [*epochs, end]

    def last_pruning_epoch(self, epoch: int) -> int | None:
        """The latest pruning epoch at or before ``epoch`` (``None`` before ``start_epoch``)."""
        if epoch < self.start_epoch:
            return None
        end = self._end
        if epoch >= end:
            return end
        return self.start_epoch + (epoch - self.start_epoch) // self.every_n_epochs * self.every_n_epochs

    def progress(self, epoch: int) -> float:
        """Fraction of the way from start to end, in [0, 1], held constant between pruning epochs."""
        last = self.last_pruning_epoch(epoch)
        if last is None:
            return 0.0
        end = self._end
        if end == self.start_epoch:
            return 1.0
        return (last - self.start_epoch) / (end - self.start_epoch)

    def sparsity_at(self, epoch: int) -> float:
        """Target sparsity (absolute fraction of zeros) in force during ``epoch``."""
        if not is_int(epoch):
            raise TypeError(f"`epoch` must be an int, got {epoch!r}.")
        if self.last_pruning_epoch(epoch) is None:
            return 0.0
        p = self.progress(epoch)
        if p >= 1.0:
            return self.final_sparsity
        if p <= 0.0:
            return self.initial_sparsity
        return min(self.final_sparsity, max(self.initial_sparsity, self._interpolate(p)))

    def first_nonzero_epoch(self) -> int | None:
        """The first epoch whose target is above 0, when the first weights go (None: every target is 0).

        ``one_shot`` and ``iterative`` prune at ``start_epoch``; the gradual schedules start from
        ``initial_sparsity`` (0 by default), so their first zeros come one step later.

        Example:
            >>> CubicSchedule(final_sparsity=0.9, start_epoch=2, end_epoch=6).first_nonzero_epoch()
            3
            >>> OneShotSchedule(final_sparsity=0.9, start_epoch=2).first_nonzero_epoch()
            2
        """
        return next((e for e in self.pruning_epochs() if self.sparsity_at(e) > 0), None)

    def describe(self) -> str:
        """One line for logs and summaries: the shape, the epochs, and when the first non-zero target comes.

        Example:
            >>> CubicSchedule(final_sparsity=0.9, start_epoch=2, end_epoch=6).describe()
            'cubic to 0.9 over epochs 2-6 (every 1); first non-zero target 0.5203 at epoch 3'
        """
        name = next((k for k, v in SCHEDULES.items() if type(self) is v), type(self).__name__)
        epochs = self.pruning_epochs()
        if len(epochs) == 1:
            when = f"at epoch {epochs[0]}"
        elif isinstance(self, IterativeSchedule):
            when = f"at epochs {', '.join(map(str, epochs))}"
        else:
            when = f"over epochs {self.start_epoch}-{self._end} (every {self.every_n_epochs})"
        first = self.first_nonzero_epoch()
        head = f"{name} to {self.final_sparsity:g} {when}"
        if first is None:
            return f"{head}; every target is 0: nothing is pruned"
        return f"{head}; first non-zero target {self.sparsity_at(first):.4f} at epoch {first}"

    @abstractmethod
    def _interpolate(self, progress: float) -> float:
        """Sparsity at ``0 < progress < 1`` between initial and final sparsity."""


@dataclass(frozen=True)
class OneShotSchedule(SparsitySchedule):
    """Prune once, at ``start_epoch``, straight to ``final_sparsity``.

    Example:
        >>> s = OneShotSchedule(final_sparsity=0.8, start_epoch=3)
        >>> [s.sparsity_at(e) for e in (2, 3, 9)]
        [0.0, 0.8, 0.8]
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.end_epoch is not None and self.end_epoch != self.start_epoch:
            raise ValueError(
                f"a one-shot schedule prunes once: `end_epoch` ({self.end_epoch}) must equal `start_epoch` "
                f"({self.start_epoch}) or be None."
            )
        object.__setattr__(self, "end_epoch", self.start_epoch)

    def _interpolate(self, progress: float) -> float:  # pragma: no cover - progress is always 1
        return self.final_sparsity


@dataclass(frozen=True)
class LinearSchedule(SparsitySchedule):
    """Sparsity grows by equal absolute steps from ``initial_sparsity`` to ``final_sparsity``.

    Example:
        >>> s = LinearSchedule(final_sparsity=0.8, start_epoch=0, end_epoch=4)
        >>> [round(s.sparsity_at(e), 2) for e in range(5)]
        [0.0, 0.2, 0.4, 0.6, 0.8]
    """

    def _interpolate(self, progress: float) -> float:
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress)


@dataclass(frozen=True)
class CubicSchedule(SparsitySchedule):
    """Gradual pruning of Zhu & Gupta (2017), "To prune, or not to prune".

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3``: prunes fast early, when many redundant
    weights remain, and slowly near the end.

    Example:
        >>> s = CubicSchedule(final_sparsity=0.9, start_epoch=0, end_epoch=2)
        >>> [round(s.sparsity_at(e), 4) for e in range(3)]
        [0.0, 0.7875, 0.9]
    """

    def _interpolate(self, progress: float) -> float:
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class ExponentialSchedule(SparsitySchedule):
    """The density (fraction kept) shrinks by the same factor at every pruning epoch.

    ``1 - s_t = (1 - s_i) * ((1 - s_f) / (1 - s_i)) ** progress``: each step removes the same share of the
    weights still left, as in iterative magnitude pruning (Han et al., 2015), yet the targets stay absolute.

    Example:
        >>> s = ExponentialSchedule(final_sparsity=0.75, start_epoch=0, end_epoch=2)
        >>> [round(s.sparsity_at(e), 4) for e in range(3)]
        [0.0, 0.5, 0.75]
    """

    def _interpolate(self, progress: float) -> float:
        keep_i, keep_f = 1.0 - self.initial_sparsity, 1.0 - self.final_sparsity
        return 1.0 - keep_i * math.pow(keep_f / keep_i, progress)


@dataclass(frozen=True)
class IterativeSchedule(SparsitySchedule):
    """A fixed list of absolute sparsities, one per pruning epoch.

    Args:
        sparsities: non-decreasing targets in [0, 1); the last one is the final sparsity.
        epochs: the pruning epoch of each target (strictly increasing). Defaults to ``start_epoch``,
            ``start_epoch + every_n_epochs``, ...

    Example:
        >>> s = IterativeSchedule(sparsities=(0.5, 0.75, 0.9), start_epoch=1, every_n_epochs=2)
        >>> [s.sparsity_at(e) for e in range(7)]
        [0.0, 0.5, 0.5, 0.75, 0.75, 0.9, 0.9]
    """

    sparsities: Sequence[float] = field(default=())
    epochs: Sequence[int] | None = None

    def __post_init__(self) -> None:
        sparsities = tuple(self.sparsities)
        if not sparsities:
            raise ValueError("`sparsities` must list at least one target sparsity, e.g. (0.5, 0.75, 0.9).")
        for i, s in enumerate(sparsities):
            check_sparsity(s, f"sparsities[{i}]")
        if any(b < a for a, b in itertools.pairwise(sparsities)):
            raise ValueError(
                f"`sparsities` must be non-decreasing (pruned weights are never revived), got {sparsities}."
            )
        if self.epochs is None:
            check_int("start_epoch", self.start_epoch, 0)
            check_int("every_n_epochs", self.every_n_epochs, 1)
            epochs = tuple(self.start_epoch + i * self.every_n_epochs for i in range(len(sparsities)))
        else:
            epochs = tuple(self.epochs)
            if len(epochs) != len(sparsities):
                raise ValueError(
                    f"`epochs` ({len(epochs)} entries) and `sparsities` ({len(sparsities)} entries) must have "
                    "the same length."
                )
            for i, e in enumerate(epochs):
                check_int(f"epochs[{i}]", e, 0)
            if any(b <= a for a, b in itertools.pairwise(epochs)):
                raise ValueError(f"`epochs` must be strictly increasing, got {epochs}.")
        if self.end_epoch is not None and self.end_epoch != epochs[-1]:
            raise ValueError(
                f"`end_epoch` ({self.end_epoch}) must be None or the last of the iterative epochs ({epochs[-1]})."
            )
        object.__setattr__(self, "sparsities", sparsities)
        object.__setattr__(self, "epochs", epochs)
        object.__setattr__(self, "start_epoch", epochs[0])
        object.__setattr__(self, "end_epoch", epochs[-1])
        object.__setattr__(self, "final_sparsity", sparsities[-1])
        object.__setattr__(self, "initial_sparsity", sparsities[0])
        super().__post_init__()

    def pruning_epochs(self) -> list[int]:
        return list(self.epochs or ())

    def last_pruning_epoch(self, epoch: int) -> int | None:
        past = [e for e in self.epochs or () if e <= epoch]
        return past[-1] if past else None

    def sparsity_at(self, epoch: int) -> float:
        if not is_int(epoch):
            raise TypeError(f"`epoch` must be an int, got {epoch!r}.")
        epochs = tuple(self.epochs or ())
        index = sum(1 for e in epochs if e <= epoch) - 1
        return 0.0 if index < 0 else float(self.sparsities[index])

    def _interpolate(self, progress: float) -> float:  # pragma: no cover - sparsity_at is overridden
        raise NotImplementedError


SCHEDULES: dict[str, type[SparsitySchedule]] = {
    "one_shot": OneShotSchedule,
    "linear": LinearSchedule,
    "cubic": CubicSchedule,
    "exponential": ExponentialSchedule,
    "iterative": IterativeSchedule,
}


def build_schedule(
    name: str,
    *,
    sparsity: float,
    start_epoch: int = 0,
    end_epoch: int | None = None,
    every_n_epochs: int = 1,
) -> SparsitySchedule:
    """Build a schedule by name.

    ``"iterative"`` by name spaces pruning epochs ``every_n_epochs`` apart from ``start_epoch`` to ``end_epoch``
    and removes the same share of the remaining weights at each (absolute targets, like
    :class:`ExponentialSchedule`); pass an :class:`IterativeSchedule` for an explicit list.

    Example:
        >>> build_schedule("linear", sparsity=0.5, start_epoch=0, end_epoch=1).sparsity_at(1)
        0.5
    """
    if name not in SCHEDULES:
        raise ValueError(
            f"Unknown schedule {name!r}; expected one of {sorted(SCHEDULES)} or a SparsitySchedule object."
        )
    check_sparsity(sparsity, "sparsity")
    if name == "iterative":
        check_int("start_epoch", start_epoch, 0)
        check_int("every_n_epochs", every_n_epochs, 1)
        if end_epoch is None:
            raise ValueError("the 'iterative' schedule by name needs `end_epoch`; or pass an IterativeSchedule.")
        shape = ExponentialSchedule(sparsity, start_epoch, end_epoch, every_n_epochs)
        epochs = shape.pruning_epochs()
        # The first step already removes a share; an iterative schedule never starts with a no-op step.
        steps = len(epochs)
        targets = tuple(1.0 - (1.0 - sparsity) ** ((i + 1) / steps) for i in range(steps))
        targets = (*targets[:-1], sparsity)
        return IterativeSchedule(sparsities=targets, epochs=tuple(epochs))
    return SCHEDULES[name](
        final_sparsity=sparsity, start_epoch=start_epoch, end_epoch=end_epoch, every_n_epochs=every_n_epochs
    )
