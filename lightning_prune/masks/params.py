"""What is prunable: the weights of a model's layers, selected by type and by module-name patterns.

Patterns use ``fnmatch`` syntax and match a module whose name, or a dotted suffix of it, they match, and every
module under it: ``"head"`` matches ``model.head``; ``"features.*"`` everything under ``features``.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> list(prunable_parameters(net, ignore=["2"]))
    ['0.weight']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

#: Module types whose ``weight`` is prunable by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


def matches_own_name(name: str, pattern: str) -> bool:
    """``pattern`` (fnmatch syntax) matches the module name itself or a dotted suffix of it, not only the name
    of a module above it.

    Example:
        >>> matches_own_name("model.head", "head"), matches_own_name("model.head.0", "head")
        (True, False)
    """
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def name_matches(name: str, pattern: str) -> bool:
    """``pattern`` (fnmatch syntax) matches the module name or a dotted suffix of it: ``head`` matches
    ``model.head``; a match also covers the module's children."""
    parts = name.split(".")
    return any(matches_own_name(".".join(parts[: i + 1]), pattern) for i in range(len(parts)))


def prunable_parameters(
    module: nn.Module,
    ignore: Sequence[str] = (),
    types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES,
) -> dict[str, nn.Parameter]:
    """The ``weight`` parameters of prunable layers, by qualified name, minus those under ``ignore``.

    Args:
        module: the model (a ``LightningModule`` works too: names are then e.g. ``model.0.weight``).
        ignore: module-name patterns (``fnmatch`` syntax) to leave dense. A pattern matches a module whose
            name, or a dotted suffix of it, it matches, and all that module's children: ``"head"`` matches
            ``model.head``; ``"features.*"`` matches everything under ``features``.
        types: module types whose ``weight`` is prunable.

    Raises:
        ValueError: a pattern matches no module of the model, or nothing is left to prune.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> list(prunable_parameters(net, ignore=["1"]))
        ['0.weight']
    """
    if isinstance(ignore, str):
        ignore = [ignore]
    named = [(name, m) for name, m in module.named_modules() if name]
    check_patterns(module, ignore, types)
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, m in named:
        weight = getattr(m, "weight", None)
        if not isinstance(m, types) or not isinstance(weight, nn.Parameter):
            continue
        if any(name_matches(name, pattern) for pattern in ignore) or id(weight) in seen:
            continue
        seen.add(id(weight))
        params[f"{name}.weight"] = weight
    if not params:
        raise ValueError(
            f"{type(module).__name__} has nothing left to prune: no weight of a {[t.__name__ for t in types]} "
            f"layer{' outside `ignore`=' + repr(list(ignore)) if ignore else ''}."
        )
    return params


def pattern_list(patterns: object, name: str = "ignore") -> tuple[str, ...]:
    """``patterns`` as a tuple of module-name patterns (one string is one pattern); a ``ValueError`` naming ``name``
    for anything else (``None``, a number, an empty string).

    Example:
        >>> pattern_list("head"), pattern_list(["features.*", "head"])
        (('head',), ('features.*', 'head'))
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Iterable) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"`{name}` must be a list of module-name patterns (e.g. ['head'], or [] for none), got {patterns!r}."
        )
    return tuple(patterns)


def check_patterns(
    module: nn.Module, patterns: Sequence[str], types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES
) -> None:
    named = [(name, m) for name, m in module.named_modules() if name]
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"`ignore` patterns must be non-empty strings, got {pattern!r}.")
        if not any(name_matches(name, pattern) for name, _ in named):
            raise ValueError(
                f"`ignore` pattern {pattern!r} matches no module of {type(module).__name__}. "
                f"Prunable modules are: {[n for n, m in named if isinstance(m, types)]}."
            )


def matching_modules(module: nn.Module, patterns: Sequence[str]) -> list[nn.Module]:
    """The submodules of ``module`` that ``patterns`` match (as for ``ignore``: a name or a dotted suffix of
    it, and everything under a match).

    Raises:
        ValueError: a pattern matches no module.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2)))
        >>> matching_modules(net, ["1"])
        [Sequential(
          (0): Linear(in_features=4, out_features=2, bias=True)
        ), Linear(in_features=4, out_features=2, bias=True)]
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    check_patterns(module, patterns)
    return [m for name, m in module.named_modules() if name and any(name_matches(name, p) for p in patterns)]
