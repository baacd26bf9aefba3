"""Argument checks and routing of :class:`~lightning_prune.callbacks.pruning.PruningCallback`: each error names the
argument, the value and what to change, as a ``MisconfigurationException``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_prune._helpers import is_int
from lightning_prune.criteria import build_importance
from lightning_prune.criteria.base import Importance
from lightning_prune.schedules import SCHEDULES, SparsitySchedule


def _non_finite(epoch: int, when: str, names: Sequence[str]) -> MisconfigurationException:
    """The error for masked parameters that hold NaN or infinity: the masks are never computed from, nor kept on,
    diverged weights."""
    return MisconfigurationException(
        f"PruningCallback at epoch {epoch} ({when}): non-finite weights (NaN or inf) in {list(names)}; training "
        "diverged, e.g. from non-finite gradients. The masks were left as they were. Lower the learning rate, clip "
        "gradients (`Trainer(gradient_clip_val=...)`) or check the data, then resume from the last good checkpoint."
    )


def _resolve_importance(importance: object, batches: int | None) -> Importance:
    built: Importance = _misconfig(build_importance, importance)
    if batches is None:
        return built
    if not isinstance(importance, str):
        raise MisconfigurationException(
            f"`importance_batches` applies to an importance given by name; set it on {importance!r} itself."
        )
    if built.collects == "nothing":
        raise MisconfigurationException(
            f"`importance_batches` applies to the criteria that collect statistics ('taylor', 'fisher', 'apoz', "
            f"'activation'), not to importance={importance!r}."
        )
    return _misconfig(type(built), batches)


def _check_rewind_epoch(rewind_epoch: object, first: int) -> int | None:
    """``first``: the schedule's first pruning epoch (``start_epoch`` for every schedule)."""
    if rewind_epoch is None:
        return None
    if not is_int(rewind_epoch) or rewind_epoch < 0:
        raise MisconfigurationException(f"`rewind_epoch` must be an integer >= 0 or None, got {rewind_epoch!r}.")
    if rewind_epoch > first:
        raise MisconfigurationException(
            f"`rewind_epoch`={rewind_epoch} is after the first pruning step (epoch {first}): the weights to rewind to "
            f"must be stored before pruning starts. Use an epoch <= {first} (0 rewinds to the initial weights)."
        )
    return rewind_epoch


#: ``PruningCallback``'s defaults of the schedule's arguments; ``None`` means the same.
SCHEDULE_DEFAULTS: dict[str, int] = {"start_epoch": 0, "every_n_epochs": 1}


def _schedule_args(
    schedule: object,
    sparsity: float,
    start_epoch: int | None,
    end_epoch: int | None,
    every_n_epochs: int | None,
) -> dict[str, Any]:
    """The schedule's arguments, with the callback's defaults; for a schedule object, its own (contradicting
    arguments are refused)."""
    given = {"start_epoch": start_epoch, "end_epoch": end_epoch, "every_n_epochs": every_n_epochs}
    if isinstance(schedule, SparsitySchedule):
        # The signature's defaults stand for "the schedule's own": only other values can contradict it.
        given = {k: None if v == SCHEDULE_DEFAULTS.get(k) else v for k, v in given.items()}
        own = {
            "sparsity": schedule.final_sparsity,
            "start_epoch": schedule.start_epoch,
            "end_epoch": schedule.end_epoch,
            "every_n_epochs": schedule.every_n_epochs,
        }
        clashes = {k: (v, own[k]) for k, v in {**given, "sparsity": sparsity}.items() if v is not None and v != own[k]}
        if clashes:
            detail = ", ".join(f"`{k}`={v!r} but the schedule has {o!r}" for k, (v, o) in clashes.items())
            raise MisconfigurationException(
                f"PruningCallback got a schedule object and contradicting arguments: {detail}. "
                "Set them on the schedule object only."
            )
        return own
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise MisconfigurationException(
            f"`schedule` must be one of {sorted(SCHEDULES)} or a SparsitySchedule object, got {schedule!r}."
        )
    return {
        "sparsity": sparsity,
        "start_epoch": SCHEDULE_DEFAULTS["start_epoch"] if start_epoch is None else start_epoch,
        "end_epoch": end_epoch,
        "every_n_epochs": SCHEDULE_DEFAULTS["every_n_epochs"] if every_n_epochs is None else every_n_epochs,
    }


def _misconfig(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` and turn the core's ``ValueError``/``TypeError`` into a ``MisconfigurationException``."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise MisconfigurationException(f"PruningCallback: {err}") from err


def _check_schedule_fits(
    schedule: SparsitySchedule, start: int, sparsity: float, importance: Importance, max_epochs: int | None
) -> None:
    """Refuse a criterion that needs statistics of training steps when pruning starts at epoch 0; warn when the
    Trainer stops before the schedule starts or ends (``max_epochs``).

    Raises:
        MisconfigurationException: ``importance`` collects statistics and the first pruning step is at epoch 0.
    """
    if importance.collects != "nothing" and schedule.first_nonzero_epoch() == 0:
        raise MisconfigurationException(
            f"PruningCallback: {importance!r} scores from {importance.collects} that training computes, "
            "but the first pruning step is at epoch 0, before any training step. Start pruning at epoch 1 or "
            "later (`start_epoch`), or use importance='magnitude'."
        )
    if max_epochs is None or max_epochs < 1:
        return
    end = schedule.end_epoch
    if max_epochs <= start:
        rank_zero_warn(
            f"PruningCallback: `start_epoch`={start}, but the Trainer stops after epoch {max_epochs - 1} "
            f"(`max_epochs`={max_epochs}): nothing will be pruned. Lower `start_epoch` or raise `max_epochs`."
        )
    elif end is not None and end >= max_epochs:
        rank_zero_warn(
            f"PruningCallback: the schedule ends at epoch {end} but the Trainer stops after epoch "
            f"{max_epochs - 1}; the final sparsity {sparsity} will not be reached."
        )
