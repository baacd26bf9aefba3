"""The result of a sensitivity analysis: per layer and ratio, the metric and its drop; and predictions from it.

Example:
    >>> point = SensitivityPoint(ratio=0.5, sparsity=0.5, metric=0.8, drop=0.1)
    >>> layer = LayerSensitivity("fc.weight", size=10, macs=40, points=(point,))
    >>> table = SensitivityTable("accuracy", 0.9, "weights", "Unstructured()", "MagnitudeImportance()", (0.5,),
    ...                          (layer,), (MacTerm("fc.weight", 40, ((("fc.weight", 1.0),),)),))
    >>> table.predict({"fc.weight": 0.25})
    Prediction(sparsity=0.2500, macs_fraction=0.7500, drop=0.05, total_drop=0.05)
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lightning_prune._helpers import is_number

__all__ = ["LayerSensitivity", "MacTerm", "Prediction", "SensitivityPoint", "SensitivityTable"]

_TOL = 1e-12


@dataclass(frozen=True)
class SensitivityPoint:
    """One measurement: a layer pruned alone to ``ratio``.

    Args:
        ratio: The ratio asked for.
        sparsity: The layer's sparsity reached, in the structure's unit: ``ratio`` up to rounding to whole
            weights (``round(ratio * N)`` of ``N``), channels or blocks (``round_to`` can round further).
        metric: The metric with the layer pruned.
        drop: ``baseline - metric``: positive when pruning hurts.

    Example:
        >>> SensitivityPoint(ratio=0.5, sparsity=0.5, metric=0.9, drop=0.05).drop
        0.05
    """

    ratio: float
    sparsity: float
    metric: float
    drop: float


@dataclass(frozen=True)
class LayerSensitivity:
    """How one layer reacts to being pruned alone.

    Args:
        name: The layer's name as the structure names it: the parameter name (``model.features.0.weight``)
            for weights, the channel group's root layer (``model.features.0``) for channels.
        size: The layer's prunable units: weights, or channels for channel pruning.
        macs: Multiply-accumulates per sample that the layer's units cost: pruning a fraction ``r`` of them,
            alone, saves ``r * macs`` (:meth:`SensitivityTable.predict` also counts the overlap of two
            channel groups that share a layer).
        points: The measurements, by increasing ratio.
        skipped: ``(ratio, reason)`` for the ratios the structure cannot reach on this layer (e.g. above
            ``max_layer_sparsity``).

    Example:
        >>> layer = LayerSensitivity("fc.weight", 100, 100, (SensitivityPoint(0.5, 0.5, 0.9, 0.05),))
        >>> layer.max_sparsity
        0.5
    """

    name: str
    size: int
    macs: int
    points: tuple[SensitivityPoint, ...]
    skipped: tuple[tuple[float, str], ...] = ()

    @property
    def max_sparsity(self) -> float:
        """The largest ratio measured (0.0 without any measurement): no target beyond it is predicted."""
        return max((p.ratio for p in self.points), default=0.0)

    def envelope(self) -> tuple[list[float], list[float]]:
        """The drop against the ratio (the target the layer is pruned to) as :func:`allocate` reads it: the
        measured points by ratio, starting at ``(0, 0)``, each drop raised to the largest drop measured at any
        lower ratio (a layer never looks safer at a higher ratio), and never below 0.

        Returns:
            Ratios (strictly increasing, starting at 0) and drops (non-decreasing, starting at 0).

        Example:
            >>> points = tuple(SensitivityPoint(r, r, m, 0.9 - m) for r, m in [(0.5, 0.9), (0.8, 0.92)])
            >>> LayerSensitivity("fc.weight", 10, 10, points).envelope()
            ([0.0, 0.5, 0.8], [0.0, 0.0, 0.0])
        """
        xs, es = [0.0], [0.0]
        for point in sorted(self.points, key=lambda p: p.ratio):
            drop = max(es[-1], point.drop)
            if point.ratio - xs[-1] <= _TOL:
                es[-1] = drop
            else:
                xs.append(point.ratio)
                es.append(drop)
        return xs, es


@dataclass(frozen=True)
class MacTerm:
    """The MACs of one Linear or Conv weight, and how the layers' sparsities shrink them.

    The weight's MACs after pruning are ``macs * prod(1 - sum(s[layer] * share for layer, share in dim)
    for dim in dims)``: for weights, one factor ``1 - s`` of the layer owning the weight; for channels, one
    factor per dimension (rows, input columns) with each channel group's share of that dimension.

    Args:
        param: The weight's qualified name.
        macs: Its dense MACs per sample.
        dims: Per dimension, the ``(layer, share)`` pairs that prune it; empty for a weight no layer prunes.

    Example:
        >>> MacTerm("0.weight", 1000, ((("0", 1.0),), (("x", 0.5),))).after({"0": 0.5, "x": 0.5})
        375.0
    """

    param: str
    macs: int
    dims: tuple[tuple[tuple[str, float], ...], ...] = ()

    def after(self, sparsities: Mapping[str, float]) -> float:
        """The weight's MACs per sample once the layers are pruned to ``sparsities`` (missing layers: 0)."""
        kept = float(self.macs)
        for dim in self.dims:
            kept *= max(0.0, 1.0 - sum(sparsities.get(layer, 0.0) * share for layer, share in dim))
        return kept


class Prediction:
    """What a mapping of per-layer sparsities is predicted to give, from a :class:`SensitivityTable`.

    Attributes:
        sparsity: The fraction of all the table's units (weights or channels) pruned, weighted by size.
        macs: The MACs per sample left (of every Linear and Conv layer, pruned or not).
        macs_fraction: ``macs`` over the dense MACs.
        layer_drop: Per layer, its drop at its sparsity, read off :meth:`LayerSensitivity.envelope` with
            linear interpolation between grid points.
        drop: The largest of them: the common threshold every layer stays within (Han et al., 2015).
        total_drop: Their sum: the drop if the layers' effects simply added up (they interact, so treat it
            as a rough guide, not a bound).

    Example:
        >>> p = Prediction(0.5, 40.0, 0.4, {"a": 0.01, "b": 0.02})
        >>> p.drop, p.total_drop
        (0.02, 0.03)
    """

    def __init__(self, sparsity: float, macs: float, macs_fraction: float, layer_drop: Mapping[str, float]) -> None:
        self.sparsity = sparsity
        self.macs = macs
        self.macs_fraction = macs_fraction
        self.layer_drop = dict(layer_drop)
        self.drop = max(self.layer_drop.values(), default=0.0)
        self.total_drop = sum(self.layer_drop.values())

    def __repr__(self) -> str:
        return (
            f"Prediction(sparsity={self.sparsity:.4f}, macs_fraction={self.macs_fraction:.4f}, "
            f"drop={self.drop:.4g}, total_drop={self.total_drop:.4g})"
        )


@dataclass(frozen=True)
class SensitivityTable:
    """The result of :func:`analyze`.

    Args:
        metric: The metric's name (``"accuracy"`` by default).
        baseline: The metric of the unpruned model.
        unit: What a layer's ``size`` and sparsity count: ``"weights"`` or ``"channels"``.
        structure: The structure used, as text (``Unstructured()``).
        importance: The importance used, as text.
        ratios: The grid of ratios.
        layers: One entry per prunable layer, in the model's order.
        mac_terms: Every Linear and Conv weight's MACs, to predict the MACs of any allocation.
        evaluations: How many times the metric was evaluated (``1 + layers x ratios``, less unreachable ones).
        seconds: Wall time of the analysis.

    Example:
        >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),))
        >>> table = SensitivityTable("accuracy", 0.9, "weights", "Unstructured()", "MagnitudeImportance()",
        ...                          (0.5,), (layer,), (MacTerm("fc.weight", 40, ((("fc.weight", 1.0),),)),))
        >>> table.predict({"fc.weight": 0.5})
        Prediction(sparsity=0.5000, macs_fraction=0.5000, drop=0.1, total_drop=0.1)
    """

    metric: str
    baseline: float
    unit: str
    structure: str
    importance: str
    ratios: tuple[float, ...]
    layers: tuple[LayerSensitivity, ...]
    mac_terms: tuple[MacTerm, ...] = ()
    evaluations: int = 0
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        """The layer names, in the model's order."""
        return [layer.name for layer in self.layers]

    @property
    def dense_macs(self) -> int:
        """MACs per sample of every Linear and Conv layer of the unpruned model."""
        return sum(term.macs for term in self.mac_terms)

    def layer(self, name: str) -> LayerSensitivity:
        """The entry of layer ``name``.

        Raises:
            KeyError: no layer has that name.
        """
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"No layer {name!r} in the sensitivity table; its layers are {self.names}.")

    def predict(self, sparsities: Mapping[str, float]) -> Prediction:
        """The sparsity, MACs and drops predicted for per-layer ``sparsities`` (layers left out: 0).

        Args:
            sparsities: Exact layer names to sparsities, e.g. what :func:`allocate` returns; each at most
                the layer's largest measured sparsity (drops beyond the grid are unknown).

        Raises:
            ValueError: an unknown layer name, or a value outside ``[0, max_sparsity]`` of its layer.

        Example:
            >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),))
            >>> table = SensitivityTable("accuracy", 0.9, "weights", "", "", (0.5,), (layer,))
            >>> table.predict({"fc.weight": 0.25}).layer_drop
            {'fc.weight': 0.05}
        """
        if not isinstance(sparsities, Mapping):
            raise TypeError(f"`sparsities` must be a mapping of layer names to sparsities, got {sparsities!r}.")
        unknown = [name for name in sparsities if name not in self.names]
        if unknown:
            raise ValueError(f"`sparsities` names layers the table does not have: {unknown}. Its layers: {self.names}.")
        values = {layer.name: 0.0 for layer in self.layers}
        for name, value in sparsities.items():
            layer = self.layer(name)
            if not is_number(value) or not 0.0 <= float(value) <= layer.max_sparsity + _TOL:
                raise ValueError(
                    f"`sparsities[{name!r}]` must be a number in [0, {layer.max_sparsity:g}] (the largest sparsity "
                    f"measured for that layer), got {value!r}. Add larger `ratios` to the analysis to go further."
                )
            values[name] = float(value)
        total = sum(layer.size for layer in self.layers)
        sparsity = sum(layer.size * values[layer.name] for layer in self.layers) / total if total else 0.0
        macs = sum(term.after(values) for term in self.mac_terms)
        dense = self.dense_macs
        drops = {layer.name: interpolate_drop(*layer.envelope(), values[layer.name]) for layer in self.layers}
        return Prediction(sparsity, macs, macs / dense if dense else 1.0, drops)


def interpolate_drop(xs: Sequence[float], es: Sequence[float], x: float) -> float:
    """The drop at sparsity ``x`` on a :meth:`LayerSensitivity.envelope` ``(xs, es)``: linear between its
    points, ``x`` within ``[0, xs[-1]]``.

    Example:
        >>> interpolate_drop([0.0, 0.5, 1.0], [0.0, 0.1, 0.3], 0.75)
        0.2
    """
    if x >= xs[-1]:
        return es[-1]
    j = bisect.bisect_right(xs, x) - 1
    return es[j] + (x - xs[j]) / (xs[j + 1] - xs[j]) * (es[j + 1] - es[j])


def ratio_within(xs: Sequence[float], es: Sequence[float], tau: float, strict: bool = False) -> float:
    """The largest sparsity whose drop on a :meth:`LayerSensitivity.envelope` ``(xs, es)`` is at most ``tau``;
    with ``strict``, the limit as the threshold rises to ``tau`` from below (where a flat stretch of the curve
    sits at ``tau``, the two differ: the whole stretch is admitted at once at ``tau``).

    Example:
        >>> xs, es = [0.0, 0.5, 0.8, 0.9], [0.0, 0.1, 0.1, 0.3]
        >>> ratio_within(xs, es, 0.05), ratio_within(xs, es, 0.1, strict=True), ratio_within(xs, es, 0.1)
        (0.25, 0.5, 0.8)
    """
    j = (bisect.bisect_left(es, tau) if strict else bisect.bisect_right(es, tau)) - 1
    if j < 0:
        return 0.0
    if j == len(xs) - 1:
        return xs[-1]
    return xs[j] + (tau - es[j]) / (es[j + 1] - es[j]) * (xs[j + 1] - xs[j])
