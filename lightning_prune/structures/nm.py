"""N:M sparsity: ``n`` of every ``m`` consecutive input weights are zero, the 2:4 pattern of NVIDIA's sparse
tensor cores (Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks"; Zhou et al., 2021, "Learning N:M
Fine-grained Structured Sparse Neural Networks From Scratch").

Example:
    >>> from torch import nn
    >>> from lightning_prune.criteria import MagnitudeImportance
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> nm = NMStructure(2, 4)
    >>> masks = nm.bind(net)
    >>> nm.prune_(masks, MagnitudeImportance(), sparsity=nm.default_sparsity)
    >>> nm.complete_groups(masks)  # the fraction of groups of 4 with exactly 2 zeros
    {'0.weight': 1.0, '2.weight': 1.0}
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_prune._helpers import is_int, text_table
from lightning_prune.criteria.base import Importance
from lightning_prune.masks.maskset import SPARSITY_HEADER, MaskSet, sparsity_rows
from lightning_prune.masks.selection import prune_lowest_
from lightning_prune.structures._patterns import (
    check_entry_importance,
    check_matrix,
    entry_scores,
    groups_of,
    layer_name,
    single_target,
)
from lightning_prune.structures.base import Scope, Structure, Target, layer_targets


# ---------------------------------------------------------------------------------------------- N:M
class NMStructure(Structure):
    """N:M sparsity: in every group of ``m`` consecutive input weights, exactly ``n`` are zero (e.g. 2:4).

    Groups run along the input dimension, as NVIDIA's ASP and cuSPARSELt expect: a Linear weight's
    ``in_features`` (each row split into runs of ``m``), a convolution's input channels at each (output channel,
    kernel position), i.e. along dimension 1 of its weight. That dimension must be a multiple of ``m``.

    ``sparsity`` is the fraction of zero weights, at most ``n / m`` (:attr:`default_sparsity`, where every group
    has exactly ``n`` zeros). Gradual schedules work: at a target ``s <= n / m``, exactly ``round(s * N)`` entries
    are pruned, ``N`` counting every masked weight (``scope="global"``) or each weight's own (``scope="layer"``);
    a mapping ``{layer-name pattern: sparsity}`` gives each weight its own target. The entries pruned are the
    lowest-scored among the *eligible* ones, a group's eligible entries being its ``n - (zeros it already has)``
    lowest-scored kept entries, so no group ever exceeds ``n`` zeros and the last step completes every group. Ties
    go to the earliest entry (within a group, then tensor order and flat index). Pruned entries are never revived.

    Args:
        n: zeros per group, ``1 <= n < m`` (``n == m`` would empty every layer).
        m: group size, at least 2.

    Raises:
        ValueError: bad ``n`` or ``m``; at :meth:`bind` or pruning, a weight whose input dimension is not a
            multiple of ``m`` or a transposed convolution (whose weight puts the outputs along dimension 1); a
            target above ``n / m``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune.criteria import MagnitudeImportance
        >>> layer = nn.Linear(4, 1)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.1, -3.0, 0.2, 4.0]]))
        >>> structure = NMStructure.from_string("2:4")
        >>> masks = structure.bind(nn.Sequential(layer))
        >>> structure.prune_(masks, MagnitudeImportance(), sparsity=0.25)  # gradual: 1 of the 2 zeros
        >>> (layer.weight == 0).tolist()
        [[True, False, False, False]]
        >>> structure.prune_(masks, MagnitudeImportance(), sparsity=0.5)
        >>> (layer.weight == 0).tolist()
        [[True, False, True, False]]
    """

    name = "n:m"

    def __init__(self, n: int = 2, m: int = 4) -> None:
        for arg, value in (("n", n), ("m", m)):
            if not is_int(value):
                raise ValueError(f"`{arg}` must be an integer, got {value!r}.")
        if m < 2:
            raise ValueError(f"`m` must be at least 2 (a group of m weights), got m={m}.")
        if not 1 <= n < m:
            raise ValueError(
                f"`n` must satisfy 1 <= n < m (n zeros in every group of m weights), got {n}:{m}"
                + (": n == m would empty every layer." if n == m else ".")
            )
        self.n = int(n)
        self.m = int(m)

    @classmethod
    def from_string(cls, spec: str) -> NMStructure:
        """Parse ``"N:M"``, such as ``"2:4"``.

        Example:
            >>> NMStructure.from_string("1:4").default_sparsity
            0.25
        """
        parts = spec.split(":") if isinstance(spec, str) else []
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"{spec!r} is not an N:M pattern: expected two integers such as '2:4' (n zeros of m).")
        return cls(int(parts[0]), int(parts[1]))

    @property
    def default_sparsity(self) -> float:
        """``n / m``, the sparsity at which every group has exactly ``n`` zeros: the natural final target."""
        return self.n / self.m

    def __repr__(self) -> str:
        return f"NMStructure(n={self.n}, m={self.m})"

    def check_bound(self, module: nn.Module, masks: MaskSet) -> None:
        owners = {f"{name}.weight": m for name, m in module.named_modules() if name}
        for name in masks.names:
            if isinstance(owners.get(name), nn.modules.conv._ConvTransposeNd):
                raise ValueError(
                    f"{self.n}:{self.m} sparsity groups the input weights of Linear and Conv layers, but "
                    f"{layer_name(name)!r} is a transposed convolution (its weight's dimension 1 holds outputs). Add "
                    f"{layer_name(name)!r} to `ignore`."
                )
        self._check_layers(masks)
        self._complete(masks)  # sharded masks count their groups from now on (binding is a collective)

    def _check_layers(self, masks: MaskSet) -> None:
        for name, param in zip(masks.names, masks.params):
            check_matrix(self, name, param)
            inputs = param.shape[1]
            if inputs % self.m:
                what = "input features" if param.dim() == 2 else "input channels (per group)"
                raise ValueError(
                    f"{self.n}:{self.m} sparsity groups every {self.m} consecutive input weights, but {name!r} "
                    f"(shape {tuple(param.shape)}) has {inputs} {what}, not a multiple of {self.m}. Add "
                    f"{layer_name(name)!r} to `ignore`, or choose an m that divides {inputs}."
                )

    def check_importance(self, importance: Importance) -> None:
        check_entry_importance(self, importance)

    def check_target(self, masks: MaskSet, sparsity: Target, scope: Scope = "global") -> None:
        per_layer = layer_targets(masks.names, sparsity, scope)
        self._check_layers(masks)
        limit = self.default_sparsity
        label = f"{self.n}:{self.m} prunes at most {limit:.0%} of the weights ({self.n} of every {self.m})"
        if per_layer is None:
            if single_target(sparsity) > limit + 1e-9:
                raise ValueError(f"{label}, got `sparsity`={sparsity!r}. Use a target <= {limit:.4g}.")
            return
        over = {n: t for n, t in zip(masks.names, per_layer) if t > limit + 1e-9}
        if over:
            raise ValueError(f"{label}, but these layers' targets are higher: {over}. Use targets <= {limit:.4g}.")

    def complete_groups(self, masks: MaskSet) -> dict[str, float]:
        """Per masked tensor, the fraction of its groups of ``m`` that have exactly ``n`` zeros (1.0 once the
        pattern is complete); over the whole tensors when the masks are shards."""
        self._check_layers(masks)
        numel, _ = masks.entry_counts()
        complete = self._complete(masks)
        return {name: c / (total // self.m) for name, c, total in zip(masks.names, complete, numel)}

    def _complete(self, masks: MaskSet) -> list[int]:
        """Per masked tensor, its groups with exactly ``n`` zeros (a group lies within a row: shards add up)."""
        n, m = self.n, self.m
        return masks.tally(f"{n}:{m} complete groups", lambda mask: int(((~_groups(mask, m)).sum(1) == n).sum()))

    def summary(self, masks: MaskSet) -> str:
        complete = self.complete_groups(masks)
        *layers, total = sparsity_rows(masks)
        rows = [(*row, f"{complete[name]:.2%}") for row, name in zip(layers, masks.names)]
        header = (*SPARSITY_HEADER, f"groups at {self.n}:{self.m}")
        return text_table([header, *rows, (*total, "")], f"{self.n}:{self.m} pruning summary")

    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        self.check_target(masks, sparsity, scope)
        per_layer = layer_targets(masks.names, sparsity, scope)
        limit = self.default_sparsity
        self._complete(masks)
        # Over the whole tensors: a group lies within a row, so each rank of sharded masks finds its groups'
        # eligible entries on its own rows, and the selection among them is exact over every rank's.
        numel, pruned_now = masks.entry_counts()
        local = masks.local_tensors()
        for group in groups_of(masks, per_layer, scope):
            target = min(single_target(sparsity) if per_layer is None else per_layer[group[0]], limit)
            total = sum(numel[i] for i in group)
            pruned = sum(pruned_now[i] for i in group)
            k = round(target * total) - pruned
            if k <= 0:
                continue
            eligible: list[Tensor] = []
            scores: list[Tensor] = []
            for i in group:
                entry = entry_scores(self, importance, masks.names[i], local[i])
                eligible.append(self._eligible(masks.names[i], masks.masks[i], entry))
                scores.append((local[i] if importance.pointwise else entry).contiguous())
            chosen = [e.clone() for e in eligible]
            prune_lowest_(
                scores,
                chosen,
                k,
                transform=importance.transform_ if importance.pointwise else None,
                names=[masks.names[i] for i in group],
                **masks.selection_args(group),
            )
            for i, before, after in zip(group, eligible, chosen):
                masks.masks[i].logical_and_(~before | after)  # clear what prune_lowest_ took from `before`
        masks.apply_()

    def _eligible(self, name: str, mask: Tensor, scores: Tensor) -> Tensor:
        """Shaped like ``mask``: True at each group's ``n - zeros`` lowest-scored kept entries (ties: the earlier
        in the group). Works through chunks of groups, so temporaries stay small whatever the layer's size."""
        m = self.m
        kept_groups, score_groups = _groups(mask, m), _groups(scores, m)
        chosen = torch.empty_like(kept_groups)
        for start in range(0, kept_groups.shape[0], _GROUP_CHUNK):
            kept = kept_groups[start : start + _GROUP_CHUNK].t().contiguous()  # (m, groups): rows are contiguous
            quota = kept.view(torch.uint8).sum(0, dtype=torch.int16) - (m - self.n)  # zeros each group may take
            if bool((quota < 0).any()):
                raise ValueError(
                    f"The masks of {name!r} have groups of {m} with more than {self.n} zeros, so they do not follow "
                    f"the {self.n}:{self.m} pattern (were they made by another structure?); pruned entries are never "
                    "revived. Start from dense masks."
                )
            ranked = score_groups[start : start + _GROUP_CHUNK].t().contiguous().masked_fill_(~kept, float("inf"))
            rank = _rank_in_group(ranked)
            chosen[start : start + _GROUP_CHUNK] = (kept & (rank < quota)).t()
        return _ungroup(chosen, mask.shape)


#: Groups processed at once by :meth:`NMStructure._eligible` (a few MB of temporaries).
_GROUP_CHUNK = 1 << 18


def _rank_in_group(ranked: Tensor) -> Tensor:
    """For ``(m, groups)`` scores, each entry's rank within its group (column): how many entries score lower,
    or equal and come earlier. A stable sort's positions, by ``m^2`` vector comparisons for small groups."""
    m = ranked.shape[0]
    if m > 16:
        order = torch.argsort(ranked, dim=0, stable=True)
        positions = torch.arange(m, device=ranked.device)[:, None].expand_as(order)
        return torch.empty_like(order).scatter_(0, order, positions)
    rank = torch.zeros(ranked.shape, dtype=torch.uint8, device=ranked.device)
    for j in range(m):
        for i in range(m):
            if i != j:
                rank[j] += (ranked[i] <= ranked[j] if i < j else ranked[i] < ranked[j]).view(torch.uint8)
    return rank


def _groups(t: Tensor, m: int) -> Tensor:
    """``t`` as ``(groups, m)``: runs of ``m`` along dimension 1 at each position of the other dimensions."""
    return t.movedim(1, -1).reshape(-1, m)


def _ungroup(groups: Tensor, shape: torch.Size) -> Tensor:
    """The inverse of :func:`_groups`: a contiguous tensor of ``shape``."""
    moved = (shape[0], *shape[2:], shape[1])
    return groups.reshape(moved).movedim(-1, 1).contiguous()
