"""Transformer pruning: whole attention heads (grouped-query attention included) and MLP hidden neurons.

:class:`HeadStructure` prunes the attention and MLP modules that
:func:`~lightning_prune.structures.units.find_units` finds by their shape, not by their class (this package's GPT,
Hugging Face Llama, Qwen2, Mistral, GPT-2 and BERT, LitGPT, ``nn.MultiheadAttention``, torchvision's ViT, Swin and
MaxViT; the layouts are listed in :mod:`~lightning_prune.structures.units`).

Each becomes a :class:`~lightning_prune.masks.channels.ChannelGroup` whose units are heads or neurons: a head owns its
query, key and value rows (and biases) and its output-projection columns; a neuron owns its gate and up rows (fc
row) and its down-projection column. Under grouped-query attention (``num_kv_heads`` < ``num_heads``) a unit is, by
default, a key/value head together with every query head that shares it (``gqa="kv"``), so the ratio stays valid;
``gqa="query"`` removes query heads instead, the same number from every group. The masks are ordinary masks, so
schedules, criteria, resume and DDP apply unchanged; :mod:`lightning_prune.deploy.transformer` then removes the pruned
units for a smaller dense model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.criteria import build_importance
    >>> layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32)
    >>> structure = HeadStructure()
    >>> masks = structure.bind(layer)
    >>> [g.name for g in masks.groups], [g.channels for g in masks.groups]
    (['', 'self_attn'], [32, 4])
    >>> structure.prune_(masks, build_importance("l2"), 0.5, scope="layer")
    >>> structure.layer_sparsity(masks)
    {'': 0.5, 'self_attn': 0.5}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._helpers import is_int, text_table
from lightning_prune.criteria.base import Importance
from lightning_prune.criteria.magnitude import LpNormImportance
from lightning_prune.masks.channels import ChannelGroup, ChannelMaskSet
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.structures._patterns import single_target
from lightning_prune.structures.base import Scope, Structure, Target, check_sparsity, layer_targets
from lightning_prune.structures.units import GQA, Unit, UnitGroup, find_units

__all__ = ["GQA", "HeadStructure", "Unit", "UnitGroup", "find_units"]


class HeadMaskSet(ChannelMaskSet):
    """A :class:`~lightning_prune.masks.channels.ChannelMaskSet` whose groups are attention heads and MLP neurons;
    :attr:`units` keeps what each group is (for pruning within GQA groups and for compaction)."""

    def __init__(self, params: dict[str, nn.Parameter], units: Sequence[UnitGroup]) -> None:
        super().__init__(params, [u.group for u in units])
        self.units: list[UnitGroup] = list(units)


class HeadStructure(Structure):
    """Prune whole attention heads and MLP hidden neurons of a transformer.

    A unit's score is the Lp norm over every weight it owns (query, key, value rows and output columns of a head;
    gate, up rows and down column of a neuron), as in Michel et al., 2019 ("Are Sixteen Heads Really Better than
    One?") scored by weights, or the sum of a gradient criterion's scores (``"taylor"``, ``"fisher"``: Molchanov et
    al., 2019) over those weights, or the unit's output measured on training batches (``"activation"``: the mean
    absolute value of a head's output or a neuron's activation where the next layer reads it; ``"apoz"``).
    ``sparsity`` is the fraction of these modules' parameters pruned:
    ``scope="layer"`` prunes that fraction of every group's units (uniform widths, which Hugging Face configs can
    express); ``scope="global"`` ranks every unit by its score over its group's mean, cost-weighted, so that
    layers compete.

    Args:
        units: what to prune: ``"heads"``, ``"neurons"`` or both (default).
        gqa: ``"kv"`` (default) removes a key/value head with every query head sharing it; ``"query"`` removes
            query heads, the same number from each key/value group, so the ratio stays valid.
        round_to: keep a multiple of this many neurons in every pruned MLP (8 or 16 for SIMD kernels).
        head_round_to: keep a multiple of this many units (heads, or key/value groups) in every pruned attention.
        max_layer_sparsity: the largest fraction of one group's units that may go, in [0, 1); at least one unit
            (and one query head per key/value group) always stays.

    Raises:
        ValueError: an unknown ``units`` or ``gqa``, a rounding that is not a positive integer or a bad
            ``max_layer_sparsity``; at :meth:`bind`, a rounding larger than a group's units.

    Example:
        >>> from torch import nn
        >>> from lightning_prune import Pruner
        >>> layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        >>> pruner = Pruner(0.5, structure=HeadStructure(round_to=8), importance="l2", scope="layer")
        >>> _ = pruner.bind(model); _ = pruner.prune(0.5)
        >>> pruner.layer_sparsity()
        {'layers.0': 0.5, 'layers.0.self_attn': 0.5, 'layers.1': 0.5, 'layers.1.self_attn': 0.5}
    """

    name = "heads"

    def __init__(
        self,
        units: Unit | Sequence[Unit] = ("heads", "neurons"),
        gqa: GQA = "kv",
        round_to: int = 1,
        head_round_to: int = 1,
        max_layer_sparsity: float = 0.9,
    ) -> None:
        chosen = (units,) if isinstance(units, str) else tuple(units)
        if not chosen or any(u not in ("heads", "neurons") for u in chosen):
            raise ValueError(f"`units` must be 'heads', 'neurons' or both, got {units!r}.")
        if gqa not in ("kv", "query"):
            raise ValueError(
                f"`gqa` must be 'kv' (remove a key/value head with its query heads) or 'query' (remove query heads "
                f"within each group), got {gqa!r}."
            )
        for key, value in (("round_to", round_to), ("head_round_to", head_round_to)):
            if not is_int(value) or value < 1:
                raise ValueError(f"`{key}` must be a positive integer, got {value!r}.")
        check_sparsity(max_layer_sparsity, "max_layer_sparsity")
        self.units: tuple[Unit, ...] = tuple(dict.fromkeys(chosen))
        self.gqa: GQA = gqa
        self.round_to = int(round_to)
        self.head_round_to = int(head_round_to)
        self.max_layer_sparsity = float(max_layer_sparsity)

    def __repr__(self) -> str:
        return (
            f"HeadStructure(units={list(self.units)}, gqa={self.gqa!r}, round_to={self.round_to}, "
            f"head_round_to={self.head_round_to}, max_layer_sparsity={self.max_layer_sparsity})"
        )

    # ------------------------------------------------------------------ binding and read-outs
    def bind(self, module: nn.Module, ignore: Sequence[str] = (), example_inputs: Any = None) -> HeadMaskSet:
        found = find_units(module, ignore, self.units, self.gqa)
        named = dict(module.named_parameters())
        masks = HeadMaskSet({n: named[n] for u in found for n in u.group.params()}, found)
        for unit in found:
            self._min_keep(unit)  # fail now on a rounding that cannot fit
        return masks

    def layer_names(self, masks: MaskSet) -> list[str]:
        return [u.group.name for u in _head_masks(masks).units]

    def sparsity(self, masks: MaskSet) -> float:
        """The fraction of the heads' and neurons' parameters pruned."""
        return masks.sparsity()

    def layer_sparsity(self, masks: MaskSet) -> dict[str, float]:
        """The fraction of each group's units (heads, key/value groups or neurons) pruned."""
        return _head_masks(masks).group_sparsity()

    def check_importance(self, importance: Importance) -> None:
        _norm_order(importance)

    def check_target(self, masks: MaskSet, sparsity: Target, scope: Scope = "global") -> None:
        hm = _head_masks(masks)
        per_group = layer_targets(self.layer_names(hm), sparsity, scope)
        values = per_group if per_group is not None else [single_target(sparsity)] * len(hm.units)
        over = {u.group.name: t for u, t in zip(hm.units, values) if t > self.max_layer_sparsity}
        if over and (per_group is not None or scope == "layer"):
            raise ValueError(
                f"Cannot prune these groups' units to their targets with `max_layer_sparsity`="
                f"{self.max_layer_sparsity}: {over}. Lower the targets or raise `max_layer_sparsity`."
            )

    def summary(self, masks: MaskSet) -> str:
        hm = _head_masks(masks)
        rows: list[tuple[str, ...]] = [("module", "units", "kept / total", "pruned")]
        for u in hm.units:
            kept = int(hm.kept(u.group).sum())
            label = "neurons" if u.kind == "neurons" else ("kv groups" if u.per_unit > 1 else "heads")
            rows.append(
                (u.group.name or "(model)", label, f"{kept} / {u.group.channels}", f"{1 - kept / u.group.channels:.2%}")
            )
        rows.append(
            ("total (parameters)", "", f"{hm.numel() - hm.num_pruned()} / {hm.numel()}", f"{hm.sparsity():.2%}")
        )
        return text_table(rows, "Head and neuron pruning summary")

    # ------------------------------------------------------------------ counts
    def _step(self, unit: UnitGroup) -> int:
        """Units are kept in multiples of this: the rounding, times the key/value groups for query units."""
        rounding = self.round_to if unit.kind == "neurons" else self.head_round_to
        return rounding * (unit.num_kv_heads if unit.query_units else 1)

    def _min_keep(self, unit: UnitGroup) -> int:
        step, channels = self._step(unit), unit.group.channels
        if step > channels:
            what = "neurons" if unit.kind == "neurons" else "heads"
            key = "round_to" if unit.kind == "neurons" else "head_round_to"
            raise ValueError(
                f"`{key}`={self.round_to if unit.kind == 'neurons' else self.head_round_to} would empty "
                f"{unit.group.name or type(unit.module).__name__!r}, which has {channels} {what}"
                f"{f' in {unit.num_kv_heads} key/value groups' if unit.query_units else ''}. Lower `{key}` or add it "
                "to `ignore`."
            )
        keep = max(1, math.ceil((1.0 - self.max_layer_sparsity) * channels - 1e-9))
        return min(math.ceil(keep / step) * step, channels)

    def _rounded(self, unit: UnitGroup, wanted: int, kept: int) -> int:
        step = self._step(unit)
        if wanted >= kept:
            return kept
        rounded = max(round(wanted / step), 1) * step
        return min(max(rounded, self._min_keep(unit)), kept)

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        hm = _head_masks(masks)
        per_group = layer_targets(self.layer_names(hm), sparsity, scope)
        self.check_target(hm, sparsity, scope)
        p = _norm_order(importance)
        kept = [hm.kept(u.group) for u in hm.units]
        scores = [_unit_scores(hm, u.group, p, importance) for u in hm.units]
        if per_group is not None or scope == "layer":
            fractions = per_group if per_group is not None else [single_target(sparsity)] * len(hm.units)
            targets = [
                self._rounded(u, u.group.channels - round(f * u.group.channels), int(k.sum()))
                for u, k, f in zip(hm.units, kept, fractions)
            ]
        else:
            targets = self._global_targets(hm, scores, kept, single_target(sparsity))
        for u, k, s, target in zip(hm.units, kept, scores, targets):
            excess = int(k.sum()) - target
            if excess > 0:
                hm.prune_channels_(u.group, _drop(u, k, s, excess))
        hm.apply_()

    def _global_targets(self, hm: HeadMaskSet, scores: list[Tensor], kept: list[Tensor], sparsity: float) -> list[int]:
        """Per group, how many units to keep so that the lowest relative scores go first until ``sparsity`` of the
        parameters is pruned."""
        costs = [_unit_cost(hm, u.group) for u in hm.units]
        total = hm.numel()
        to_prune = round(sparsity * total) - hm.num_pruned()
        counts = [int(k.sum()) for k in kept]
        if to_prune <= 0:
            return counts
        floors = [self._min_keep(u) for u in hm.units]
        relative = [_relative(s, k) for s, k in zip(scores, kept)]
        values = torch.cat([r[k] for r, k in zip(relative, kept)])
        owner = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
        remaining, taken = list(counts), 0
        for j in torch.sort(values, stable=True).indices.tolist():
            i = int(owner[j])
            if remaining[i] > floors[i]:
                remaining[i] -= 1
                taken += costs[i]
                if taken >= to_prune:
                    break
        return [self._rounded(u, want, c) for u, want, c in zip(hm.units, remaining, counts)]


def _drop(unit: UnitGroup, kept: Tensor, scores: Tensor, excess: int) -> Tensor:
    """Which of ``unit``'s kept units to prune: the ``excess`` lowest-scored (ties to the earliest); for query units,
    the same number from every key/value group."""
    drop = torch.zeros(unit.group.channels, dtype=torch.bool)
    if unit.query_units:
        per_group = unit.num_heads // unit.num_kv_heads
        each = excess // unit.num_kv_heads
        for g in range(unit.num_kv_heads):
            members = torch.arange(g * per_group, (g + 1) * per_group)
            alive = members[kept[members]]
            order = torch.sort(scores[alive], stable=True).indices[:each]
            drop[alive[order]] = True
        return drop
    candidates = torch.nonzero(kept).flatten()
    order = torch.sort(scores[candidates], stable=True).indices[:excess]
    drop[candidates[order]] = True
    return drop


def _unit_cost(masks: ChannelMaskSet, group: ChannelGroup) -> int:
    """The number of masked entries one unit of ``group`` owns."""
    total = 0
    for s in group.slices:
        param = masks.param(s.param)
        total += len(s.index) * (param.numel() // param.shape[s.dim])
    return total // group.channels


def _head_masks(masks: MaskSet) -> HeadMaskSet:
    if not isinstance(masks, HeadMaskSet):
        raise TypeError(f"Head pruning needs a HeadMaskSet (from HeadStructure.bind), got {type(masks).__name__}.")
    return masks


def _norm_order(importance: Importance) -> int | None:
    p = getattr(importance, "p", None)
    if isinstance(importance, LpNormImportance) and p in (1, 2):
        return int(p)
    if getattr(importance, "scores_channels", False):
        return None
    raise ValueError(
        f"structure='heads' scores heads and neurons by a norm of their weights or by a channel criterion: it supports "
        f"importance 'l1', 'l2' or 'magnitude' (= 'l1'), and 'taylor', 'fisher', 'apoz' or 'activation', not "
        f"{importance!r}."
    )


def _relative(scores: Tensor, kept: Tensor) -> Tensor:
    mean = scores[kept].mean() if bool(kept.any()) else scores.new_ones(())
    return scores / mean if float(mean) > 0 else scores


def _unit_scores(masks: ChannelMaskSet, group: ChannelGroup, p: int | None, importance: Importance) -> Tensor:
    if p is None:
        scores = importance.channel_scores(masks, group)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (group.channels,):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(
                f"{importance!r} returned scores of shape {shape} for {group.name!r}, which has {group.channels} "
                "units: it must return one score per unit."
            )
        return scores.detach().to(device="cpu", dtype=torch.float64)
    sums = torch.zeros(group.channels, dtype=torch.float64)
    for s in group.slices:
        if s.scored:
            rows = s.rows(masks.param(s.param).detach()).to(torch.float64)
            sums.index_add_(0, s.root, (rows.abs().sum(1) if p == 1 else rows.square().sum(1)).cpu())
    return sums if p == 1 else sums.sqrt()
