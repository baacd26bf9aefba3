"""Deployment: what turns a pruned model into something smaller and faster to ship.

* :mod:`~lightning_prune.deploy.compact`: remove pruned channels (:func:`compact`), save and reload the smaller
  model (:func:`save_compact`, :func:`load_compact`);
* :mod:`~lightning_prune.deploy.transformer`: remove pruned attention heads and MLP neurons (:func:`compact_heads`;
  :func:`compact_zero_heads` from the weights alone),
  save a Hugging Face model with its config rewritten (:func:`save_pretrained_compact`) and LitGPT's ``GPT`` as a
  LitGPT checkpoint (:func:`save_litgpt_compact`);
* :mod:`~lightning_prune.deploy.experts`: remove pruned experts of a mixture of experts (:func:`compact_experts`);
* :mod:`~lightning_prune.deploy.attention`: the drop-in ``nn.MultiheadAttention`` with fewer heads that a head-pruned
  one compacts to (:class:`CompactMultiheadAttention`), and :mod:`~lightning_prune.deploy.window_attention`: those of
  torchvision's Swin and MaxViT (:class:`CompactShiftedWindowAttention`, :class:`CompactRelativeAttention`);
* :mod:`~lightning_prune.deploy.depth`: remove whole blocks (depth pruning) with the layer counts rewritten
  (:func:`remove_blocks`);
* :mod:`~lightning_prune.deploy.fold`: fold BatchNorm into the layers before it (:func:`deployable`);
* :mod:`~lightning_prune.deploy.archive`: a file that stores only the nonzero weights (:func:`save_sparse`);
* :mod:`~lightning_prune.deploy.export`: the inference copy and ``torch.export`` of the compact model;
  :mod:`~lightning_prune.deploy.onnx_export`: its ONNX file, run with ONNX Runtime;
* :mod:`~lightning_prune.deploy.sparse_layers` and :mod:`~lightning_prune.deploy.kernels`: CSR layers, used where
  measuring shows they are faster (:func:`sparse_inference`);
* :mod:`~lightning_prune.deploy.profile`: parameters, MACs and latency of a model;
* :mod:`~lightning_prune.deploy.report`: all of it at once, with a report (:func:`export_model`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.structures import prune_channels_
    >>> net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
    >>> _ = prune_channels_(net, torch.randn(2, 4), sparsity=0.5)
    >>> compact(net, torch.randn(2, 4))[0]
    Linear(in_features=4, out_features=5, bias=True)
"""

from lightning_prune.deploy.archive import check_masks_applied, load_sparse, load_sparse_state_dict, save_sparse
from lightning_prune.deploy.attention import CompactMultiheadAttention
from lightning_prune.deploy.compact import compact, compact_state, load_compact, save_compact
from lightning_prune.deploy.depth import remove_blocks, remove_blocks_
from lightning_prune.deploy.experts import compact_experts
from lightning_prune.deploy.export import ExportError, export_program, inference_model, load_program
from lightning_prune.deploy.fold import deployable, relative_error
from lightning_prune.deploy.kernels import sparse_inference
from lightning_prune.deploy.onnx_export import export_onnx
from lightning_prune.deploy.profile import ModelProfile, count_macs, count_parameters, measure_latency, profile_model
from lightning_prune.deploy.report import ExportReport, export_model
from lightning_prune.deploy.sparse_layers import SparseConv2d, SparseLinear
from lightning_prune.deploy.transformer import (
    compact_heads,
    compact_zero_heads,
    save_litgpt_compact,
    save_pretrained_compact,
)
from lightning_prune.deploy.window_attention import CompactRelativeAttention, CompactShiftedWindowAttention

__all__ = [
    "CompactMultiheadAttention",
    "CompactRelativeAttention",
    "CompactShiftedWindowAttention",
    "ExportError",
    "ExportReport",
    "ModelProfile",
    "SparseConv2d",
    "SparseLinear",
    "check_masks_applied",
    "compact",
    "compact_experts",
    "compact_heads",
    "compact_state",
    "compact_zero_heads",
    "count_macs",
    "count_parameters",
    "deployable",
    "export_model",
    "export_onnx",
    "export_program",
    "inference_model",
    "load_compact",
    "load_program",
    "load_sparse",
    "load_sparse_state_dict",
    "measure_latency",
    "profile_model",
    "relative_error",
    "remove_blocks",
    "remove_blocks_",
    "save_compact",
    "save_litgpt_compact",
    "save_pretrained_compact",
    "save_sparse",
    "sparse_inference",
]
