"""What is prunable: the weights of a model's layers, selected by type and by module-name patterns.

By default the weight matrices of ``nn.Linear`` and convolution layers, Hugging Face's ``Conv1D`` (GPT-2's
transposed projections) and ``nn.MultiheadAttention``'s input projection (``in_proj_weight``, or
``q/k/v_proj_weight`` when separate) are prunable; embeddings, and output heads that share an embedding's matrix,
only when asked (:class:`Prunable`). A :class:`Prunable` also adds parameters by module type, parameter-name
pattern or predicate.

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
import sys
from collections.abc import Callable, Iterable, Sequence

from torch import nn

#: Module types whose ``weight`` is prunable by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
#: ``nn.MultiheadAttention``'s own projection matrices (its output projection is a child ``nn.Linear``).
ATTENTION_WEIGHTS: tuple[str, ...] = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


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


def hf_conv1d_type() -> type[nn.Module] | None:
    """Hugging Face's ``Conv1D`` (a linear layer with a transposed ``(in, out)`` weight, GPT-2's projections) when
    ``transformers`` is imported, else None: a model built with it imported ``transformers`` already, and the core
    never imports it itself."""
    module = sys.modules.get("transformers.pytorch_utils")
    found = getattr(module, "Conv1D", None)
    return found if isinstance(found, type) else None


#: A predicate on a parameter: ``(qualified parameter name, parameter) -> prunable?``.
ParameterPredicate = Callable[[str, nn.Parameter], bool]


class Prunable:
    """What is prunable in a model, beyond (or instead of) the default weight matrices.

    Selected, in the union of: the default weights (``defaults=True``: Linear, convolution, Hugging Face ``Conv1D``
    and ``nn.MultiheadAttention`` projection matrices); the parameters of modules of the given ``types`` (their
    own parameters with two or more dimensions); the parameters whose qualified name matches a pattern of
    ``names`` (any parameter, a bias included); those ``predicate(name, parameter)`` accepts; and with
    ``embeddings=True`` the ``nn.Embedding`` matrices and output heads tied to them. Without it, an output head
    whose weight *is* an embedding's (``tie_word_embeddings``) is not a default weight (name it, or its type, to
    select it). ``ignore``
    patterns (module names) then remove what they match. A parameter shared by several modules is selected once.

    Args:
        types: module types whose parameters of two or more dimensions are prunable (e.g. ``nn.Embedding``, a
            custom attention module holding bare ``nn.Parameter`` projections).
        names: parameter-name patterns (``fnmatch`` syntax; a pattern matches the qualified name or a dotted suffix
            of it), e.g. ``"*.in_proj_weight"`` or ``"lm_head.weight"``.
        predicate: ``(name, parameter) -> bool``, for anything the others cannot say.
        defaults: include the default weight matrices.
        embeddings: include embedding matrices and the output heads tied to them.

    Raises:
        TypeError: a type that is not an ``nn.Module`` subclass, a pattern that is not a non-empty string, or a
            predicate that is not callable.

    Example:
        >>> from torch import nn
        >>> layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
        >>> list(prunable_parameters(layer))
        ['self_attn.in_proj_weight', 'self_attn.out_proj.weight', 'linear1.weight', 'linear2.weight']
        >>> list(prunable_parameters(layer, select=Prunable(names=["*.in_proj_weight"], defaults=False)))
        ['self_attn.in_proj_weight']
    """

    def __init__(
        self,
        types: Sequence[type[nn.Module]] = (),
        names: Sequence[str] = (),
        predicate: ParameterPredicate | None = None,
        *,
        defaults: bool = True,
        embeddings: bool = False,
    ) -> None:
        types = tuple(types) if isinstance(types, Iterable) else (types,)
        bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
        if bad:
            raise TypeError(
                f"`Prunable.types` must be nn.Module subclasses (e.g. [nn.Embedding]), got {bad!r} in {list(types)!r}."
            )
        self.types: tuple[type[nn.Module], ...] = types
        self.names: tuple[str, ...] = pattern_list(names, "Prunable.names")
        if predicate is not None and not callable(predicate):
            raise TypeError(
                f"`Prunable.predicate` must be a callable (name, parameter) -> bool or None, got "
                f"{type(predicate).__name__} {predicate!r}."
            )
        self.predicate = predicate
        self.defaults = bool(defaults)
        self.embeddings = bool(embeddings)

    def __repr__(self) -> str:
        parts = []
        if self.types:
            parts.append(f"types={[t.__name__ for t in self.types]}")
        if self.names:
            parts.append(f"names={list(self.names)}")
        if self.predicate is not None:
            parts.append(f"predicate={getattr(self.predicate, '__name__', repr(self.predicate))}")
        if not self.defaults:
            parts.append("defaults=False")
        if self.embeddings:
            parts.append("embeddings=True")
        return f"Prunable({', '.join(parts)})"

    def select(self, module: nn.Module, types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES) -> dict[str, nn.Parameter]:
        """Every selected parameter of ``module`` by qualified name, in module order (``ignore`` not applied)."""
        conv1d = hf_conv1d_type()
        embedded = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
        chosen: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for mod_name, m in module.named_modules():
            for p_name, param in m.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                if id(param) in seen:
                    continue
                explicit = self._named(m, name, param)
                if not explicit and not (self._default(m, p_name, types, conv1d) and id(param) not in embedded):
                    continue  # a default selection leaves out embeddings and output heads tied to them
                seen.add(id(param))
                chosen[name] = param
        return chosen

    def _default(
        self, m: nn.Module, p_name: str, types: tuple[type[nn.Module], ...], conv1d: type[nn.Module] | None
    ) -> bool:
        if not self.defaults:
            return False
        if p_name == "weight" and (isinstance(m, types) or (conv1d is not None and isinstance(m, conv1d))):
            return True
        return isinstance(m, nn.MultiheadAttention) and p_name in ATTENTION_WEIGHTS

    def _named(self, m: nn.Module, name: str, param: nn.Parameter) -> bool:
        """Selected explicitly: by ``embeddings``, ``types``, ``names`` or ``predicate``."""
        if self.embeddings and isinstance(m, nn.Embedding) and name.endswith("weight"):
            return True
        if self.types and isinstance(m, self.types) and param.dim() >= 2:
            return True
        if any(matches_own_name(name, pattern) for pattern in self.names):
            return True
        return self.predicate is not None and bool(self.predicate(name, param))


def prunable_parameters(
    module: nn.Module,
    ignore: Sequence[str] = (),
    types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES,
    select: Prunable | None = None,
) -> dict[str, nn.Parameter]:
    """The prunable parameters by qualified name, minus those under ``ignore``.

    By default: the ``weight`` of every layer of ``types`` (Linear and convolution layers), of Hugging Face
    ``Conv1D`` layers, and ``nn.MultiheadAttention``'s projection matrices (``in_proj_weight``, or
    ``q/k/v_proj_weight``); embeddings, and output heads tied to them, are left out. ``select`` says otherwise
    (see :class:`Prunable`).

    Args:
        module: the model (a ``LightningModule`` works too: names are then e.g. ``model.0.weight``).
        ignore: module-name patterns (``fnmatch`` syntax) to leave dense. A pattern matches a module whose
            name, or a dotted suffix of it, it matches, and all that module's children: ``"head"`` matches
            ``model.head``; ``"features.*"`` matches everything under ``features``.
        types: module types whose ``weight`` is prunable.
        select: what is prunable, when not the defaults.

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
    if select is not None and not isinstance(select, Prunable):
        raise TypeError(f"`prunable` must be a Prunable or None, got {type(select).__name__} {select!r}.")
    check_patterns(module, ignore, types)
    if select is not None:
        for pattern in select.names:
            if not any(matches_own_name(n, pattern) for n, _ in module.named_parameters(remove_duplicate=False)):
                raise ValueError(
                    f"`Prunable.names` pattern {pattern!r} matches no parameter of {type(module).__name__}. "
                    f"Its parameters are: {[n for n, _ in module.named_parameters()]}."
                )
    chosen = (select or Prunable()).select(module, types)
    params = {
        name: param
        for name, param in chosen.items()
        if not any(name_matches(name.rpartition(".")[0], pattern) for pattern in ignore if name.rpartition(".")[0])
    }
    if not params:
        what = repr(select) if select is not None else f"no weight of a {[t.__name__ for t in types]} layer"
        raise ValueError(
            f"{type(module).__name__} has nothing left to prune: {what}"
            f"{' outside `ignore`=' + repr(list(ignore)) if ignore else ''}."
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
