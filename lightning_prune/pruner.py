"""The plain-PyTorch pruning engine: masks, structure, importance and targets in one object.

A :class:`Pruner` binds to a model once (that is when its targets are matched to the model's layers), grows its
masks to whatever sparsity it is asked for, keeps pruned weights and their optimizer state exactly zero while
training goes on, rewinds surviving weights when asked to, and saves all of it in its ``state_dict``. It knows
nothing of epochs or Lightning: a training loop, or :class:`~lightning_prune.callbacks.PruningCallback`, asks a
:mod:`schedule <lightning_prune.schedules>` for the target and hands it over.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.schedules import CubicSchedule
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> pruner = Pruner(sparsity=0.75, ignore=["2"])  # the classifier stays dense
    >>> _ = pruner.bind(model)
    >>> pruner.attach([optimizer])
    >>> schedule = CubicSchedule(final_sparsity=pruner.sparsity, start_epoch=1, end_epoch=3)
    >>> for epoch in range(5):
    ...     _ = pruner.prune(schedule.sparsity_at(epoch))
    ...     for _ in range(4):
    ...         optimizer.zero_grad()
    ...         model(torch.randn(8, 8)).square().mean().backward()
    ...         optimizer.step()
    >>> pruner.achieved_sparsity
    0.75
    >>> all(bool((p[~m] == 0).all()) for p, m in zip(pruner.masks.params, pruner.masks.masks))
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune._helpers import check_sparsity
from lightning_prune.criteria import build_importance
from lightning_prune.criteria.base import Importance
from lightning_prune.masks.distributed import all_reduce_sum_, broadcast_masks_, is_rank_zero
from lightning_prune.masks.maskset import REMASK_POLICIES, MaskSet, RemaskPolicy, non_finite_parameters
from lightning_prune.masks.params import Prunable, pattern_list
from lightning_prune.rewinding import rewind_, snapshot
from lightning_prune.structures import build_structure
from lightning_prune.structures.base import SCOPES, Scope, Structure, resolve_layer_targets

__all__ = ["DEFAULT_SPARSITY", "NonFiniteWeightsError", "Pruner"]

#: The final sparsity when none is given and the structure has no default of its own (N:M has ``n / m``).
DEFAULT_SPARSITY = 0.9


class NonFiniteWeightsError(ValueError):
    """Masked weights hold NaN or infinity, so no mask is computed from them; :attr:`names` lists them."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        super().__init__(
            f"non-finite weights (NaN or inf) in {self.names}; training diverged, e.g. from non-finite gradients. "
            "The masks were left as they were."
        )


class Pruner:
    """Grows masks to absolute sparsity targets and keeps them exact; the engine under ``PruningCallback``.

    Args:
        sparsity: the final fraction of zeros, in [0, 1): pruned entries for single weights, N:M groups and blocks,
            channels for channel pruning. ``None``: the structure's own default (``n / m`` for N:M), else
            :data:`DEFAULT_SPARSITY`. A mapping ``{layer pattern: sparsity}`` gives per-layer final targets instead
            (patterns as for ``ignore``; the most specific wins; layers no pattern matches stay dense); they are
            matched to the model's layers once, in :meth:`bind`.
        structure: what is removed together: ``"unstructured"``, ``"channel"``, ``"block"``, an ``"N:M"`` pattern or
            a :class:`~lightning_prune.structures.Structure` (with its own options, e.g.
            ``ChannelStructure(round_to=8)``).
        importance: the criterion: ``"magnitude"``, ``"l1"``, ``"l2"``, ``"taylor"``, ``"fisher"``, ``"apoz"``,
            ``"activation"`` or an :class:`~lightning_prune.criteria.Importance`.
        scope: ``"global"`` (one ranking across layers) or ``"layer"`` (each layer to the target on its own).
            ``None``: ``"layer"`` with per-layer targets, else ``"global"``.
        ignore: module-name patterns whose weights stay dense (``fnmatch``, matching a name or a dotted suffix).
            Frozen weights (``requires_grad=False``) are pruned like the others unless ignored.
        remask: when pruned weights are re-masked and their optimizer state zeroed besides pruning steps:
            ``"auto"`` after every step only of optimizers that can move a weight without its gradient (any
            outside :data:`~lightning_prune.masks.maskset.GRADIENT_ONLY_OPTIMIZERS`), ``"always"`` after every
            step, ``"pruning_steps"`` never (see :meth:`~lightning_prune.masks.maskset.MaskSet.attach`).
        prunable: what is prunable, when not the default weight matrices (Linear, convolution, Hugging Face
            ``Conv1D`` and ``nn.MultiheadAttention`` projections): a
            :class:`~lightning_prune.masks.params.Prunable` that adds or restricts by module type, parameter-name
            pattern or predicate, and opts embeddings in. For the structures that mask parameters (unstructured,
            block, N:M); channels and heads find their own groups.

    Raises:
        ValueError: a bad sparsity, scope, structure, importance, pattern or ``remask``, or an importance the
            structure cannot use.
    """

    def __init__(
        self,
        sparsity: float | Mapping[str, float] | None = None,
        structure: str | Structure = "unstructured",
        importance: str | Importance = "magnitude",
        scope: Scope | None = None,
        ignore: Sequence[str] = (),
        remask: RemaskPolicy = "auto",
        prunable: Prunable | None = None,
    ) -> None:
        self.structure: Structure = build_structure(structure)
        if prunable is not None and not isinstance(prunable, Prunable):
            raise TypeError(
                f"`prunable` must be a lightning_prune.masks.Prunable or None, got {type(prunable).__name__} "
                f"{prunable!r}."
            )
        if prunable is not None and not self.structure.selects_parameters:
            raise ValueError(
                f"`prunable`={prunable!r} selects the parameters of structures that mask parameters ('unstructured', "
                f"'block', 'N:M'), but {self.structure!r} finds its own groups. Leave `prunable` unset, or use "
                "`ignore` to keep layers whole."
            )
        #: What is prunable, when not the defaults (see :class:`~lightning_prune.masks.params.Prunable`).
        self.prunable: Prunable | None = prunable
        self.importance: Importance = build_importance(importance)
        self.structure.check_importance(self.importance)
        #: Per-layer final targets ``{pattern: sparsity}``, or None for one sparsity for all layers.
        self.layer_targets: dict[str, float] | None = None
        if isinstance(sparsity, Mapping):
            self.layer_targets = _check_layer_targets(sparsity)
            final = max(self.layer_targets.values())
        elif sparsity is None:
            default = self.structure.default_sparsity
            final = DEFAULT_SPARSITY if default is None else default
        else:
            final = check_sparsity(sparsity)
        #: The final sparsity (with per-layer targets given here, the largest of them): what a schedule ramps up to;
        #: per-layer targets scale with ``target / sparsity``.
        self.sparsity: float = final
        if scope is None:
            scope = "layer" if self.layer_targets is not None else "global"
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {list(SCOPES)}, got {scope!r}.")
        if self.layer_targets is not None and scope != "layer":
            raise ValueError(
                f"Per-layer targets (`sparsity`={self.layer_targets!r}) prune every layer to its own target, which "
                f"contradicts `scope`={scope!r}. Leave `scope` unset (or 'layer')."
            )
        self.scope: Scope = scope
        self.ignore: tuple[str, ...] = pattern_list(ignore)
        if remask not in REMASK_POLICIES:
            raise ValueError(
                f"`remask` must be one of {list(REMASK_POLICIES)}, got {remask!r}: 'auto' re-masks after every step "
                "only for optimizers that can move a weight without a gradient, 'always' after every step."
            )
        self.remask: RemaskPolicy = remask
        #: The masks, once bound (:meth:`bind`).
        self.masks: MaskSet | None = None
        #: The module the masks belong to, once bound.
        self.module: nn.Module | None = None
        #: The target the masks have been grown to (0 before the first pruning step).
        self.target = 0.0
        #: The weights surviving weights are rewound to after every pruning step (:meth:`remember`), or None.
        self.rewind_point: dict[str, torch.Tensor] | None = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._step_hook = True
        self._final_per_layer: list[float] | None = None  # the per-layer targets, matched in `bind`

    def __repr__(self) -> str:
        sparsity = self.layer_targets if self.layer_targets is not None else self.sparsity
        return (
            f"Pruner(sparsity={sparsity!r}, structure={self.structure!r}, importance={self.importance!r}, "
            f"scope={self.scope!r}, ignore={list(self.ignore)!r}"
            + (f", prunable={self.prunable!r})" if self.prunable is not None else ")")
        )

    # ------------------------------------------------------------------ binding
    def bind(self, module: nn.Module, example_inputs: Any = None) -> MaskSet:
        """Build the masks of ``module``'s prunable parameters and match the targets to its layers, once.

        Binding to another model than the last one starts afresh (dense masks, no target, no rewind point) and
        warns, so that a pruner reused for a second model prunes it too; binding the same model again keeps the
        masks.

        Args:
            module: the model (a ``LightningModule`` works: names are then e.g. ``model.0.weight``).
            example_inputs: inputs to trace the model with, for structures that need them (channels).

        Raises:
            ValueError: an ``ignore`` pattern matches nothing, the model has nothing to prune, the structure cannot
                trace it, or the targets cannot be reached on it.
        """
        if self.is_bound_to(module):
            return self.masks  # type: ignore[return-value]
        if self.masks is not None and self.target > 0:
            if is_rank_zero():
                warnings.warn(
                    f"The pruner is bound to a new {type(module).__name__}; it was pruning another model up to a "
                    f"target of {self.target:g}. The new model starts dense and is pruned from its first pruning step.",
                    stacklevel=2,
                )
            self.target = 0.0
            self.rewind_point = None
            self.importance.reset()
        self.detach()
        if self.prunable is None:
            masks = self.structure.bind(module, self.ignore, example_inputs)
        else:
            masks = self.structure.bind_prunable(module, self.prunable, self.ignore)
        self._final_per_layer = None
        if self.layer_targets is not None:
            self._final_per_layer = self._resolve(masks, self.layer_targets)
        else:
            self.structure.check_target(masks, self.sparsity, self.scope)
        self.masks, self.module = masks, module
        return masks

    def is_bound_to(self, module: nn.Module) -> bool:
        """True when the masks are ``module``'s: bound to it, and its parameters are still the masked ones."""
        return self.masks is not None and self.module is module and _same_parameters(self.masks, module)

    def set_targets(self, targets: Mapping[str, float]) -> None:
        """Replace the final sparsity with per-layer final targets ``{layer pattern: sparsity}`` (see ``sparsity``),
        before the first pruning step; e.g. an allocation from :func:`lightning_prune.sensitivity.allocate`. Each
        layer reaches its target when :meth:`prune` is asked for :attr:`sparsity`, which stays what the schedule
        ramps up to.

        Raises:
            ValueError: the targets are malformed, match no layer, cannot be reached, or the masks are already grown.
        """
        checked = _check_layer_targets(targets)
        if self.target > 0:
            raise ValueError(
                f"set_targets must be called before the first pruning step; the masks are already grown to a target "
                f"of {self.target:g}."
            )
        if self.masks is not None:
            self._final_per_layer = self._resolve(self.masks, checked)
        self.layer_targets = checked
        self.scope = "layer"

    def _resolve(self, masks: MaskSet, targets: Mapping[str, float]) -> list[float]:
        names = self.structure.layer_names(masks)
        resolved = resolve_layer_targets(names, targets)
        per_layer = [resolved[name] for name in names]
        self.structure.check_target(masks, per_layer, "layer")
        return per_layer

    def targets_for(self, target: float) -> float | list[float]:
        """What :meth:`prune` grows the masks to for the schedule's ``target``: ``target`` itself, or, with per-layer
        targets, each layer's final target scaled by ``target / sparsity`` (in the order of the structure's
        :meth:`~lightning_prune.structures.Structure.layer_names`)."""
        if self._final_per_layer is None:
            return target
        scale = target / self.sparsity if self.sparsity > 0 else 0.0
        return [value * scale for value in self._final_per_layer]

    # ------------------------------------------------------------------ training
    def attach(self, optimizers: Iterable[torch.optim.Optimizer], step_hook: bool = True) -> None:
        """Keep pruned weights exact while ``optimizers`` train: from the first pruning step on (now, if some are
        pruned already), gradients are masked before every step and the weights and optimizer state re-masked as
        :attr:`remask` says.

        Args:
            optimizers: the optimizers that train the model.
            step_hook: mask the gradients in a step pre-hook of each optimizer; False when the training loop calls
                :meth:`mask_gradients` once per step itself (after unscaling, before clipping).
        """
        self._optimizers = list(optimizers)
        self._step_hook = step_hook
        if self.masks is not None and self.masks.num_pruned() > 0:
            self.masks.attach(self._optimizers, self.remask, step_hook)

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned entries in place, once masks are attached (for loops that attach with
        ``step_hook=False``: call it after accumulating and unscaling, before clipping and ``optimizer.step()``)."""
        if self.masks is not None and self.masks.attached:
            self.masks.mask_gradients_()

    def detach(self) -> None:
        """Remove every hook (the masks stay) and close a statistics window."""
        self.importance.stop()
        if self.masks is not None:
            self.masks.detach()

    def remember(self) -> None:
        """Store the bound module's weights (every parameter and buffer, on the CPU): after every later pruning step,
        surviving weights rewind to them and the optimizer state is cleared (lottery-ticket rewinding, Frankle et
        al., 2020)."""
        self._bound()
        self.rewind_point = snapshot(self.module)  # type: ignore[arg-type]

    @torch.no_grad()
    def prune(self, target: float) -> bool:
        """Grow the masks so that ``target`` of the entries are pruned (absolute, never relative to what is left);
        nothing is ever revived, so a target at or below the current one changes nothing.

        Then the masks are made equal on every process (rank 0's win), the weights are rewound when a rewind point
        is stored, and pruned weights, their gradients and optimizer state are zeroed.

        Returns:
            True when the masks grew.

        Raises:
            NonFiniteWeightsError: a masked parameter holds NaN or infinity (the masks are left unchanged).
            ValueError: the structure cannot reach the target.
        """
        check_sparsity(target, "target")
        masks = self._bound()
        if target <= self.target:
            return False
        bad = non_finite_parameters(masks)
        if bad:
            raise NonFiniteWeightsError(bad)
        self.stop_collecting()
        self.structure.prune_(masks, self.importance, self.targets_for(target), self.scope)
        self.importance.reset()  # the statistics served this step; free them
        # Rank 0's masks are every rank's: one differing decision and the ranks would train different networks.
        broadcast_masks_(masks)
        self.target = target
        numel, pruned = masks.entry_counts()  # over the whole tensors, also when sharded
        emptied = [name for name, n, k in zip(masks.names, numel, pruned) if n == k]
        if emptied and is_rank_zero():
            warnings.warn(
                f"Every weight of {emptied} is pruned, so these layers output their bias alone. Bound each layer with "
                "scope='layer' or per-layer targets (`sparsity={pattern: s}`), ignore them, or lower the sparsity.",
                stacklevel=2,
            )
        if self.rewind_point is not None:
            rewind_(self.module, self.rewind_point, masks, self._optimizers)  # type: ignore[arg-type]
        masks.attach(self._optimizers, self.remask, self._step_hook)  # (re)installs hooks, zeroes new entries
        return True

    # ------------------------------------------------------------------ statistics of the data-driven criteria
    @property
    def collecting(self) -> bool:
        """True while a statistics window is open."""
        return self.importance.collecting

    def start_collecting(self) -> None:
        """Open a fresh statistics window for criteria that score from gradients or activations (a no-op for the
        others); then call :meth:`observe` before every ``optimizer.step()``."""
        masks = self._bound()
        self.importance.reset()
        self.importance.start(self.module, masks)  # type: ignore[arg-type]

    def observe(self) -> bool:
        """Record one optimizer step's statistics (call it right before ``optimizer.step()``, with final
        gradients); True when recorded. Gradients of pruned entries are masked first."""
        self.mask_gradients()
        return self.importance.observe(self._bound())

    def stop_collecting(self) -> None:
        """Close the window and sum its statistics over the processes (a collective under DDP: every rank calls it
        in the same step)."""
        if self.importance.collecting:
            self.importance.stop()
            self.importance.reduce_(all_reduce_sum_)

    # ------------------------------------------------------------------ read-outs
    @property
    def achieved_sparsity(self) -> float:
        """The fraction the target counts (entries, channels or blocks) that is pruned now; 0.0 before binding."""
        return 0.0 if self.masks is None else self.structure.sparsity(self.masks)

    def layer_sparsity(self) -> dict[str, float]:
        """:attr:`achieved_sparsity` per layer (per parameter, or per channel group for channels)."""
        return {} if self.masks is None else self.structure.layer_sparsity(self.masks)

    def summary(self) -> str:
        """A plain-text table of what is pruned, layer by layer."""
        return self.structure.summary(self._bound())

    def non_finite(self) -> list[str]:
        """The masked parameters holding NaN or infinity."""
        return [] if self.masks is None else non_finite_parameters(self.masks)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The masks (CPU bool tensors), the target they are grown to, the configuration that made them, the
        criterion's statistics and the rewind point."""
        return {
            "masks": self.masks.state_dict() if self.masks is not None else {},
            "target": self.target,
            "structure": repr(self.structure),
            "importance": repr(self.importance),
            "importance_state": self.importance.state_dict(),
            "layer_targets": self.layer_targets,
            "rewind": self.rewind_point,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into the bound masks.

        Raises:
            ValueError: the state was made by another structure, its masks do not fit the model, or its statistics
                are another criterion's.
        """
        masks = self._bound()
        saved = state.get("structure")
        if saved is not None and saved != repr(self.structure):
            raise ValueError(
                f"the saved masks were made by {saved}, this pruner prunes with {self.structure!r}. Use the structure "
                "they were made with, or start afresh."
            )
        if state.get("layer_targets") is not None:
            self.set_targets(dict(state["layer_targets"]))
        masks.load_state_dict(state["masks"])
        self.target = float(state["target"])
        if state.get("rewind") is not None:
            self.rewind_point = dict(state["rewind"])
        if state.get("importance_state"):
            self.importance.load_state_dict(state["importance_state"], masks)

    def _bound(self) -> MaskSet:
        if self.masks is None:
            raise ValueError("The pruner is not bound to a model yet: call `bind(model)` first.")
        return self.masks


def _check_layer_targets(targets: object) -> dict[str, float]:
    """Per-layer targets as a plain dict; the patterns are matched against the model in :meth:`Pruner.bind`."""
    if not isinstance(targets, Mapping) or not targets:
        raise ValueError(
            f"Per-layer targets must be a non-empty mapping of layer patterns to sparsities, got {targets!r}."
        )
    checked: dict[str, float] = {}
    for pattern, value in targets.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"Per-layer target patterns must be non-empty strings, got {pattern!r}.")
        checked[pattern] = check_sparsity(value, f"sparsity[{pattern!r}]")
    return checked


def _same_parameters(masks: MaskSet, module: nn.Module) -> bool:
    """True when every masked parameter is still the module's parameter of that name."""
    named = dict(module.named_parameters())
    return all(named.get(n) is p for n, p in zip(masks.names, masks.params))
