"""The base of every structure: how scores and a target sparsity become masks, and how targets are given.

A structure decides *what* is removed together: single weights, channels, blocks or N:M groups all plug in
through the same :meth:`Structure.prune_`, so the pruner and the callback never change for a new one.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.criteria import MagnitudeImportance
    >>> from lightning_prune.masks import MaskSet, prunable_parameters
    >>> from lightning_prune.structures import Unstructured
    >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    >>> masks = MaskSet(prunable_parameters(net))
    >>> Unstructured().prune_(masks, MagnitudeImportance(), sparsity=0.3, scope="layer")
    >>> masks.layer_sparsity()
    {'0.weight': 0.3, '1.weight': 0.3}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import nn

from lightning_prune._helpers import check_sparsity, is_number
from lightning_prune.criteria.base import Importance
from lightning_prune.masks.maskset import MaskSet, sparsity_table
from lightning_prune.masks.params import Prunable, name_matches, prunable_parameters
from lightning_prune.masks.sharded import mask_set_for

Scope = Literal["global", "layer"]


SCOPES: tuple[str, ...] = ("global", "layer")


def check_scope(scope: object) -> None:
    if scope not in SCOPES:
        raise ValueError(f"Unknown scope {scope!r}; expected one of {list(SCOPES)}.")


#: What :meth:`Structure.prune_` grows the masks to: one sparsity, spread as the scope says; per-layer sparsities by
#: layer-name pattern (see :func:`resolve_layer_targets`); or one sparsity per layer, in the order of
#: :meth:`Structure.layer_names` (what a :class:`~lightning_prune.pruner.Pruner` passes, having matched the patterns
#: once).
Target = float | Mapping[str, float] | Sequence[float]


def resolve_layer_targets(names: Sequence[str], targets: Mapping[str, float]) -> dict[str, float]:
    """Each layer's target sparsity, from a mapping of layer-name patterns to sparsities.

    A pattern (``fnmatch`` syntax) matches a layer whose name, or a dotted suffix of it, it matches, and every
    name under such a match, as ``ignore`` does: ``"fc1"`` matches ``model.fc1.weight``, ``"features.*"`` every
    layer under ``features``. The names are the masked parameters' (``"body.0.weight"``) for single weights,
    blocks and N:M, and the channel groups' (their root layer, ``"body.0"``) for channels. When several
    patterns match a layer, the most specific wins: the one that matches the fewest layers, whatever the order
    of the mapping, so ``{"*": 0.8, "head": 0.3}`` prunes ``head`` to 30% and every other layer to 80%. Layers
    that no pattern matches get 0.0: they stay dense.

    Args:
        names: the layers, in order.
        targets: ``{pattern: sparsity}``, each sparsity in [0, 1).

    Returns:
        ``{name: sparsity}`` for every name, in the order of ``names``.

    Raises:
        TypeError: ``targets`` is not a mapping, or a pattern is not a string.
        ValueError: the mapping is empty, a pattern is empty or matches no layer (the message lists the
            layers), a sparsity is outside [0, 1), or patterns that match equally many layers give one layer
            different targets (ambiguous: make one of them more specific).

    Example:
        >>> names = ["features.0.weight", "features.3.weight", "head.weight"]
        >>> resolve_layer_targets(names, {"*": 0.8, "head": 0.3, "features.3": 0.5})
        {'features.0.weight': 0.8, 'features.3.weight': 0.5, 'head.weight': 0.3}
        >>> resolve_layer_targets(names, {"features.*": 0.6})
        {'features.0.weight': 0.6, 'features.3.weight': 0.6, 'head.weight': 0.0}
    """
    if not isinstance(targets, Mapping):
        raise TypeError(
            f"Per-layer targets must be a mapping {{layer-name pattern: sparsity}}, got {type(targets).__name__} "
            f"{targets!r}."
        )
    if not targets:
        raise ValueError("Per-layer targets are empty: give at least one {layer-name pattern: sparsity} entry.")
    matched: dict[str, set[str]] = {}
    for pattern, value in targets.items():
        if not isinstance(pattern, str):
            raise TypeError(f"Per-layer target patterns must be strings, got {pattern!r}.")
        if not pattern:
            raise ValueError("Per-layer target patterns must be non-empty strings, got ''.")
        check_sparsity(value, f"sparsity[{pattern!r}]")
        hits = {n for n in names if name_matches(n, pattern)}
        if not hits:
            raise ValueError(f"Per-layer target pattern {pattern!r} matches no layer. The layers are: {list(names)}.")
        matched[pattern] = hits
    resolved: dict[str, float] = {}
    for name in names:
        candidates = [p for p, hits in matched.items() if name in hits]
        if not candidates:
            resolved[name] = 0.0
            continue
        fewest = min(len(matched[p]) for p in candidates)
        best = [p for p in candidates if len(matched[p]) == fewest]
        if len({float(targets[p]) for p in best}) > 1:
            raise ValueError(
                f"Per-layer targets for {name!r} are ambiguous: patterns {best} each match {fewest} layer(s) but "
                f"give {[targets[p] for p in best]}. Make one pattern more specific or give them the same target."
            )
        resolved[name] = float(targets[best[0]])
    return resolved


def layer_targets(names: Sequence[str], sparsity: Target, scope: Scope) -> list[float] | None:
    """Check a target and its scope: ``None`` for one sparsity (``scope`` says how it is spread), else every
    layer's own sparsity in the order of ``names`` (see :func:`resolve_layer_targets`).

    A mapping or a sequence prunes each layer to its own target, so it needs ``scope="layer"``; with
    ``scope="global"`` (one ranking across layers against one target) it is refused rather than silently
    reinterpreted. A sequence gives one sparsity per name, in order.

    Raises:
        TypeError: ``sparsity`` is neither a number, a mapping nor a sequence of numbers.
        ValueError: an unknown scope, a sparsity outside [0, 1), per-layer targets with ``scope="global"``, a
            sequence of another length than ``names``, or a bad mapping (see :func:`resolve_layer_targets`).

    Example:
        >>> layer_targets(["a.weight", "b.weight"], {"b": 0.5}, "layer")
        [0.0, 0.5]
        >>> layer_targets(["a.weight", "b.weight"], [0.25, 0.5], "layer")
        [0.25, 0.5]
        >>> layer_targets(["a.weight", "b.weight"], 0.5, "global") is None
        True
    """
    check_scope(scope)
    per_layer = isinstance(sparsity, Mapping) or (isinstance(sparsity, Sequence) and not isinstance(sparsity, str))
    if per_layer and scope != "layer":
        raise ValueError(
            "Per-layer targets prune every layer to its own sparsity, which contradicts scope='global' (one "
            "ranking across all layers against one target). Pass scope='layer' with a mapping."
        )
    if isinstance(sparsity, Mapping):
        resolved = resolve_layer_targets(names, sparsity)
        return [resolved[n] for n in names]
    if isinstance(sparsity, Sequence) and not isinstance(sparsity, str):
        if len(sparsity) != len(names):
            raise ValueError(
                f"Got {len(sparsity)} per-layer targets for {len(names)} layers ({list(names)}): give one per layer, "
                "or a mapping {layer-name pattern: sparsity}."
            )
        return [check_sparsity(value, f"sparsity[{name!r}]") for name, value in zip(names, sparsity)]
    if not is_number(sparsity):
        raise TypeError(
            f"`sparsity` must be a number in [0, 1) or a mapping {{layer-name pattern: sparsity}}, got "
            f"{type(sparsity).__name__} {sparsity!r}."
        )
    check_sparsity(sparsity)
    return None


class Structure(ABC):
    """Base class: grows a :class:`MaskSet` to a target sparsity."""

    name: str = ""
    #: True when :meth:`bind` needs example inputs to trace the model.
    needs_example_inputs: bool = False

    @property
    def default_sparsity(self) -> float | None:
        """The sparsity a pruner aims at when none is given (``None``: the pruner's default); N:M has ``n / m``."""
        return None

    @property
    def selects_parameters(self) -> bool:
        """True when the structure masks the parameters a :class:`~lightning_prune.masks.params.Prunable` selects
        (:meth:`bind_prunable`): it keeps this base :meth:`bind`. Structures that override :meth:`bind` find their
        own groups (channels, heads)."""
        return type(self).bind is Structure.bind

    def bind(self, module: nn.Module, ignore: Sequence[str] = (), example_inputs: Any = None) -> MaskSet:
        """The masks this structure prunes in ``module``: by default, every prunable parameter outside ``ignore``
        (see :func:`~lightning_prune.masks.params.prunable_parameters`)."""
        return self.bind_prunable(module, None, ignore)

    def bind_prunable(self, module: nn.Module, prunable: Prunable | None, ignore: Sequence[str] = ()) -> MaskSet:
        """Like :meth:`bind`, masking the parameters ``prunable`` selects (for structures that
        :attr:`selects_parameters`).

        Raises:
            ValueError: the structure finds its own groups, or a pattern or a parameter does not suit it.
        """
        if not self.selects_parameters:
            raise ValueError(f"{self!r} finds its own groups: it takes no `prunable` selection.")
        masks = mask_set_for(prunable_parameters(module, ignore, select=prunable), module)
        self.check_bound(module, masks)
        return masks

    def check_bound(self, module: nn.Module, masks: MaskSet) -> None:
        """Raise ``ValueError`` when the parameters of ``masks`` do not suit this structure (all do by default)."""
        return None

    def layer_names(self, masks: MaskSet) -> list[str]:
        """The layers that per-layer targets name, in the order :meth:`prune_` takes a sequence of targets: the
        masked parameters by default (channel groups for channels)."""
        return list(masks.names)

    def sparsity(self, masks: MaskSet) -> float:
        """The quantity the target sparsity controls; by default the fraction of masked entries."""
        return masks.sparsity()

    def layer_sparsity(self, masks: MaskSet) -> dict[str, float]:
        """:meth:`sparsity` per layer (per masked tensor by default)."""
        return masks.layer_sparsity()

    def check_importance(self, importance: Importance) -> None:
        """Raise ``ValueError`` when this structure cannot use ``importance`` (every one works by default)."""
        return None

    def check_target(self, masks: MaskSet, sparsity: Target, scope: Scope = "global") -> None:
        """Raise ``ValueError`` when ``sparsity`` cannot be reached on ``masks``; by default any valid target can
        (a per-layer mapping must match layers of ``masks``: see :func:`layer_targets`)."""
        layer_targets(masks.names, sparsity, scope)

    def summary(self, masks: MaskSet) -> str:
        """A plain-text table of what was pruned, printed at the end of fitting."""
        return sparsity_table(masks)

    @abstractmethod
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        """Grow ``masks`` so that ``sparsity`` of the entries are pruned; never revive a pruned entry.

        ``sparsity`` is one number, reached over all layers (``scope="global"``) or in each (``"layer"``), or
        a mapping ``{layer-name pattern: sparsity}`` (with ``scope="layer"``) that gives every layer its own
        target (:func:`resolve_layer_targets`). Targets that grow over calls grow the masks.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
