"""Importance criteria: a score per prunable entry, higher meaning more important.

An importance is a callable ``importance(name, param) -> scores`` returning a tensor shaped like ``param``
(Torch-Pruning's convention: importance is decoupled from how entries are then selected). A *pointwise*
criterion, whose score of an entry depends only on that entry, also offers :meth:`Importance.transform_`
so that the exact selection can score chunk by chunk without materialising a full copy of the scores.

Criteria that need data besides the weights collect it through a small statistics protocol that every
:class:`Importance` has (no-ops for the weight-only ``magnitude``, ``l1`` and ``l2``):

=====================================  ==========================================================================
``collects``                           ``"nothing"``, ``"gradients"`` (``taylor``, ``fisher``) or ``"activations"``
                                       (``apoz``, ``activation``)
``batches``                            the optimizer steps a collection window wants (0: none)
``start(module, masks)``               open a window (activation criteria install forward hooks here)
``observe(masks)``                     once per optimizer step, right before ``optimizer.step()``: gradient
                                       criteria read ``p.grad`` of the masked parameters, activation criteria
                                       close the step; ``True`` when the step was recorded
``stop()``                             close the window and remove every hook (idempotent)
``reduce_(all_reduce)``                sum statistics that differ per process over all ranks
``steps`` / ``ready`` / ``collecting``  steps recorded, ``steps >= batches``, whether a window is open
``reset()``                            forget the statistics (and free their memory)
``state_dict()`` / ``load_state_dict``  the statistics as CPU tensors, for checkpoints
=====================================  ==========================================================================

Example:
    >>> import torch
    >>> from lightning_prune.criteria import MagnitudeImportance
    >>> MagnitudeImportance()("fc.weight", torch.tensor([-3.0, 0.5])).tolist()
    [3.0, 0.5]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn

from lightning_prune._helpers import is_int

if TYPE_CHECKING:
    from lightning_prune.masks.channels import ChannelGroup, ChannelMaskSet
    from lightning_prune.masks.maskset import MaskSet


#: What a criterion needs besides the weights.
Collects = Literal["nothing", "gradients", "activations"]


#: ``all_reduce(tensor)``: sums ``tensor`` over every process, in place, or returns the sum (e.g.
#: ``torch.distributed.all_reduce`` or :func:`lightning_prune.masks.distributed.all_reduce_sum_`).
AllReduce = Callable[[Tensor], Any]


#: The version of the statistics' :meth:`Importance.state_dict` layout.
STATE_VERSION = 1


class Importance(ABC):
    """Base class of importance criteria, with the statistics protocol (no-ops here, for weight-only criteria).

    A criterion that scores single entries implements :meth:`__call__`; one that scores the channels of a
    :class:`~lightning_prune.structures.channel.ChannelStructure` group itself sets :attr:`scores_channels` and
    implements :meth:`channel_scores`. The protocol methods are documented in the module docstring.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune.masks import MaskSet, prunable_parameters
        >>> net = nn.Linear(3, 2)
        >>> masks = MaskSet(prunable_parameters(nn.Sequential(net)))
        >>> from lightning_prune.criteria import MagnitudeImportance
        >>> magnitude = MagnitudeImportance()
        >>> magnitude.start(net, masks); magnitude.observe(masks), magnitude.ready, magnitude.state_dict()
        (False, True, {})
    """

    #: True when the score of an entry depends only on that entry's value (enables chunked scoring).
    pointwise: bool = False
    #: What the criterion needs besides the weights.
    collects: Collects = "nothing"
    #: False for criteria that score whole channels only and cannot score single weights (``apoz``).
    scores_entries: bool = True
    #: True when :meth:`channel_scores` scores the channels of a channel group itself (not through a norm).
    scores_channels: bool = False

    @abstractmethod
    def __call__(self, name: str, param: Tensor) -> Tensor:
        """Scores shaped like ``param``; entries with the lowest scores are pruned first."""

    def transform_(self, values: Tensor) -> object:
        """Turn a flat float chunk of parameter values into scores, in place (pointwise criteria only)."""
        raise NotImplementedError(f"{type(self).__name__} is not pointwise")

    def channel_scores(self, masks: ChannelMaskSet, group: ChannelGroup) -> Tensor:
        """One float64 CPU score per channel of ``group`` (criteria with :attr:`scores_channels` only)."""
        raise NotImplementedError(f"{type(self).__name__} does not score channels itself")

    # ------------------------------------------------------------------ statistics protocol (no-ops)
    @property
    def batches(self) -> int:
        """The optimizer steps a collection window wants; 0 for criteria that need no data."""
        return 0

    @property
    def steps(self) -> int:
        """The optimizer steps recorded since the last :meth:`reset`."""
        return 0

    @property
    def ready(self) -> bool:
        """True once :attr:`batches` steps are recorded (always, for criteria that need no data)."""
        return self.steps >= self.batches

    @property
    def collecting(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return False

    def start(self, module: nn.Module, masks: MaskSet) -> None:
        """Open a collection window on ``module``, whose parameters ``masks`` masks; statistics collected so far
        are kept (call :meth:`reset` first for a fresh window)."""
        return None

    def observe(self, masks: MaskSet) -> bool:
        """Record one optimizer step; call it right before ``optimizer.step()``, with final gradients. Returns
        whether the step was recorded (never outside a window, nor once the window is full)."""
        return False

    def stop(self) -> None:
        """Close the window and remove every hook; the statistics stay for scoring."""
        return None

    def reduce_(self, all_reduce: AllReduce) -> None:
        """Sum the statistics that differ per process over all ranks, so that every rank scores the same."""
        return None

    def reset(self) -> None:
        """Forget every statistic collected."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The statistics collected so far, as CPU tensors (empty for criteria that need no data)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any], masks: MaskSet | None = None) -> None:
        """Restore :meth:`state_dict`; with ``masks``, check now that the statistics fit them.

        Raises:
            ValueError: the state is not this criterion's, or does not fit ``masks``.
        """
        if state:
            raise ValueError(
                f"{self!r} collects no statistics, but the saved state holds {sorted(state)}. It was saved by "
                f"another criterion ({state.get('criterion', 'unknown')!r}): resume with that `importance`."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StatisticsImportance(Importance):
    """Base of the criteria that collect statistics over a window of optimizer steps (``taylor``,
    ``fisher``, ``apoz``, ``activation``): the window, the step count and the checkpoint framing.

    Args:
        batches: the optimizer steps to collect over, an integer >= 1.

    Example:
        >>> from lightning_prune.criteria.gradient import TaylorImportance
        >>> taylor = TaylorImportance(batches=4)
        >>> isinstance(taylor, StatisticsImportance), taylor.batches, taylor.steps, taylor.ready
        (True, 4, 0, False)
    """

    #: The criterion's name in :data:`IMPORTANCES`; recorded in :meth:`state_dict`.
    criterion: str = ""

    def __init__(self, batches: int = 16) -> None:
        if not is_int(batches) or batches < 1:
            raise ValueError(
                f"`batches` must be an integer >= 1 (the optimizer steps to collect statistics over), got "
                f"{batches!r}. Hint: 16 steps are usually enough; more average out noisier batches."
            )
        self._batches = int(batches)
        self._steps = 0
        self._collecting = False

    @property
    def batches(self) -> int:
        return self._batches

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def collecting(self) -> bool:
        return self._collecting

    def _check_state(self, state: Mapping[str, Any]) -> int:
        """Check the framing of a saved state; returns its step count."""
        if not isinstance(state, Mapping):
            raise ValueError(f"Saved {self.criterion} statistics must be a mapping, got {type(state).__name__}.")
        saved = state.get("criterion")
        if saved != self.criterion:
            raise ValueError(
                f"The saved statistics were collected by {saved!r}, not {self.criterion!r}: resume with the "
                "`importance` the run was started with, or start a new run."
            )
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Saved {self.criterion} statistics have layout version {state.get('version')!r}; this version "
                f"reads {STATE_VERSION}."
            )
        steps = state.get("steps")
        if not is_int(steps) or steps < 0:
            raise ValueError(f"Saved {self.criterion} statistics have an invalid step count {steps!r}.")
        return steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batches={self._batches})"
