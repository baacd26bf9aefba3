"""Mixture-of-experts pruning: whole experts of Mixtral-style sparse MoE blocks.

:func:`find_experts` finds the MoE blocks of a model by their layout: a block with a ``gate`` router (weight
``[E, hidden]``, ``top_k`` experts per token) and ``experts`` holding the fused expert weights ``gate_up_proj``
``[E, 2 * I, hidden]`` and ``down_proj`` ``[E, hidden, I]``. That is the layout of Hugging Face Mixtral, MiniMax,
Qwen2-MoE, Qwen3-MoE, Qwen3-Next and OLMoE; their routers share one rule (softmax over the experts, top-k, the top-k
weights renormalised to sum to one for Mixtral and MiniMax and where ``norm_topk_prob`` is set). A block with another
router (a router bias, sigmoid or grouped routing) is refused with its name rather than pruned with the wrong rule.

Each block becomes a :class:`~lightning_prune.masks.channels.ChannelGroup` whose units are experts: an expert owns its
router row and its slices of ``gate_up_proj`` and ``down_proj``. The masks are ordinary masks, so the
:class:`~lightning_prune.pruner.Pruner`, ``PruningCallback``, schedules and resume apply unchanged.

**What the masked model computes.** Zero weights alone would leave a pruned expert routable: its router logit would
be 0, not minus infinity, and it would still take tokens (and output zeros for them). So :meth:`ExpertStructure.bind`
also installs a *routing mask*, a forward hook on each router that recomputes the routing with the pruned experts'
logits at ``-inf``: top-k picks among the remaining experts only, and the softmax (and the renormalisation of the
top-k weights) is over what is left. The masked model then computes exactly what the compact model
(:func:`~lightning_prune.deploy.experts.compact_experts`) computes, and a pruned expert never receives a token, nor a
gradient. The hook stays until :meth:`ExpertMaskSet.remove_routing` (compaction drops it from the copy it returns).

**Scores.** The same hook records, on every forward pass (training, validation or calibration batches), each expert's
router-probability mass and how many tokens selected it, since the last pruning step. ``score="mass"`` (the default)
or ``"frequency"`` prunes the experts with the least of it; a block that routed no token since (a one-shot pruning
before any data) falls back to the weight norm of the pruner's ``importance`` (``"l1"``/``"l2"``), which
``score="weight"`` always uses. Expert scoring by routing statistics follows Lu et al., 2024 ("Not All Experts are
Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts Large Language Models") and Muzio et al., 2024
("SEER-MoE"). Under DDP each rank records its own batches and the pruner broadcasts rank 0's masks.

Example:
    >>> import torch
    >>> from transformers import MixtralConfig
    >>> from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    >>> _ = torch.manual_seed(0)
    >>> config = MixtralConfig(hidden_size=8, intermediate_size=4, num_local_experts=4, num_experts_per_tok=2)
    >>> block = MixtralSparseMoeBlock(config)
    >>> _ = [torch.nn.init.normal_(p) for p in block.parameters()]
    >>> masks = prune_experts_(block, drop=2, batches=[torch.randn(1, 16, 8)])
    >>> masks.kept_experts()
    {'': [0, 3]}
    >>> _, _, chosen = block.gate(torch.randn(32, 8))
    >>> sorted(set(chosen.flatten().tolist()))  # the pruned experts are never routed to
    [0, 3]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune._helpers import eval_mode, forward, is_int, text_table
from lightning_prune.criteria import build_importance
from lightning_prune.criteria.base import Importance
from lightning_prune.criteria.magnitude import LpNormImportance
from lightning_prune.masks.channels import ChannelGroup, ChannelMaskSet, ChannelSlice
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.masks.params import check_patterns, name_matches
from lightning_prune.structures._patterns import single_target
from lightning_prune.structures.base import Scope, Structure, Target, layer_targets

__all__ = [
    "ExpertGroup",
    "ExpertMaskSet",
    "ExpertScore",
    "ExpertStructure",
    "choose_experts",
    "find_experts",
    "prune_experts_",
    "remove_routing_hooks",
]

#: How experts are scored: router-probability mass, selection frequency (tokens routed to the expert) or the weight
#: norm of the pruner's importance.
ExpertScore = Literal["mass", "frequency", "weight"]
_SCORES: tuple[str, ...] = ("mass", "frequency", "weight")

#: Routers whose rule the routing mask reproduces: softmax, top-k, renormalised top-k weights (always for these) ...
_ALWAYS_NORMALISED = frozenset({"MixtralTopKRouter", "MiniMaxTopKRouter"})
#: ... or where the router's ``norm_topk_prob`` says so.
_NORMALISED_IF_SET = frozenset({"Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "Qwen3NextTopKRouter", "OlmoeTopKRouter"})
_ROUTING_HOOK = "_lightning_prune_routing_mask"


@dataclass(frozen=True)
class ExpertGroup:
    """One MoE block's experts, with what the routing mask and compaction need to know.

    Attributes:
        group: the channel group (its ``channels`` are the experts, its slices what each expert owns).
        block: the MoE block.
        router: its router (``block.gate``).
        experts: its fused experts (``block.experts``).
        router_weight: the qualified name of the router's weight (the row of expert e is row e).
        top_k: experts each token is routed to (``num_experts_per_tok``).
        normalised: True when the router renormalises the top-k weights to sum to one.
    """

    group: ChannelGroup
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    router_weight: str
    top_k: int
    normalised: bool

    @property
    def num_experts(self) -> int:
        return self.group.channels


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _moe_block(name: str, module: nn.Module) -> ExpertGroup | None:
    """The experts of ``module`` when it is a sparse MoE block of the fused layout, else None."""
    router, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
        return None
    gate_up, down, weight = (
        getattr(m, n, None) for m, n in ((experts, "gate_up_proj"), (experts, "down_proj"), (router, "weight"))
    )
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and isinstance(weight, nn.Parameter)):
        return None
    if gate_up.dim() != 3 or down.dim() != 3 or weight.dim() != 2:
        return None
    e, hidden = weight.shape
    if tuple(gate_up.shape) != (e, 2 * down.shape[2], hidden) or tuple(down.shape[:2]) != (e, hidden):
        return None
    kind = type(router).__name__
    top_k = getattr(router, "top_k", None)
    if kind not in _ALWAYS_NORMALISED | _NORMALISED_IF_SET or not is_int(top_k):
        raise ValueError(
            f"MoE block {name or '(model)'!r} ({type(module).__name__}) routes with {kind}, whose rule the routing "
            "mask does not know (ExpertStructure knows the softmax top-k routers of Mixtral, MiniMax, Qwen2-MoE, "
            "Qwen3-MoE, Qwen3-Next and OLMoE). Add it to `ignore`."
        )
    p = lambda n: _qualified(name, n)  # noqa: E731
    every = torch.arange(e)
    slices = (
        ChannelSlice(p("gate.weight"), 0, every, every),
        ChannelSlice(p("experts.gate_up_proj"), 0, every, every),
        ChannelSlice(p("experts.down_proj"), 0, every, every),
    )
    normalised = kind in _ALWAYS_NORMALISED or bool(getattr(router, "norm_topk_prob", False))
    return ExpertGroup(
        ChannelGroup(name, int(e), slices), module, router, experts, p("gate.weight"), int(top_k), normalised
    )


def find_experts(model: nn.Module, ignore: Sequence[str] = ()) -> list[ExpertGroup]:
    """Every sparse MoE block's experts in ``model``, outside ``ignore``, in module order.

    Raises:
        ValueError: an ``ignore`` pattern matches no module, a MoE block routes with a rule the routing mask does
            not know, or no MoE block is found.

    Example:
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> config = MixtralConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        ...                        num_key_value_heads=1, num_local_experts=4, vocab_size=32)
        >>> [(g.group.name, g.num_experts, g.top_k) for g in find_experts(MixtralForCausalLM(config))]
        [('model.layers.0.mlp', 4, 2), ('model.layers.1.mlp', 4, 2)]
    """
    check_patterns(model, ignore)
    found: list[ExpertGroup] = []
    for name, module in model.named_modules():
        if name and any(name_matches(name, pattern) for pattern in ignore):
            continue
        block = _moe_block(name, module)
        if block is not None:
            found.append(block)
    if not found:
        raise ValueError(
            f"Found no mixture-of-experts block to prune in {type(model).__name__}"
            f"{' outside `ignore`=' + repr(list(ignore)) if ignore else ''}: ExpertStructure knows blocks with a "
            "`gate` router and `experts` holding fused `gate_up_proj` [E, 2*I, hidden] and `down_proj` [E, hidden, I] "
            "(Hugging Face Mixtral, MiniMax, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, OLMoE)."
        )
    return found


# ---------------------------------------------------------------------------------------------- routing statistics
@dataclass
class _Routing:
    """Router statistics of one block since the last pruning step: probability mass and selections per expert."""

    mass: Tensor
    selected: Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, experts: int) -> _Routing:
        return cls(torch.zeros(experts, dtype=torch.float64), torch.zeros(experts, dtype=torch.long))


class ExpertMaskSet(ChannelMaskSet):
    """A :class:`~lightning_prune.masks.channels.ChannelMaskSet` whose groups are MoE experts, with the routing mask
    and the routing statistics of every block.

    :attr:`experts` keeps what each group is; :meth:`kept_experts` reads which experts are left. The routing mask is
    installed by :meth:`route` (:meth:`ExpertStructure.bind` does it) and removed by :meth:`remove_routing`.
    """

    def __init__(self, params: dict[str, nn.Parameter], experts: Sequence[ExpertGroup]) -> None:
        super().__init__(params, [e.group for e in experts])
        self.experts: list[ExpertGroup] = list(experts)
        self._routing = [_Routing.empty(e.num_experts) for e in self.experts]
        self._routing_handles: list[RemovableHandle] = []

    def routable(self, index: int) -> Tensor:
        """Boolean, one per expert of block ``index``: True where the expert may be routed to (its router row is
        kept)."""
        return self.mask(self.experts[index].router_weight).any(1)

    def kept_experts(self) -> dict[str, list[int]]:
        """The indices of the experts left in every block, by block name."""
        return {e.group.name: torch.nonzero(self.kept(e.group)).flatten().tolist() for e in self.experts}

    # ------------------------------------------------------------------ routing mask
    def route(self) -> None:
        """Install the routing mask on every block's router (replacing one installed before): pruned experts get a
        ``-inf`` logit, so top-k picks among the others; each pass also records the routing statistics."""
        self.remove_routing()
        for index, expert in enumerate(self.experts):
            remove_routing_hooks(expert.router)
            hook = _routing_hook(self, index)
            self._routing_handles.append(expert.router.register_forward_hook(hook))

    def remove_routing(self) -> None:
        """Remove the routing mask: pruned experts become routable again (their weights stay zero)."""
        for handle in self._routing_handles:
            handle.remove()
        self._routing_handles.clear()

    @property
    def routing(self) -> bool:
        """True while the routing mask is installed."""
        return bool(self._routing_handles)

    # ------------------------------------------------------------------ statistics
    def routing_statistics(self) -> dict[str, dict[str, Any]]:
        """Per block, since the last pruning step: ``mass`` (each expert's summed router probability), ``selected``
        (tokens routed to each expert) and ``tokens`` (tokens seen)."""
        return {
            e.group.name: {"mass": r.mass.tolist(), "selected": r.selected.tolist(), "tokens": r.tokens}
            for e, r in zip(self.experts, self._routing)
        }

    def reset_statistics(self) -> None:
        """Forget the routing statistics (done after every pruning step)."""
        self._routing = [_Routing.empty(e.num_experts) for e in self.experts]

    @torch.no_grad()
    def record(self, index: int, probabilities: Tensor, chosen: Tensor) -> None:
        """Add one pass of block ``index``'s routing: ``probabilities`` ``[tokens, E]`` and the ``chosen`` experts
        ``[tokens, top_k]``."""
        r = self._routing[index]
        device = probabilities.device
        if r.mass.device != device:  # accumulate where the router runs: no copy to the host on every pass
            r.mass = r.mass.to(device, torch.float32 if device.type == "mps" else torch.float64)
            r.selected = r.selected.to(device)
        r.mass += probabilities.detach().sum(0, dtype=r.mass.dtype)
        r.selected += torch.bincount(chosen.detach().flatten(), minlength=len(r.mass))
        r.tokens += int(probabilities.shape[0])

    def statistic(self, index: int, score: ExpertScore) -> Tensor | None:
        """Block ``index``'s experts scored by ``score`` (``"mass"`` or ``"frequency"``), or None when it routed no
        token since the last pruning step."""
        r = self._routing[index]
        if score == "weight" or r.tokens == 0:
            return None
        return (r.mass if score == "mass" else r.selected).to("cpu", torch.float64)


def remove_routing_hooks(router: nn.Module) -> None:
    """Remove every routing mask from ``router`` (also the ones a deep copy of a routed model carries over)."""
    for key, hook in list(router._forward_hooks.items()):
        if getattr(hook, _ROUTING_HOOK, False):
            del router._forward_hooks[key]


def _routing_hook(masks: ExpertMaskSet, index: int) -> Any:
    expert = masks.experts[index]

    def hook(router: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        # The routing is recomputed on every pass, pruned experts or not: asking whether any is pruned would wait
        # for the device. Unpruned, it is the router's own computation. A deep copy of the model carries this hook
        # over: it routes the copy alike, with the copy's own router weight, and records only the bound model's passes.
        routable = masks.routable(index)
        weight = cast(Tensor, router.weight)
        hidden = args[0].reshape(-1, weight.shape[1])
        logits = F.linear(hidden, weight).masked_fill(~routable.to(hidden.device), float("-inf"))
        probabilities = F.softmax(logits, dim=-1, dtype=torch.float)
        top, chosen = torch.topk(probabilities, expert.top_k, dim=-1)
        if expert.normalised:
            top = top / top.sum(dim=-1, keepdim=True)
        if router is expert.router:
            masks.record(index, probabilities, chosen)
        return probabilities, top.to(probabilities.dtype), chosen

    setattr(hook, _ROUTING_HOOK, True)
    return hook


# ---------------------------------------------------------------------------------------------- selection
def choose_experts(scores: Tensor, kept: Tensor, drop: int) -> Tensor:
    """Which experts to prune: the ``drop`` lowest-scored of the ``kept`` ones (ties to the lower index).

    Args:
        scores: one score per expert.
        kept: boolean, one per expert: True where it is still kept.
        drop: how many of the kept experts to prune.

    Returns:
        Boolean, one per expert: True where it is to be pruned now.

    Example:
        >>> choose_experts(torch.tensor([0.3, 0.1, 0.4, 0.1]), torch.tensor([True, True, True, True]), 2).tolist()
        [False, True, False, True]
    """
    candidates = torch.nonzero(kept).flatten()
    order = torch.sort(scores[candidates].to(torch.float64), stable=True).indices[:drop]
    chosen = torch.zeros(len(kept), dtype=torch.bool)
    chosen[candidates[order]] = True
    return chosen


class ExpertStructure(Structure):
    """Prune whole experts of Mixtral-style mixture-of-experts blocks.

    ``sparsity`` is the fraction of experts pruned: ``scope="layer"`` prunes ``round(sparsity * E)`` experts of every
    block (a uniform count, which Hugging Face configs can describe); ``scope="global"`` ranks every expert by its
    score over its block's mean, so that blocks compete (non-uniform counts reload through ``load_compact``). Every
    block keeps at least its ``top_k`` experts (``num_experts_per_tok``). See the module docstring for the routing mask
    and the scores.

    Args:
        score: ``"mass"`` (router-probability mass, the default), ``"frequency"`` (tokens routed to the expert) or
            ``"weight"`` (the weight norm of the pruner's importance, ``"l1"`` or ``"l2"``).

    Raises:
        ValueError: an unknown ``score``; at :meth:`bind`, a model without a known MoE block; a target that would
            leave a block fewer experts than it routes each token to.

    Example:
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> from lightning_prune import Pruner
        >>> config = MixtralConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        ...                        num_key_value_heads=1, num_local_experts=4, vocab_size=32)
        >>> pruner = Pruner(0.5, structure=ExpertStructure(score="weight"), importance="l2", scope="layer")
        >>> _ = pruner.bind(MixtralForCausalLM(config)); _ = pruner.prune(0.5)
        >>> pruner.layer_sparsity()
        {'model.layers.0.mlp': 0.5, 'model.layers.1.mlp': 0.5}
    """

    name = "experts"

    def __init__(self, score: ExpertScore = "mass") -> None:
        if score not in _SCORES:
            raise ValueError(
                f"`score` must be 'mass' (router-probability mass), 'frequency' (tokens routed to the expert) or "
                f"'weight' (the weight norm), got {score!r}."
            )
        self.score: ExpertScore = score

    def __repr__(self) -> str:
        return f"ExpertStructure(score={self.score!r})"

    # ------------------------------------------------------------------ binding and read-outs
    def bind(self, module: nn.Module, ignore: Sequence[str] = (), example_inputs: Any = None) -> ExpertMaskSet:
        """The experts' masks of ``module``, with the routing mask installed on its routers."""
        found = find_experts(module, ignore)
        named = dict(module.named_parameters())
        masks = ExpertMaskSet({n: named[n] for e in found for n in e.group.params()}, found)
        masks.route()
        return masks

    def layer_names(self, masks: MaskSet) -> list[str]:
        return [e.group.name for e in _expert_masks(masks).experts]

    def sparsity(self, masks: MaskSet) -> float:
        """The fraction of experts pruned."""
        return _expert_masks(masks).channel_sparsity()

    def layer_sparsity(self, masks: MaskSet) -> dict[str, float]:
        """The fraction of each block's experts pruned."""
        return _expert_masks(masks).group_sparsity()

    def check_importance(self, importance: Importance) -> None:
        _norm_order(importance)

    def check_target(self, masks: MaskSet, sparsity: Target, scope: Scope = "global") -> None:
        em = _expert_masks(masks)
        per_group = layer_targets(self.layer_names(em), sparsity, scope)
        if per_group is None and scope == "global":
            total = sum(e.num_experts for e in em.experts)
            spare = sum(e.num_experts - e.top_k for e in em.experts)
            wanted = round(single_target(sparsity) * total)
            if wanted > spare:
                raise ValueError(
                    f"Cannot prune {wanted} of the {total} experts: every block keeps at least the experts it routes "
                    f"each token to (`num_experts_per_tok`), so at most {spare} can go. Lower the sparsity to at most "
                    f"{spare / total:.4g}."
                )
            return
        fractions = per_group if per_group is not None else [single_target(sparsity)] * len(em.experts)
        for e, fraction in zip(em.experts, fractions):
            _check_drop(e, round(fraction * e.num_experts), "sparsity", f"sparsity={fraction:g}")

    def summary(self, masks: MaskSet) -> str:
        em = _expert_masks(masks)
        rows: list[tuple[str, ...]] = [("MoE block", "experts kept / total", "top-k", "pruned experts")]
        for e in em.experts:
            kept = em.kept(e.group)
            pruned = torch.nonzero(~kept).flatten().tolist()
            rows.append((e.group.name or "(model)", f"{int(kept.sum())} / {e.num_experts}", str(e.top_k), str(pruned)))
        return text_table(rows, "Expert pruning summary")

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune_(self, masks: MaskSet, importance: Importance, sparsity: Target, scope: Scope = "global") -> None:
        em = _expert_masks(masks)
        per_group = layer_targets(self.layer_names(em), sparsity, scope)
        self.check_target(em, sparsity, scope)
        p = _norm_order(importance)
        kept = [em.kept(e.group) for e in em.experts]
        scores = [self.scores(em, i, p) for i in range(len(em.experts))]
        if per_group is not None or scope == "layer":
            fractions = per_group if per_group is not None else [single_target(sparsity)] * len(em.experts)
            keep = [e.num_experts - round(f * e.num_experts) for e, f in zip(em.experts, fractions)]
        else:
            keep = _global_keep(em.experts, scores, kept, single_target(sparsity))
        for e, k, s, target in zip(em.experts, kept, scores, keep):
            excess = int(k.sum()) - target
            if excess > 0:
                em.prune_channels_(e.group, choose_experts(s, k, excess))
        em.apply_()
        em.reset_statistics()

    def scores(self, masks: ExpertMaskSet, index: int, p: int = 2) -> Tensor:
        """Block ``index``'s expert scores: its routing statistic (see ``score``), else the Lp norm of each expert's
        weights (router row and expert slices)."""
        statistic = masks.statistic(index, self.score)
        if statistic is not None:
            return statistic
        group = masks.experts[index].group
        sums = torch.zeros(group.channels, dtype=torch.float64)
        for s in group.slices:
            rows = s.rows(masks.param(s.param).detach()).to(torch.float64)
            sums += (rows.abs().sum(1) if p == 1 else rows.square().sum(1)).cpu()
        return sums if p == 1 else sums.sqrt()


def _global_keep(
    experts: Sequence[ExpertGroup], scores: list[Tensor], kept: list[Tensor], sparsity: float
) -> list[int]:
    """Per block, how many experts to keep so that the lowest scores relative to their block's mean go first."""
    counts = [int(k.sum()) for k in kept]
    to_prune = round(sparsity * sum(e.num_experts for e in experts)) - sum(
        e.num_experts - c for e, c in zip(experts, counts)
    )
    if to_prune <= 0:
        return counts
    relative = []
    for s, k in zip(scores, kept):
        mean = s[k].mean()
        relative.append(s / mean if float(mean) > 0 else s)
    values = torch.cat([r[k] for r, k in zip(relative, kept)])
    owner = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
    remaining = list(counts)
    for j in torch.sort(values, stable=True).indices.tolist():
        i = int(owner[j])
        if remaining[i] > experts[i].top_k:
            remaining[i] -= 1
            to_prune -= 1
            if to_prune == 0:
                break
    return remaining


def _check_drop(expert: ExpertGroup, drop: int, key: str, given: str) -> None:
    left = expert.num_experts - drop
    if left < expert.top_k:
        name = expert.group.name or type(expert.block).__name__
        raise ValueError(
            f"`{key}`: {given} would leave {left} of the {expert.num_experts} experts of {name!r}, fewer than the "
            f"{expert.top_k} experts each token is routed to (`num_experts_per_tok`={expert.top_k}). Prune at most "
            f"{expert.num_experts - expert.top_k} experts per block, or lower `num_experts_per_tok` first."
        )


def _expert_masks(masks: MaskSet) -> ExpertMaskSet:
    if not isinstance(masks, ExpertMaskSet):
        raise TypeError(
            f"Expert pruning needs an ExpertMaskSet (from ExpertStructure.bind), got {type(masks).__name__}."
        )
    return masks


def _norm_order(importance: Importance) -> int:
    p = getattr(importance, "p", None)
    if isinstance(importance, LpNormImportance) and p in (1, 2):
        return int(p)
    raise ValueError(
        f"structure='experts' scores experts by their routing statistics and falls back to a norm of their weights: "
        f"it supports importance 'l1', 'l2' or 'magnitude' (= 'l1'), not {importance!r}."
    )


# ---------------------------------------------------------------------------------------------- one-shot
@torch.no_grad()
def prune_experts_(
    model: nn.Module,
    drop: int,
    batches: Iterable[Any] = (),
    score: ExpertScore = "mass",
    importance: str | Importance = "l2",
    ignore: Sequence[str] = (),
) -> ExpertMaskSet:
    """Prune ``drop`` experts from every MoE block of ``model`` at once, scored on calibration ``batches``.

    The batches run through ``model`` in eval mode (a tensor as the single argument, a tuple as positional
    arguments, a mapping as keyword arguments) while the routing statistics are recorded; then the ``drop``
    lowest-scored experts of every block are masked and the routing mask keeps them from being routed to.
    Compact with :func:`~lightning_prune.deploy.experts.compact_experts`.

    Args:
        model: a model with Mixtral-style MoE blocks (see :func:`find_experts`).
        drop: experts to prune in every block.
        batches: calibration inputs; none: the weight norm scores the experts.
        score: ``"mass"``, ``"frequency"`` or ``"weight"`` (see :class:`ExpertStructure`).
        importance: the weight norm, ``"l1"`` or ``"l2"``.
        ignore: module-name patterns of blocks to leave whole.

    Returns:
        The masks, routing mask installed.

    Raises:
        ValueError: ``drop`` is not a non-negative integer, or would leave a block fewer experts than it routes each
            token to; no MoE block; a bad ``score`` or ``importance``.
    """
    if not is_int(drop) or drop < 0:
        raise ValueError(f"`drop` must be a non-negative integer (experts per block), got {drop!r}.")
    structure = ExpertStructure(score)
    criterion = build_importance(importance)
    structure.check_importance(criterion)
    masks = structure.bind(model, ignore)
    for e in masks.experts:
        _check_drop(e, drop, "drop", f"drop={drop}")
    with eval_mode(model):
        for batch in batches:
            forward(model, batch)
    structure.prune_(masks, criterion, [drop / e.num_experts for e in masks.experts], scope="layer")
    return masks
