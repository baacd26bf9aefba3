"""Gradient criteria: first-order Taylor and Fisher (Optimal Brain Damage) importance.

Both read the gradients training already computes, once per optimizer step, and need no extra forward or
backward pass: call :meth:`~lightning_prune.criteria.base.Importance.observe` right before ``optimizer.step()``,
when the gradients are final (accumulated over micro-batches, unscaled under AMP, averaged over DDP ranks).
Because DDP averages the gradients before the step, every rank accumulates the same statistics and
:meth:`~lightning_prune.criteria.base.Importance.reduce_` has nothing to do.

Sharded parameters (FSDP2, :class:`~lightning_prune.masks.sharded.ShardedMaskSet`): FSDP2 reduce-scatters the
gradients, so after backward each rank's gradient shard is the data-parallel mean of its rows, as under DDP. The
statistics are accumulated on the local shards (one float per weight this rank holds) and equal the rows of DDP's;
scores are of the local shards. Whether a step is skipped for a non-finite gradient, and whether statistics are
finite, is decided by every rank together.

A step whose gradients hold NaN or infinity is skipped, as ``torch.amp.GradScaler`` skips the optimizer step
then (fp16 loss scaling overflows on some steps); it is counted in :attr:`GradientImportance.skipped`. Scoring
without any recorded step is a ``ValueError`` that says what to change.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.masks import MaskSet, prunable_parameters
    >>> from lightning_prune.structures import Unstructured
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> masks = MaskSet(prunable_parameters(net))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> taylor = TaylorImportance(batches=3)
    >>> taylor.start(net, masks)
    >>> for _ in range(5):  # the window closes by itself after 3 steps
    ...     opt.zero_grad()
    ...     net(torch.randn(16, 4)).square().mean().backward()
    ...     _ = taylor.observe(masks)  # right before the step
    ...     opt.step()
    >>> taylor.stop()
    >>> taylor.steps, taylor.ready
    (3, True)
    >>> Unstructured().prune_(masks, taylor, sparsity=0.5)
    >>> masks.sparsity()
    0.5
    >>> taylor.reset()  # frees the statistics (one float per masked weight)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_prune._helpers import is_int
from lightning_prune.criteria.base import STATE_VERSION, AllReduce, StatisticsImportance
from lightning_prune.masks.maskset import MaskSet, local_shard

if TYPE_CHECKING:
    from lightning_prune.masks.channels import ChannelGroup, ChannelMaskSet


class GradientImportance(StatisticsImportance):
    """Base of the criteria that accumulate a per-entry statistic of the gradients over a window of steps.

    Subclasses say what a step adds (:meth:`_accumulate_`) and how the mean statistic becomes a score
    (:meth:`_score`). Scores of single entries come from :meth:`__call__`; a channel's score is the sum of the
    scores of every entry it owns (:meth:`channel_scores`).

    Args:
        batches: the optimizer steps to collect over; later steps are not recorded until :meth:`reset`.
    """

    collects = "gradients"
    scores_channels = True

    def __init__(self, batches: int = 16) -> None:
        super().__init__(batches)
        self._stats: dict[str, Tensor] = {}
        self._seen: set[str] = set()
        self._skipped = 0
        self._non_finite: str | None = None
        self._bound: MaskSet | None = None  # the masks the accumulators were last checked against

    @property
    def skipped(self) -> int:
        """Steps not recorded because their gradients held NaN or infinity."""
        return self._skipped

    # ------------------------------------------------------------------ protocol
    def start(self, module: nn.Module, masks: MaskSet) -> None:
        """Open a window: allocate one accumulator per masked parameter (or check loaded ones fit ``masks``)."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        self._bind(masks)
        self._collecting = True

    @torch.no_grad()
    def observe(self, masks: MaskSet) -> bool:
        """Add this step's gradients of the masked parameters (``p.grad``, read now).

        Returns False, recording nothing, outside a window, once :attr:`batches` steps are recorded, when no
        masked parameter has a gradient (call it after ``backward()`` and before ``zero_grad()``), or when a
        gradient holds NaN or infinity (the step is counted in :attr:`skipped`). A parameter without a
        gradient in a recorded step contributes zero for that step.
        """
        if not self._collecting or self.ready:
            return False
        self._bind(masks)
        present = [
            (n, local_shard(p).detach(), local_shard(p.grad))
            for n, p in zip(masks.names, masks.params)
            if p.grad is not None
        ]
        if not present:
            return False
        bad = _first_non_finite([g for _, _, g in present], [n for n, _, _ in present])
        if masks.any_process(bad is not None):  # shards: a non-finite entry on one rank skips the step on all
            self._skipped += 1
            self._non_finite = self._non_finite or bad
            return False
        for name, param, grad in present:
            self._accumulate_(self._stats[name], param, grad)
            self._seen.add(name)
        self._steps += 1
        return True

    def stop(self) -> None:
        self._collecting = False

    def reduce_(self, all_reduce: AllReduce) -> None:
        """Nothing to do: DDP averages the gradients before the optimizer step, so the statistics are already
        the same on every rank."""

    def reset(self) -> None:
        """Forget the statistics and free their memory; an open window stays open."""
        self._stats = {}
        self._bound = None
        self._seen = set()
        self._steps = 0
        self._skipped = 0
        self._non_finite = None

    def state_dict(self) -> dict[str, Any]:
        """``criterion``, ``version``, ``steps``, ``skipped``, ``non_finite`` (the first layer with a
        non-finite gradient), ``seen`` (parameters that received a gradient) and ``stats`` (the per-entry sums,
        as CPU tensors by parameter name)."""
        return {
            "criterion": self.criterion,
            "version": STATE_VERSION,
            "steps": self._steps,
            "skipped": self._skipped,
            "non_finite": self._non_finite,
            "seen": sorted(self._seen),
            "stats": {n: t.detach().cpu().clone() for n, t in self._stats.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], masks: MaskSet | None = None) -> None:
        """Restore :meth:`state_dict`; the statistics move to the parameters' device when the window opens.

        Raises:
            ValueError: another criterion's state, a malformed one, or (with ``masks``, else at :meth:`start`)
                statistics that do not fit the masked parameters' names and shapes.
        """
        if isinstance(state, Mapping) and not state:
            self.reset()
            return
        steps = self._check_state(state)
        stats = state.get("stats")
        if not isinstance(stats, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) and v.is_floating_point() for k, v in stats.items()
        ):
            raise ValueError(
                f"Saved {self.criterion} statistics must map parameter names to float tensors, got {stats!r}."
            )
        seen = state.get("seen", [])
        if not isinstance(seen, (list, tuple)) or not set(seen) <= set(stats):
            raise ValueError(f"Saved {self.criterion} statistics name unknown parameters in `seen`: {seen!r}.")
        skipped = state.get("skipped", 0)
        if not is_int(skipped) or skipped < 0:
            raise ValueError(f"Saved {self.criterion} statistics have an invalid `skipped` count {skipped!r}.")
        self._stats = {k: v.detach().clone() for k, v in stats.items()}
        self._bound = None
        self._seen = set(seen)
        self._steps = steps
        self._skipped = skipped
        non_finite = state.get("non_finite")
        self._non_finite = non_finite if isinstance(non_finite, str) else None
        if masks is not None:
            self._bind(masks)

    # ------------------------------------------------------------------ scores
    def __call__(self, name: str, param: Tensor) -> Tensor:
        """The score of every entry of ``param`` from the statistics of the steps recorded.

        Raises:
            ValueError: no step was recorded, ``name`` has no statistics or received no gradient in any
                recorded step, or its statistics are not finite.
        """
        return self._score(self._mean(name, param), param.detach())

    def channel_scores(self, masks: ChannelMaskSet, group: ChannelGroup) -> Tensor:
        """The sum of the scores of every entry each channel of ``group`` owns (float64, on the CPU): the
        producers' rows and biases, BatchNorm gamma and beta, the consumers' input columns."""
        sums = torch.zeros(group.channels, dtype=torch.float64)
        scores: dict[str, Tensor] = {}
        for s in group.slices:
            if s.param not in scores:
                scores[s.param] = self(s.param, masks.param(s.param))
            sums.index_add_(0, s.root, s.rows(scores[s.param]).to(torch.float64).sum(1).cpu())
        return sums

    def _accumulate_(self, total: Tensor, param: Tensor, grad: Tensor) -> None:
        raise NotImplementedError

    def _score(self, mean: Tensor, param: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _bind(self, masks: MaskSet) -> None:
        """Allocate the accumulators for ``masks``, or check that those held fit it (and move them to the
        parameters' devices)."""
        if not isinstance(masks, MaskSet):
            raise TypeError(f"`masks` must be a MaskSet, got {type(masks).__name__}.")
        if masks is self._bound and self._stats:
            return  # checked already (a MaskSet's parameters never change)
        self._bound = masks
        shards = [local_shard(p) for p in masks.params]  # the statistics of sharded parameters are the shards'
        if not self._stats:
            self._stats = {
                n: torch.zeros(p.shape, dtype=_accumulator_dtype(p), device=p.device)
                for n, p in zip(masks.names, shards)
            }
            return
        names = set(masks.names)
        missing = [n for n in masks.names if n not in self._stats]
        unexpected = [n for n in self._stats if n not in names]
        if missing or unexpected:
            self._bound = None
            raise ValueError(
                f"The {self.criterion} statistics do not fit the masked parameters: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. They were collected (or saved) for another model, `ignore` or "
                "`structure`; call reset() to collect afresh."
            )
        for n, p in zip(masks.names, shards):
            held = self._stats[n]
            if held.shape != p.shape:
                self._bound = None
                raise ValueError(
                    f"The {self.criterion} statistics of {n!r} have shape {tuple(held.shape)}, the parameter "
                    f"{tuple(p.shape)}. They were collected for another model; call reset() to collect afresh."
                )
            if held.device != p.device:
                self._stats[n] = held.to(p.device)

    def _mean(self, name: str, param: Tensor) -> Tensor:
        if self._steps == 0:
            raise ValueError(self._no_statistics(name))
        held = self._stats.get(name)
        if held is None:
            raise ValueError(
                f"{self!r} has no statistics for {name!r}; it collected them for {sorted(self._stats)[:5]}. Score "
                "the masks it observed."
            )
        if held.shape != param.shape:
            raise ValueError(
                f"The {self.criterion} statistics of {name!r} have shape {tuple(held.shape)}, the parameter "
                f"{tuple(param.shape)}."
            )
        if name not in self._seen:
            raise ValueError(
                f"{name!r} received no gradient in the {self._steps} step(s) {self.criterion} observed (is it "
                f"frozen, or unused by the loss?), so {self.criterion} cannot score it. Add its layer to `ignore` "
                "or use importance='magnitude'."
            )
        finite = bool(torch.isfinite(held).all())
        if self._bound is not None:  # shards: every rank raises together (scoring runs on every rank in step)
            finite = not self._bound.any_process(not finite)
        if not finite:
            raise ValueError(
                f"The {self.criterion} statistics of {name!r} are not finite (the accumulated gradients overflowed); "
                "the masks were not changed. Lower the learning rate or clip gradients, or use importance='magnitude'."
            )
        return held.to(param.device) / self._steps

    def _no_statistics(self, name: str) -> str:
        head = f"{self!r} cannot score {name!r}: it has no gradient statistics"
        if self._skipped:
            return (
                f"{head}; every one of the {self._skipped} step(s) it observed had NaN or infinite gradients "
                f"(first in {self._non_finite!r}). Training diverged, or the loss scale overflowed on every step: "
                "lower the learning rate, clip gradients or check the data."
            )
        return (
            f"{head} yet. They come from the gradients of training steps, and none was recorded: with "
            "PruningCallback, start pruning at least one epoch after training starts (`start_epoch` >= 1), so that "
            "an epoch of steps precedes it; in a plain loop, call start(model, masks), then observe(masks) after "
            "each backward() and before optimizer.step(), then stop(), before pruning. Or use "
            "importance='magnitude', which needs no data."
        )


class TaylorImportance(GradientImportance):
    """First-order Taylor importance ``|w * dL/dw|`` (Molchanov et al., 2019, "Importance Estimation for
    Neural Network Pruning", CVPR), averaged over ``batches`` optimizer steps.

    The score of an entry is the mean over the recorded steps t of ``|w_t * g_t|``, with ``w_t`` its value
    and ``g_t`` its final gradient at step t: the first-order estimate of how much the loss changes when the
    entry is set to zero. Averaging each step's absolute contribution, rather than multiplying by the mean
    gradient, keeps entries whose gradient changes sign from step to step (the mean gradient of a trained
    network is close to zero). Molchanov et al. square the contribution; the absolute value, as in
    Torch-Pruning, ranks the entries of one step the same way and keeps scores in units of the loss.

    A channel scores the sum over every entry it owns (producer rows and biases, BatchNorm gamma and beta,
    consumer input columns): Torch-Pruning's group aggregation. Molchanov et al.'s group criterion squares the
    signed sum of ``w * g`` instead, in which contributions of opposite sign cancel: for a convolution followed
    by BatchNorm the signed sum over the convolution's rows is exactly zero whatever the channel's importance
    (BatchNorm makes the loss invariant to scaling them). All entries are in units of the loss, so entries of
    every kind add up. With ``scope="global"`` each group's scores are divided by their mean, as for norms.

    Cost: memory, one float32 accumulator per masked weight (float64 for float64 weights), allocated by
    :meth:`start` and freed by :meth:`reset`. Time, per recorded step, one multiply-abs-add pass over the
    masked weights and their gradients and one sum of each gradient (a single synchronisation); nothing
    once the window is full, and no extra forward or backward pass.

    Args:
        batches: the optimizer steps to average over.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune.masks import MaskSet, prunable_parameters
        >>> net = nn.Sequential(nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
        >>> masks = MaskSet(prunable_parameters(net))
        >>> taylor = TaylorImportance(batches=1)
        >>> taylor.start(net, masks)
        >>> net(torch.tensor([[3.0, 1.0]])).sum().backward()  # dL/dw = x = [3, 1]
        >>> taylor.observe(masks)
        True
        >>> taylor("0.weight", net[0].weight).tolist()  # |w * g|
        [[3.0, 2.0]]
    """

    criterion = "taylor"

    def _accumulate_(self, total: Tensor, param: Tensor, grad: Tensor) -> None:
        total.add_(torch.mul(param, grad).abs_())

    def _score(self, mean: Tensor, param: Tensor) -> Tensor:
        return mean


class FisherImportance(GradientImportance):
    """Second-order saliency ``1/2 * F * w^2`` with the diagonal empirical Fisher ``F = mean_t g_t^2``
    (Optimal Brain Damage, LeCun, Denker & Solla, 1990, NeurIPS).

    OBD estimates the loss increase from deleting an entry at a minimum as ``1/2 * h * w^2``, ``h`` the
    Hessian's diagonal entry; the empirical Fisher, the mean of the squared gradients, approximates it from
    the gradients training computes anyway (those of the mini-batch loss: per-sample gradients would need a
    backward pass per sample). ``w`` is the entry's value when scoring. Under OBD's diagonal approximation the
    saliency of deleting several entries is the sum of theirs, so a channel scores the summed saliency of
    every entry it owns (producer rows and biases, BatchNorm gamma and beta, consumer input columns).

    Cost: as :class:`TaylorImportance`: one float32 accumulator per masked weight, one fused
    multiply-add of the squared gradient per recorded step, no extra pass.

    Args:
        batches: the optimizer steps to average the squared gradients over.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune.masks import MaskSet, prunable_parameters
        >>> net = nn.Sequential(nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
        >>> masks = MaskSet(prunable_parameters(net))
        >>> fisher = FisherImportance(batches=1)
        >>> fisher.start(net, masks)
        >>> net(torch.tensor([[3.0, 1.0]])).sum().backward()  # g = [3, 1]
        >>> fisher.observe(masks)
        True
        >>> fisher("0.weight", net[0].weight).tolist()  # 1/2 * g^2 * w^2
        [[4.5, 2.0]]
    """

    criterion = "fisher"

    def _accumulate_(self, total: Tensor, param: Tensor, grad: Tensor) -> None:
        total.addcmul_(grad, grad)

    def _score(self, mean: Tensor, param: Tensor) -> Tensor:
        return mean.mul_(param.to(mean.dtype).square()).mul_(0.5)


def _accumulator_dtype(param: Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _first_non_finite(grads: Sequence[Tensor], names: Sequence[str]) -> str | None:
    """The name of the first gradient holding NaN or infinity, or None; one synchronisation per device.

    A tensor's sum is finite when all its entries are (a sum of finite entries that overflows is checked entry
    by entry), and one reduction per gradient is the cheapest check (a max-norm costs several times more).
    """
    sums = [g.sum(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32) for g in grads]
    by_device: dict[torch.device, list[Tensor]] = {}
    for total in sums:
        by_device.setdefault(total.device, []).append(total)
    if all(bool(torch.isfinite(torch.stack(totals)).all()) for totals in by_device.values()):
        return None
    return next((n for n, g in zip(names, grads) if not bool(torch.isfinite(g).all())), None)
