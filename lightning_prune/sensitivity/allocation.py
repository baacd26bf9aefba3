"""Per-layer sparsities from a sensitivity table: one common drop threshold, searched to meet the target.

Example:
    >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint, SensitivityTable
    >>> layers = tuple(LayerSensitivity(n, 10, 0, (SensitivityPoint(0.8, 0.8, 0.9 - d, d),)) for n, d in
    ...                [("a", 0.2), ("b", 0.0)])
    >>> allocation = allocate(SensitivityTable("accuracy", 0.9, "weights", "", "", (0.8,), layers), target_sparsity=0.5)
    >>> {name: round(value, 6) for name, value in allocation.items()}  # "b" loses nothing: it takes all it can
    {'a': 0.2, 'b': 0.8}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from lightning_prune._helpers import is_number
from lightning_prune.sensitivity.table import SensitivityTable, ratio_within

__all__ = ["allocate", "check_constraints"]

_TOL = 1e-12


def check_constraints(
    target_sparsity: float | None,
    macs_budget: float | None,
    max_drop: float | None,
    *,
    required: bool = True,
) -> tuple[float | None, float | None, float | None]:
    """Validate :func:`allocate`'s constraints: exactly one of ``target_sparsity`` (in [0, 1)) and
    ``macs_budget`` (in (0, 1]) (at most one when not ``required``), and ``max_drop`` None or >= 0.

    Raises:
        ValueError: naming the argument, the value and what is allowed.

    Example:
        >>> check_constraints(0.9, None, 0.01)
        (0.9, None, 0.01)
    """
    given = (target_sparsity is not None) + (macs_budget is not None)
    if given == 2 or (given == 0 and required):
        raise ValueError(
            "Give exactly one of `target_sparsity` (the fraction of all prunable units to prune) and "
            f"`macs_budget` (the fraction of the dense MACs to keep), got target_sparsity={target_sparsity!r} and "
            f"macs_budget={macs_budget!r}."
        )
    if target_sparsity is not None and not (is_number(target_sparsity, finite=True) and 0.0 <= target_sparsity < 1.0):
        raise ValueError(
            "`target_sparsity` must be a number in [0, 1) (the fraction of all prunable weights or channels to "
            f"prune, e.g. 0.9), got {target_sparsity!r}."
        )
    if macs_budget is not None and not (is_number(macs_budget, finite=True) and 0.0 < macs_budget <= 1.0):
        raise ValueError(
            "`macs_budget` must be a number in (0, 1] (the fraction of the dense MACs per sample to keep, e.g. "
            f"0.25), got {macs_budget!r}."
        )
    if max_drop is not None and not (is_number(max_drop, finite=True) and max_drop >= 0.0):
        raise ValueError(
            "`max_drop` must be None or a number >= 0 (the largest drop of the metric allowed in a layer, e.g. "
            f"0.01 for one point of accuracy), got {max_drop!r}."
        )
    to_float = [None if v is None else float(v) for v in (target_sparsity, macs_budget, max_drop)]
    return to_float[0], to_float[1], to_float[2]


def allocate(
    table: SensitivityTable,
    target_sparsity: float | None = None,
    macs_budget: float | None = None,
    max_drop: float | None = None,
) -> dict[str, float]:
    """Per-layer sparsities that meet a global target sparsity or a MACs budget with the least common drop.

    Every layer is pruned to the largest sparsity at which its measured drop stays within one threshold
    shared by all layers, and the threshold is searched so that the target is met (Han et al., 2015, and
    Distiller's sensitivity analysis: layers that tolerate pruning take more of it). Between grid points
    the drop is interpolated linearly, and never taken lower than at a smaller ratio
    (:meth:`LayerSensitivity.envelope`), so the target is met exactly rather than overshot to the next grid
    point; where several layers reach the threshold at once (flat stretches of their curves), they share the
    remainder in proportion. No layer goes beyond the largest sparsity measured for it.

    Args:
        table: From :func:`analyze`.
        target_sparsity: The fraction of all the table's units (weights or channels) to prune, weighted by
            layer size, in [0, 1).
        macs_budget: Instead: the fraction of the dense MACs per sample to keep, in (0, 1], counted over every
            Linear and Conv layer (those outside the table keep theirs). For channels, a weight whose rows and
            columns belong to two pruned groups keeps ``(1 - s1) * (1 - s2)`` of its MACs.
        max_drop: The largest drop allowed for any layer, in the metric's units (0.01 = one point of
            accuracy); None: no bound beyond the grid.

    Returns:
        Every layer of the table (exact names) with its sparsity, for ``PruningCallback(sparsity=...)`` or
        ``Structure.prune_(..., sparsity=...)``; see :meth:`SensitivityTable.predict` for what it predicts.

    Raises:
        ValueError: neither or both of ``target_sparsity`` and ``macs_budget``, a value out of range, an empty
            table, or a target that cannot be met within ``max_drop`` (the message says how far it gets and what
            drop the target would need).

    Example:
        >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint
        >>> sensitive = LayerSensitivity("a", 100, 0, (SensitivityPoint(0.5, 0.5, 0.5, 0.4),))
        >>> robust = LayerSensitivity("b", 100, 0, (SensitivityPoint(0.5, 0.5, 0.89, 0.01),))
        >>> table = SensitivityTable("accuracy", 0.9, "weights", "", "", (0.5,), (sensitive, robust))
        >>> {k: round(v, 4) for k, v in allocate(table, target_sparsity=0.3).items()}
        {'a': 0.1, 'b': 0.5}
    """
    if not isinstance(table, SensitivityTable):
        raise TypeError(f"`table` must be a SensitivityTable (from analyze), got {type(table).__name__}.")
    target_sparsity, macs_budget, max_drop = check_constraints(target_sparsity, macs_budget, max_drop)
    if not table.layers:
        raise ValueError("The sensitivity table has no layers: analyze a model with something to prune.")
    names = table.names
    curves = [layer.envelope() for layer in table.layers]
    sizes = [layer.size for layer in table.layers]
    total = sum(sizes)
    dense = table.dense_macs
    if macs_budget is not None and dense <= 0:
        raise ValueError("The sensitivity table counts no MACs, so `macs_budget` cannot be met; use `target_sparsity`.")

    def gain(values: Sequence[float]) -> float:
        """What the constraint measures, growing with every sparsity: fraction pruned, or of MACs saved."""
        if target_sparsity is not None:
            return sum(size * v for size, v in zip(sizes, values)) / total
        left = sum(term.after(dict(zip(names, values))) for term in table.mac_terms)
        return 1.0 - left / dense

    goal = target_sparsity if target_sparsity is not None else 1.0 - float(macs_budget)  # type: ignore[arg-type]
    cap = math.inf if max_drop is None else max_drop
    found = _search(curves, gain, goal, cap, linear=target_sparsity is not None)
    if found is None:
        raise ValueError(_unreachable(table, curves, gain, goal, target_sparsity, macs_budget, max_drop))
    return dict(zip(names, found))


def _search(
    curves: Sequence[tuple[list[float], list[float]]],
    gain: Callable[[Sequence[float]], float],
    goal: float,
    cap: float,
    linear: bool,
) -> list[float] | None:
    """The sparsities at the smallest common threshold (at most ``cap``) whose ``gain`` reaches ``goal``."""
    drops = sorted({e for _, es in curves for e in es if e <= cap} | {0.0})
    if math.isfinite(cap) and cap > drops[-1]:
        drops.append(cap)
    previous = [0.0] * len(curves)
    for tau in drops:
        below = [ratio_within(xs, es, tau, strict=True) for xs, es in curves]
        at = [ratio_within(xs, es, tau) for xs, es in curves]
        for low, high in ((previous, below), (below, at)):
            if gain(high) >= goal - _TOL:
                return _blend(low, high, gain, goal, linear)
        previous = at
    return None


def _blend(
    low: Sequence[float], high: Sequence[float], gain: Callable[[Sequence[float]], float], goal: float, linear: bool
) -> list[float]:
    """``low + t * (high - low)`` with ``gain`` equal to ``goal`` (``gain`` grows with ``t``)."""
    g0, g1 = gain(low), gain(high)
    if g0 >= goal:
        return list(low)
    if linear:
        t = (goal - g0) / (g1 - g0)
    else:  # MACs with channel overlaps: a polynomial in t, solved to float precision
        lo, t = 0.0, 1.0
        for _ in range(200):
            mid = 0.5 * (lo + t)
            if mid in (lo, t):
                break
            if gain([a + mid * (b - a) for a, b in zip(low, high)]) >= goal:
                t = mid
            else:
                lo = mid
    t = min(max(t, 0.0), 1.0)
    return [a + t * (b - a) for a, b in zip(low, high)]


def _unreachable(
    table: SensitivityTable,
    curves: Sequence[tuple[list[float], list[float]]],
    gain: Callable[[Sequence[float]], float],
    goal: float,
    target_sparsity: float | None,
    macs_budget: float | None,
    max_drop: float | None,
) -> str:
    cap = math.inf if max_drop is None else max_drop
    best = gain([ratio_within(xs, es, cap) for xs, es in curves])
    if target_sparsity is not None:
        asked = f"`target_sparsity`={target_sparsity:g}"
        reach = f"at most {best:.4f} of the {table.unit} can be pruned"
    else:
        asked = f"`macs_budget`={macs_budget:g} (of the dense {table.dense_macs:,} MACs per sample)"
        reach = f"at best {1.0 - best:.4f} of the dense MACs remain (layers outside the table keep theirs)"
    if max_drop is not None:
        needed = _search(curves, gain, goal, math.inf, linear=target_sparsity is not None)
        if needed is not None:
            drop = table.predict(dict(zip(table.names, needed))).drop
            return (
                f"Cannot meet {asked} with every layer's drop within `max_drop`={max_drop:g}: {reach}. Meeting it "
                f"needs a drop of up to {drop:.4g} in a layer: raise `max_drop` or relax the target."
            )
        reach += f" within `max_drop`={max_drop:g}"
    return (
        f"Cannot meet {asked}: {reach}, even with every layer at the largest ratio measured for it "
        f"(the grid goes up to {max(table.ratios):g}; channel layers also stop at `max_layer_sparsity`). "
        "Add larger `ratios` to the analysis or relax the target."
    )
