"""Structures: what is removed together (single weights, coupled channels, blocks, N:M groups), and how scores
and a target sparsity become masks.

The base class is in :mod:`~lightning_prune.structures.base`; the structures are ``unstructured``
(:mod:`~lightning_prune.structures.unstructured`), ``channel`` (:mod:`~lightning_prune.structures.channel`, with the
tracing of coupled groups in :mod:`~lightning_prune.structures.tracing`), ``block``
(:mod:`~lightning_prune.structures.block`), ``N:M`` (:mod:`~lightning_prune.structures.nm`) and ``heads``
(attention heads and MLP neurons, :mod:`~lightning_prune.structures.heads`) and ``experts`` (whole experts of
mixture-of-experts blocks, :mod:`~lightning_prune.structures.experts`). :data:`STRUCTURES`
maps each name to its class; :func:`build_structure` resolves a name, with the structure's own options. Whole
blocks (depth pruning) are removed at once rather than masked: :mod:`~lightning_prune.structures.depth` finds a
model's block list and selects the least important blocks.

Example:
    >>> build_structure("channel", round_to=8)
    ChannelStructure(round_to=8, max_layer_sparsity=0.9)
    >>> build_structure("4:8")
    NMStructure(n=4, m=8)
"""

from __future__ import annotations

from typing import Any

from lightning_prune._helpers import is_int
from lightning_prune.structures.base import (
    SCOPES,
    Scope,
    Structure,
    Target,
    check_scope,
    check_sparsity,
    layer_targets,
    resolve_layer_targets,
)
from lightning_prune.structures.block import BlockStructure
from lightning_prune.structures.channel import ChannelStructure, prune_channels_
from lightning_prune.structures.depth import find_block_container, select_blocks, skip_blocks
from lightning_prune.structures.experts import ExpertStructure, prune_experts_
from lightning_prune.structures.heads import HeadStructure
from lightning_prune.structures.nm import NMStructure
from lightning_prune.structures.tracing import channel_groups
from lightning_prune.structures.unstructured import Unstructured

__all__ = [
    "SCOPES",
    "STRUCTURES",
    "BlockStructure",
    "ChannelStructure",
    "ExpertStructure",
    "HeadStructure",
    "NMStructure",
    "Scope",
    "Structure",
    "Target",
    "Unstructured",
    "build_structure",
    "channel_groups",
    "check_scope",
    "check_sparsity",
    "find_block_container",
    "layer_targets",
    "prune_channels_",
    "prune_experts_",
    "resolve_layer_targets",
    "select_blocks",
    "skip_blocks",
]

#: The structures by name (``"block"`` is 4x4 blocks, ``"2:4"`` the N:M pattern of sparse tensor cores).
STRUCTURES: dict[str, type[Structure]] = {
    "unstructured": Unstructured,
    "channel": ChannelStructure,
    "block": BlockStructure,
    "2:4": NMStructure,
    "heads": HeadStructure,
    "experts": ExpertStructure,
}
#: The options each structure takes by name: what :func:`build_structure` passes to its constructor.
_OPTIONS: dict[type[Structure], tuple[str, ...]] = {
    ChannelStructure: ("round_to", "max_layer_sparsity"),
    BlockStructure: ("block_shape",),
    HeadStructure: ("units", "gqa", "round_to", "head_round_to", "max_layer_sparsity"),
    ExpertStructure: ("score",),
}


def build_structure(structure: str | Structure, **options: Any) -> Structure:
    """Resolve a structure given by name or as an object.

    Besides the names in :data:`STRUCTURES`, any ``"N:M"`` string is an :class:`NMStructure`. ``options`` are the
    structure's own constructor arguments (``round_to`` and ``max_layer_sparsity`` for channels, ``block_shape`` for
    blocks); ``None`` values are left out, so the structure's defaults apply.

    Raises:
        ValueError: an unknown structure, or an option the structure does not take (the message says which
            structure does), or an out-of-range option.

    Example:
        >>> build_structure("unstructured")
        Unstructured()
        >>> build_structure("block", block_shape=(2, 8))
        BlockStructure(block_shape=(2, 8))
        >>> build_structure("unstructured", round_to=8)
        Traceback (most recent call last):
        ...
        ValueError: `round_to` applies to structure='channel' only (or 'heads'), got structure='unstructured'.
    """
    given = {key: value for key, value in options.items() if value is not None}
    if isinstance(structure, Structure):
        if given:
            raise ValueError(
                f"{' and '.join(f'`{k}`' for k in given)} cannot be combined with a structure object "
                f"({structure!r}): set {'it' if len(given) == 1 else 'them'} on the object itself."
            )
        return structure
    if isinstance(structure, str) and structure in STRUCTURES:
        cls = STRUCTURES[structure]
    elif isinstance(structure, str) and ":" in structure:
        return _with_options(NMStructure.from_string(structure), structure, given)
    else:
        hint = ""
        if is_int(structure) and structure >= 60:
            n, m = divmod(structure, 60)  # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124
            hint = (
                f" An unquoted {n}:{m} in a YAML file is read as the base-60 integer {structure}: quote it, '{n}:{m}'."
            )
        raise ValueError(
            f"Unknown structure {structure!r}; expected one of {sorted(STRUCTURES)}, an 'N:M' pattern such as "
            f"'1:4', or a Structure object.{hint}"
        )
    _check_options(cls, structure, given)
    return cls(**given)


def _with_options(built: Structure, name: str, given: dict[str, Any]) -> Structure:
    _check_options(type(built), name, given)
    return built


def _check_options(cls: type[Structure], name: str, given: dict[str, Any]) -> None:
    allowed = _OPTIONS.get(cls, ())
    wrong = [key for key in given if key not in allowed]
    if not wrong:
        return
    owners = {key: [n for n, c in STRUCTURES.items() if key in _OPTIONS.get(c, ())] for key in wrong}
    detail = "; ".join(
        f"`{key}` applies to structure={owner[0]!r} only{''.join(f' (or {o!r})' for o in owner[1:])}"
        if owner
        else f"`{key}` is not an option"
        for key, owner in owners.items()
    )
    raise ValueError(f"{detail}, got structure={name!r}.")
