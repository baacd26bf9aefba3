"""Structures: how scores and a target sparsity become masks.

A structure decides *what* is removed together: single weights (``unstructured``) now; channels, blocks and
N:M patterns plug in through the same :meth:`Structure.prune_` without changing the callback.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.importance import MagnitudeImportance
    >>> from lightning_prune.masking import MaskSet, prunable_parameters, sparsity_table
    >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    >>> masks = MaskSet(prunable_parameters(net))
    >>> Unstructured().prune_(masks, MagnitudeImportance(), sparsity=0.3, scope="layer")
    >>> masks.layer_sparsity()
    {'0.weight': 0.3, '1.weight': 0.3}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_prune.importance import Importance
from lightning_prune.masking import MaskSet, _matches, prunable_parameters, sparsity_table
from lightning_prune.selection import prune_lowest_

Scope = Literal["global", "layer"]
SCOPES: tuple[str, ...] = ("global", "layer")


def check_scope(scope: object) -> None:
    if scope not in SCOPES:
        raise ValueError(f"Unknown scope {scope!r}; expected one of {list(SCOPES)}.")


def check_sparsity(sparsity: object, name: str = "sparsity") -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {sparsity!r}.")


#: What :meth:`Structure.prune_` grows the masks to: one sparsity, spread as the scope says, or per-layer
#: sparsities by layer-name pattern (see :func:`resolve_layer_targets`).
Target = float | Mapping[str, float]


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
        hits = {n for n in names if _matches(n, pattern)}
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

    A mapping prunes each layer to its own target, so it needs ``scope="layer"``; with ``scope="global"`` (one
    ranking across layers against one target) it is refused rather than silently reinterpreted.

    Raises:
        TypeError: ``sparsity`` is neither a number nor a mapping.
        ValueError: an unknown scope, a sparsity outside [0, 1), a mapping with ``scope="global"``, or a bad
            mapping (see :func:`resolve_layer_targets`).

    Example:
        >>> layer_targets(["a.weight", "b.weight"], {"b": 0.5}, "layer")
        [0.0, 0.5]
        >>> layer_targets(["a.weight", "b.weight"], 0.5, "global") is None
        True
    """
    check_scope(scope)
    if isinstance(sparsity, Mapping):
        if scope != "layer":
            raise ValueError(
                "Per-layer targets prune every layer to its own sparsity, which contradicts scope='global' (one "
                "ranking across all layers against one target). Pass scope='layer' with a mapping."
            )
        resolved = resolve_layer_targets(names, sparsity)
        return [resolved[n] for n in names]
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
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

    def bind(self, module: nn.Module, ignore: Sequence[str] = (), example_inputs: Any = None) -> MaskSet:
        """The masks this structure prunes in ``module``: by default, the weight of every Linear and Conv
        layer outside ``ignore``."""
        return MaskSet(prunable_parameters(module, ignore))

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


class Unstructured(Structure):
    """Prune individual weights: exactly ``round(sparsity * N)`` zeros.

    ``N`` counts every masked entry (``scope="global"``: one threshold across layers) or each tensor's own
    (``scope="layer"``). The lowest-scored kept entries go first, ties to the earliest (tensor order, then flat
    index). A target below the current sparsity changes nothing. A mapping ``{layer-name pattern: sparsity}``
    (with ``scope="layer"``) prunes each tensor to its own target, ``round(target * N_layer)`` zeros.
    """

    name = "unstructured"

    def check_importance(self, importance: Importance) -> None:
        """Refuse criteria that score whole channels only (``apoz``, ``activation``)."""
        if not getattr(importance, "scores_entries", True):
            raise ValueError(
                f"structure='unstructured' scores single weights, but {importance!r} scores whole channels from "
                "their activations. Use structure='channel' with it, or a criterion that scores single weights: "
                "'magnitude', 'l1', 'l2', 'taylor' or 'fisher'."
            )

    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        per_layer = layer_targets(masks.names, sparsity, scope)
        indices = list(range(len(masks.params)))
        groups = [indices] if per_layer is None and scope == "global" else [[i] for i in indices]
        single = 0.0 if isinstance(sparsity, Mapping) else float(sparsity)
        for group in groups:
            target = single if per_layer is None else per_layer[group[0]]
            total = sum(masks.masks[i].numel() for i in group)
            pruned = sum(masks.masks[i].numel() - int(torch.count_nonzero(masks.masks[i])) for i in group)
            k = round(target * total) - pruned
            if k <= 0:
                continue
            if importance.pointwise:
                scores = [masks.params[i].detach() for i in group]
                transform = importance.transform_
            else:
                scores = [_scores(importance, masks, i) for i in group]
                transform = None
            prune_lowest_(
                [s.contiguous() for s in scores],
                [masks.masks[i] for i in group],
                k,
                transform=transform,
                names=[masks.names[i] for i in group],
            )
        masks.apply_()


def _scores(importance: Importance, masks: MaskSet, i: int) -> torch.Tensor:
    name, param = masks.names[i], masks.params[i]
    scores = importance(name, param)
    if scores.shape != param.shape:
        raise ValueError(
            f"{importance!r} returned scores of shape {tuple(scores.shape)} for {name!r}, "
            f"whose shape is {tuple(param.shape)}."
        )
    return scores


def _channel() -> Structure:
    from lightning_prune.structured import ChannelStructure  # imports Torch-Pruning only when used

    return ChannelStructure()


def _block() -> Structure:
    from lightning_prune.patterns import BlockStructure

    return BlockStructure()


def _two_four() -> Structure:
    from lightning_prune.patterns import NMStructure

    return NMStructure(2, 4)


STRUCTURES: dict[str, Callable[[], Structure]] = {
    "unstructured": Unstructured,
    "channel": _channel,
    "block": _block,
    "2:4": _two_four,
}


def build_structure(structure: str | Structure) -> Structure:
    """Resolve a structure given by name or as an object.

    Besides the names in :data:`STRUCTURES` (``"block"`` is 4x4 blocks), any ``"N:M"`` string is an
    :class:`~lightning_prune.patterns.NMStructure`.

    Example:
        >>> build_structure("unstructured")
        Unstructured()
        >>> build_structure("4:8")
        NMStructure(n=4, m=8)
    """
    if isinstance(structure, Structure):
        return structure
    if isinstance(structure, str) and structure in STRUCTURES:
        return STRUCTURES[structure]()
    if isinstance(structure, str) and ":" in structure:
        from lightning_prune.patterns import NMStructure

        return NMStructure.from_string(structure)
    hint = ""
    if isinstance(structure, int) and not isinstance(structure, bool) and structure >= 60:
        n, m = divmod(structure, 60)  # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124
        hint = f" An unquoted {n}:{m} in a YAML file is read as the base-60 integer {structure}: quote it, '{n}:{m}'."
    raise ValueError(
        f"Unknown structure {structure!r}; expected one of {sorted(STRUCTURES)}, an 'N:M' pattern such as '1:4', "
        f"or a Structure object.{hint}"
    )
