"""Mixture-of-experts compaction: remove pruned experts for a smaller dense model.

:func:`compact_experts` takes the masks of an :class:`~lightning_prune.structures.experts.ExpertStructure` and returns
a copy of the model whose routers hold only the kept experts' rows and whose fused expert weights (``gate_up_proj``,
``down_proj``) only the kept experts' slices, with ``num_experts`` rewritten on the routers, the expert modules and,
when every block keeps as many, the model itself (the Hugging Face causal LM's auxiliary loss reads it). The masked
model routes with the pruned experts' logits at ``-inf``, so the compact model computes the same outputs.
:func:`~lightning_prune.deploy.transformer.save_pretrained_compact` saves a uniformly pruned Hugging Face model with
its config's expert count rewritten; different counts per block reload through
:func:`~lightning_prune.deploy.compact.load_compact`.

Example:
    >>> import torch
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> from lightning_prune.structures.experts import prune_experts_
    >>> _ = torch.manual_seed(0)
    >>> config = MixtralConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
    ...                        num_key_value_heads=1, num_local_experts=4, vocab_size=32)
    >>> model = MixtralForCausalLM(config).eval()
    >>> masks = prune_experts_(model, drop=2, batches=[torch.randint(0, 32, (2, 8))])
    >>> small = compact_experts(model, masks)
    >>> small.model.layers[0].mlp.experts.gate_up_proj.shape, small.num_experts
    (torch.Size([2, 16, 16]), 2)
    >>> x = torch.randint(0, 32, (1, 8))
    >>> bool(torch.allclose(small(x).logits, model(x).logits, atol=1e-5))
    True
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_prune.deploy.transformer import _prefix
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.structures.experts import ExpertMaskSet, remove_routing_hooks

__all__ = ["compact_experts"]


@torch.no_grad()
def compact_experts(model: nn.Module, masks: MaskSet) -> nn.Module:
    """A copy of ``model`` without the experts that ``masks`` prune; ``model`` is left as it is (routing mask included).

    Args:
        model: the model the masks were bound to (:meth:`ExpertStructure.bind`), or a submodule holding every masked
            parameter (the network inside the ``LightningModule`` a ``PruningCallback`` pruned:
            ``compact_experts(module.model, callback.masks)``).
        masks: the :class:`~lightning_prune.structures.experts.ExpertMaskSet`.

    Returns:
        The smaller model: same outputs, fewer experts, no routing mask.

    Raises:
        TypeError: ``masks`` are not expert masks.
        ValueError: the masks are not ``model``'s.
    """
    if not isinstance(masks, ExpertMaskSet):
        raise TypeError(f"`masks` must be an ExpertMaskSet (from ExpertStructure.bind), got {type(masks).__name__}.")
    cut = len(_prefix(model, masks))
    small = copy.deepcopy(model)
    for m in small.modules():
        remove_routing_hooks(m)  # the copy carries the masked model's hooks over; its routers need none
    modules = dict(small.named_modules())
    counts = set()
    for expert in masks.experts:
        keep = torch.nonzero(masks.kept(expert.group)).flatten()
        block = modules[expert.group.name[cut:]]
        router, experts = block.gate, block.experts
        router.weight = _select(router.weight, keep)
        experts.gate_up_proj = _select(experts.gate_up_proj, keep)
        experts.down_proj = _select(experts.down_proj, keep)
        for m in (router, experts, block):
            if hasattr(m, "num_experts"):
                m.num_experts = len(keep)
        counts.add(len(keep))
    if len(counts) == 1 and isinstance(getattr(small, "num_experts", None), int):
        setattr(small, "num_experts", counts.pop())  # noqa: B010 (an untyped Hugging Face attribute)
    return small


def _select(param: Tensor, keep: Tensor) -> nn.Parameter:
    return nn.Parameter(param.detach().index_select(0, keep.to(param.device)).clone(), param.requires_grad)
