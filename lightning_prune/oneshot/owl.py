"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2024)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_prune.oneshot.base import Allocation

__all__ = ["OWL", "exact_targets"]

_CHUNK = 1 << 20


def _score_chunks(weight: Tensor, norms: Tensor) -> list[tuple[int, int]]:
    step = max(1, _CHUNK // max(weight.shape[1], 1))
    return [(a, min(a + step, weight.shape[0])) for a in range(0, weight.shape[0], step)]


@torch.no_grad()
def _score_sum(weight: Tensor, norms: Tensor) -> float:
    """``sum_ij |W_ij| * norms_j`` without materialising the scores."""
    return float(weight.abs().sum(0, dtype=torch.float64) @ norms.double())


@torch.no_grad()
def _count_above(weight: Tensor, norms: Tensor, threshold: float) -> int:
    """How many Wanda scores ``|W_ij| * norms_j`` exceed ``threshold`` (in row chunks)."""
    n32 = norms.to(device=weight.device, dtype=torch.float32)
    return sum(int((weight[a:b].abs().float().mul_(n32) > threshold).sum()) for a, b in _score_chunks(weight, norms))


def exact_targets(targets: dict[str, float], sizes: dict[str, int], sparsity: float) -> dict[str, float]:
    """Round per-layer targets to whole counts that add up to exactly ``round(sparsity * total)`` (largest
    remainders first, ties to the earlier layer), returned as fractions ``count / size``.

    Example:
        >>> exact_targets({"a": 0.45, "b": 0.55}, {"a": 10, "b": 10}, 0.5)
        {'a': 0.5, 'b': 0.5}
    """
    names = list(targets)
    wanted = [targets[n] * sizes[n] for n in names]
    counts = [math.floor(w) for w in wanted]
    missing = round(sparsity * sum(sizes[n] for n in names)) - sum(counts)
    order = sorted(range(len(names)), key=lambda i: (-(wanted[i] - counts[i]), i))
    if missing >= 0:
        for i in order[:missing]:
            counts[i] += 1
    else:  # float rounding gave one too many: take from the smallest remainders
        for i in order[missing:]:
            counts[i] -= 1
    return {n: c / sizes[n] for n, c in zip(names, counts)}


class OWL(Allocation):
    """Outlier Weighed Layerwise sparsity (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity (OWL): A
    Missing Secret Sauce for Pruning LLMs to High Sparsity").

    Each group (a block, as in the paper, or a single layer) gets its *outlier ratio* ``D``: the fraction of its
    Wanda scores ``|W_ij| * ||X_j||_2`` above ``m`` times the group's mean score, on the dense model. The ratios
    are rescaled to ``[0, 2 * lam]`` and the group's sparsity is ``sparsity - (D_scaled - mean D_scaled)``:
    groups with more outliers are pruned less. The mean is weighted by the groups' sizes and the per-layer
    counts are rounded so that the total is exactly ``round(sparsity * total)`` (:func:`exact_targets`).

    Args:
        m: the outlier threshold, in multiples of the group's mean score (5, as in the paper).
        lam: the half-range ``lambda`` of the sparsities around the target (0.08).
        granularity: ``"block"`` (one ratio per block, as the paper) or ``"layer"`` (one per linear layer).

    Raises:
        ValueError: bad arguments; at allocation, a group's sparsity outside ``[0, 1)`` (lower ``lam`` or the
            target).

    Example:
        >>> import torch
        >>> owl = OWL(lam=0.1)
        >>> ones = torch.ones(4)
        >>> owl.observe_block(0, [("b0.fc.weight", torch.ones(2, 4), ones)])  # no outliers
        >>> spiky = torch.ones(2, 40)
        >>> spiky[0, 0] = 100.0
        >>> owl.observe_block(1, [("b1.fc.weight", spiky, torch.ones(40))])  # one outlier in 80
        >>> owl.targets({"b0.fc.weight": 8, "b1.fc.weight": 80}, 0.5)
        {'b0.fc.weight': 0.625, 'b1.fc.weight': 0.4875}
    """

    name = "owl"

    def __init__(self, m: float = 5.0, lam: float = 0.08, granularity: Literal["block", "layer"] = "block") -> None:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0:
            raise ValueError(f"OWL's `m` (outlier threshold in multiples of the mean score) must be > 0, got {m!r}.")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < 0.5:
            raise ValueError(f"OWL's `lam` (half-range of the layer sparsities) must be in [0, 0.5), got {lam!r}.")
        if granularity not in ("block", "layer"):
            raise ValueError(f"OWL's `granularity` must be 'block' or 'layer', got {granularity!r}.")
        self.m = float(m)
        self.lam = float(lam)
        self.granularity = granularity
        self.groups: list[tuple[list[str], float]] = []  # (layer names, outlier ratio)

    def __repr__(self) -> str:
        return f"OWL(m={self.m}, lam={self.lam}, granularity={self.granularity!r})"

    def reset(self) -> None:
        self.groups = []

    @torch.no_grad()
    def observe_block(self, block: int, layers: list[tuple[str, Tensor, Tensor]]) -> None:
        groups = [layers] if self.granularity == "block" else [[layer] for layer in layers]
        for group in groups:
            numel = sum(w.numel() for _, w, _ in group)
            if numel == 0:
                continue
            mean = sum(_score_sum(w, n) for _, w, n in group) / numel
            above = sum(_count_above(w, n, self.m * mean) for _, w, n in group)
            self.groups.append(([name for name, _, _ in group], above / numel))

    def ratios(self) -> dict[str, float]:
        """Each observed layer's outlier ratio (its group's)."""
        return {name: ratio for names, ratio in self.groups for name in names}

    def targets(self, sizes: dict[str, int], sparsity: float) -> dict[str, float]:
        if not self.groups:
            raise ValueError("OWL observed no layer: nothing to allocate.")
        ratios = [r for _, r in self.groups]
        lo, hi = min(ratios), max(ratios)
        scaled = [0.0 if hi == lo else (r - lo) / (hi - lo) * 2 * self.lam for r in ratios]
        weights = [sum(sizes[n] for n in names) for names, _ in self.groups]
        mean = sum(s * w for s, w in zip(scaled, weights)) / sum(weights)
        targets: dict[str, float] = {}
        for (names, _), s in zip(self.groups, scaled):
            target = sparsity - (s - mean)
            if not 0.0 <= target < 1.0:
                raise ValueError(
                    f"OWL gives {names} a sparsity of {target:.4f}, outside [0, 1) (target {sparsity}, lam "
                    f"{self.lam}). Lower `lam` or the sparsity."
                )
            targets.update(dict.fromkeys(names, target))
        return exact_targets(targets, sizes, sparsity)
