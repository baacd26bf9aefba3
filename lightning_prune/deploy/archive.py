"""Sparse archives: a pruned model's state dict with its zeros left out, restored bit for bit.

A pruned weight that is stored as a dense tensor takes as much disk as a trained one. :func:`save_sparse`
writes every tensor of a state dict in whichever of three encodings is smallest:

* ``dense``: the tensor as it is (biases, BatchNorm statistics, layers left dense);
* ``bitmask``: one bit per entry saying which entries are nonzero (``numpy.packbits``, little-endian bit
  order), then the nonzero values in row-major order: ``numel / 8 + nnz * itemsize`` bytes, so a float32
  weight at 90% sparsity takes 13% of its dense size;
* ``indices``: the flat positions of the nonzero entries (int32, or int64 beyond 2^31 entries) and their
  values, smaller than the bitmask above about 97% sparsity.

This is the compressed-sparse idea of Han et al., "Deep Compression" (ICLR 2016), without their quantisation
and Huffman stages: the archive restores the exact model. A floating-point zero is an entry equal to 0; the
sign bits of negative zeros (masking by multiplication leaves ``-0.0`` where a weight was negative) are kept,
as one bit per zero entry or the positions of the negative ones, whichever is smaller, so the loaded tensors
are bitwise equal to the saved ones (NaN payloads included: values are moved as integers of the same width).
``signed_zeros=False`` drops those bits and restores every zero as ``+0.0``, which computes the same outputs.

The file is written with ``torch.save`` and holds only one byte tensor (every section, 8-byte aligned),
strings, integers, lists and dicts, so it loads with ``torch.load(weights_only=True)``: no pickled code. It
records a format name and version, and each tensor's shape, dtype and sections, and :func:`load_sparse`
refuses a model whose keys, shapes or dtypes differ.

:func:`check_masks_applied` is the check every export runs first: a model whose masks were never applied
(pruned entries still nonzero) would be exported as a model that was not pruned.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(100, 100)
    >>> with torch.no_grad():
    ...     net.weight[torch.rand(100, 100, generator=torch.Generator().manual_seed(0)) < 0.9] = 0
    >>> archive = sparse_archive(net)
    >>> archive["tensors"]["weight"]["encoding"], archive["tensors"]["bias"]["encoding"]
    ('bitmask', 'dense')
    >>> restored = load_sparse(nn.Linear(100, 100), archive)
    >>> torch.equal(restored.weight, net.weight) and torch.equal(restored.bias, net.bias)
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_prune._files import atomic_save, check_path, load_torch_file, verify_digest, with_digest
from lightning_prune._helpers import check_flag

SPARSE_FORMAT = "lightning_prune.sparse_state_dict"


SPARSE_VERSION = 1


Encoding = Literal["dense", "bitmask", "indices"]


#: Bytes an encoding must save before it is used instead of ``dense``: every tensor of a ``torch.save`` zip
#: is its own record, aligned to 64 bytes, so splitting a small tensor in two costs more than it saves.
_MIN_SAVING = 128


#: Integer dtypes of each width, through which values are moved bit for bit.
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}


# ---------------------------------------------------------------------------------------------- masks
def check_masks_applied(model: nn.Module, masks: Any) -> None:
    """Raise unless every entry that ``masks`` prune is exactly zero in ``model``.

    A model whose masks were built but never applied still holds its pruned weights: exporting it would write
    a model that computes what the unpruned one does, at none of the savings. Also refused: a model
    reparametrised by ``torch.nn.utils.prune`` (``weight_orig`` times ``weight_mask``), whose state dict
    holds the unpruned weights.

    Args:
        model: The network to export.
        masks: ``None`` (only the reparametrisation is checked), a
            :class:`~lightning_prune.masks.maskset.MaskSet` over ``model``'s parameters, an object holding one as
            ``.masks`` (a fitted :class:`~lightning_prune.PruningCallback`), or a mapping from ``model``'s
            parameter names to boolean keep-masks (True = kept), e.g. a checkpoint's saved masks.

    Raises:
        ValueError: A pruned entry is nonzero, a mask names a parameter ``model`` lacks or has another shape,
            a callback has not pruned yet, or ``model`` is reparametrised by ``torch.nn.utils.prune``.
        TypeError: ``masks`` is none of the above.

    Example:
        >>> from lightning_prune.masks import MaskSet
        >>> net = nn.Linear(4, 2)
        >>> masks = MaskSet({"weight": net.weight})
        >>> masks.masks[0][0] = False  # pruned, but the weights were not zeroed
        >>> check_masks_applied(net, masks)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: The pruning masks were not applied to Linear: weight has 4 nonzero entries among the 4 its ...
        >>> masks.apply_()
        >>> check_masks_applied(net, masks)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    _check_not_reparametrised(model)
    if masks is None:
        return
    pairs = _mask_pairs(model, masks)
    problems = []
    for name, param, keep in pairs:
        pruned = ~keep.to(device=param.device, dtype=torch.bool)
        left = int(torch.count_nonzero(param.detach()[pruned]))
        if left:
            problems.append(f"{name} has {left} nonzero entries among the {int(pruned.sum())} its mask prunes")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more parameters" if len(problems) > 3 else "")
        raise ValueError(
            f"The pruning masks were not applied to {type(model).__name__}: {shown}. Call `masks.apply_()` "
            "(a PruningCallback applies them while training) before exporting."
        )


def _check_not_reparametrised(model: nn.Module) -> None:
    for module_name, module in model.named_modules():
        for attr in list(module._parameters):
            if attr.endswith("_orig") and hasattr(module, attr.removesuffix("_orig") + "_mask"):
                name = f"{module_name}.{attr}" if module_name else attr
                raise ValueError(
                    f"{type(model).__name__} is reparametrised by torch.nn.utils.prune ({name} times its mask): "
                    "its state dict holds the unpruned weights. Call torch.nn.utils.prune.remove(module, "
                    f"{attr.removesuffix('_orig')!r}) on every pruned module first, so that the zeros are in the "
                    "weights."
                )


def _mask_pairs(model: nn.Module, masks: Any) -> list[tuple[str, Tensor, Tensor]]:
    """(name, parameter of ``model``, keep-mask) for each mask of ``masks``."""
    from lightning_prune.masks.maskset import MaskSet

    if not isinstance(masks, (MaskSet, Mapping)) and hasattr(masks, "masks"):
        inner = masks.masks
        if inner is None:
            raise ValueError(
                f"{type(masks).__name__} has no masks yet: it builds them when training starts. Fit it first, or "
                "pass `masks=None` to export the model as it is."
            )
        masks = inner
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    pairs: list[tuple[str, Tensor, Tensor]] = []
    if isinstance(masks, MaskSet):
        for name, param, keep in zip(masks.names, masks.params, masks.masks):
            own = by_id.get(id(param))
            if own is None and name in named and named[name].shape == param.shape:
                own = name  # a copy of the model the masks were built on
            if own is None:
                raise ValueError(
                    f"The masks prune {name!r}, which is not a parameter of this {type(model).__name__}: pass the "
                    "model the masks were built on (or its inner network)."
                )
            pairs.append((own, named[own], keep))
        return pairs
    if isinstance(masks, Mapping):
        for name, keep in masks.items():
            if name not in named:
                close = [n for n in named if n.endswith(str(name).split(".", 1)[-1])][:3]
                raise ValueError(
                    f"`masks` names {name!r}, which is not a parameter of this {type(model).__name__}"
                    + (f" (similar: {close})" if close else "")
                    + ". Its keys must be the model's parameter names, e.g. without a LightningModule's 'model.'."
                )
            if not isinstance(keep, Tensor) or tuple(keep.shape) != tuple(named[name].shape):
                shape = tuple(keep.shape) if isinstance(keep, Tensor) else type(keep).__name__
                raise ValueError(
                    f"The mask of {name!r} has shape {shape}, the parameter {tuple(named[name].shape)}: the masks "
                    "were saved from another model."
                )
            pairs.append((name, named[name], keep))
        return pairs
    raise TypeError(
        "`masks` must be None, a MaskSet, a fitted PruningCallback or a mapping of parameter names to boolean "
        f"keep-masks, got {type(masks).__name__}."
    )


# ---------------------------------------------------------------------------------------------- encoding
class _Blob:
    """Collects byte sections, each aligned to 8 bytes, into one ``uint8`` tensor; hands out references."""

    def __init__(self) -> None:
        self.chunks: list[Tensor] = []
        self.size = 0

    def put(self, tensor: Tensor) -> dict[str, Any]:
        flat = tensor.detach().reshape(-1).contiguous()
        data = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
        ref = {"offset": self.size, "count": flat.numel(), "dtype": str(flat.dtype).removeprefix("torch.")}
        pad = -data.numel() % 8
        self.chunks.append(data)
        if pad:
            self.chunks.append(torch.zeros(pad, dtype=torch.uint8))
        self.size += data.numel() + pad
        return ref

    def tensor(self) -> Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.zeros(0, dtype=torch.uint8)


def sparse_archive(
    model: nn.Module | Mapping[str, Tensor], *, masks: Any = None, signed_zeros: bool = True
) -> dict[str, Any]:
    """The sparse archive of ``model``'s state dict, in memory: what :func:`save_sparse` writes.

    Every tensor's sections (its dense data, or its bitmask or indices and its nonzero values) are stored in
    one ``uint8`` tensor, ``blob``, 8-byte aligned; each entry of ``tensors`` names its ``encoding``, ``shape``
    and ``dtype`` and, for each section, its ``offset``, ``count`` and ``dtype`` in the blob. One blob keeps the
    file small: each tensor of a ``torch.save`` file is its own zip record of about 150 bytes.

    Args:
        model: A network (its ``state_dict()`` is archived) or a state dict of tensors.
        masks: Checked with :func:`check_masks_applied` first when ``model`` is a network (``None``: no check
            beyond ``torch.nn.utils.prune``'s reparametrisation).
        signed_zeros: Keep the sign bits of negative zeros (bitwise-exact restore); False restores them as
            ``+0.0`` and saves up to one bit per zero entry.

    Returns:
        ``{"format", "version", "architecture", "tensors": {key: entry}, "blob": uint8 tensor}``, plain types.

    Raises:
        ValueError: The masks were not applied, or a state dict entry is not a dense tensor (extra state, a
            sparse or meta tensor).
        TypeError: ``model`` is neither a module nor a mapping.

    Example:
        >>> archive = sparse_archive({"w": torch.tensor([0.0, 1.5, 0.0, -0.0])})
        >>> entry = archive["tensors"]["w"]
        >>> entry["encoding"], entry["shape"], entry["dtype"], entry["data"]
        ('dense', [4], 'float32', {'offset': 0, 'count': 4, 'dtype': 'float32'})
    """
    check_flag("signed_zeros", signed_zeros)
    if isinstance(model, nn.Module):
        check_masks_applied(model, masks)
        state: Mapping[str, Any] = model.state_dict()
        architecture: str | None = type(model).__qualname__
    elif isinstance(model, Mapping):
        state, architecture = model, None
    else:
        raise TypeError(f"`model` must be a torch.nn.Module or a state dict, got {type(model).__name__}.")
    blob = _Blob()
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"State dict entry {key!r} is a {type(value).__name__}, not a tensor (a module's extra state?): "
                "a sparse archive holds tensors only."
            )
        tensors[str(key)] = _encode(str(key), value.detach(), signed_zeros, blob)
    return {
        "format": SPARSE_FORMAT,
        "version": SPARSE_VERSION,
        "architecture": architecture,
        "tensors": tensors,
        "blob": blob.tensor(),
    }


def _dtype_name(key: str, tensor: Tensor) -> str:
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
        raise ValueError(
            f"State dict entry {key!r} is a {tensor.layout} {'quantised ' if tensor.is_quantized else ''}tensor on "
            f"{tensor.device}: a sparse archive stores dense (strided) tensors with data. Convert it first."
        )
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"State dict entry {key!r} has dtype {tensor.dtype}, which sparse archives do not store.")
    return name


def _encode(key: str, tensor: Tensor, signed_zeros: bool, blob: _Blob) -> dict[str, Any]:
    dtype = _dtype_name(key, tensor)
    flat = tensor.cpu().contiguous().reshape(-1)
    entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": dtype}
    numel, itemsize = flat.numel(), flat.element_size()
    dense_bytes = numel * itemsize
    if tensor.is_complex() or dense_bytes < _MIN_SAVING:
        return {**entry, "encoding": "dense", "data": blob.put(flat)}
    nonzero = flat != 0
    nnz = int(torch.count_nonzero(nonzero))
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    index_bytes = 4 if index_dtype == torch.int32 else 8
    negative: Tensor | None = None
    sign_bytes = 0
    if signed_zeros and tensor.is_floating_point() and nnz < numel:
        negative = torch.signbit(flat[~nonzero])  # one per zero entry, in order
        count = int(torch.count_nonzero(negative))
        sign_bytes = 0 if count == 0 else min(math.ceil((numel - nnz) / 8), count * index_bytes)
        negative = negative if count else None
    sizes = {
        "bitmask": math.ceil(numel / 8) + nnz * itemsize + sign_bytes,
        "indices": nnz * (index_bytes + itemsize) + sign_bytes,
    }
    encoding = min(sizes, key=lambda k: sizes[k])
    if sizes[encoding] + _MIN_SAVING >= dense_bytes:
        return {**entry, "encoding": "dense", "data": blob.put(flat)}
    entry["encoding"] = encoding
    if encoding == "bitmask":
        entry["bitmask"] = blob.put(_packbits(nonzero))
    else:
        entry["indices"] = blob.put(torch.nonzero(nonzero).reshape(-1).to(index_dtype))
    entry["values"] = blob.put(flat.view(_INT_VIEW[itemsize])[nonzero])  # moved as integers: bit for bit
    if negative is not None:
        if math.ceil((numel - nnz) / 8) <= int(negative.sum()) * index_bytes:
            entry["negative_zeros"] = {"bitmask": blob.put(_packbits(negative))}
        else:
            entry["negative_zeros"] = {"indices": blob.put(torch.nonzero(negative).reshape(-1).to(index_dtype))}
    return entry


def _packbits(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))


def _unpackbits(bits: Tensor, count: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=count, bitorder="little").astype(bool))


# ---------------------------------------------------------------------------------------------- saving
def save_sparse(
    model: nn.Module | Mapping[str, Tensor],
    path: str | Path,
    *,
    masks: Any = None,
    signed_zeros: bool = True,
) -> Path:
    """Write :func:`sparse_archive` of ``model`` to ``path``; returns the path.

    The file is written atomically (a failure leaves the previous file as it was) and holds a digest of its
    content, which :func:`load_sparse` checks.

    Args:
        model: A network or a state dict.
        path: The file to write (its folder is created).
        masks: Checked with :func:`check_masks_applied` first (see :func:`sparse_archive`).
        signed_zeros: Keep the signs of negative zeros (bitwise-exact restore).

    Returns:
        ``path``.

    Raises:
        TypeError: ``path`` is not a path.
        ArtifactWriteError: The file could not be written (an ``OSError`` naming the path and the reason).

    Example:
        >>> import tempfile
        >>> net = nn.Linear(64, 64, bias=False)
        >>> _ = nn.init.zeros_(net.weight[:60])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     dense = Path(folder) / "dense.pt"
        ...     torch.save(net.state_dict(), dense)
        ...     sparse = save_sparse(net, Path(folder) / "sparse.pt")
        ...     sparse.stat().st_size < 0.2 * dense.stat().st_size
        True
    """
    path = check_path(path)
    archive = sparse_archive(model, masks=masks, signed_zeros=signed_zeros)
    return atomic_save(with_digest(archive), path)


def _read(archive: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(archive, (str, Path)):
        path = Path(archive)
        if not path.is_file():
            raise ValueError(f"No sparse archive at {str(path)!r}: the file does not exist.")
        archive = load_torch_file(path, "sparse archive")
        if isinstance(archive, Mapping):
            verify_digest(archive, str(path))
    if not isinstance(archive, Mapping) or archive.get("format") != SPARSE_FORMAT:
        raise ValueError(
            "`archive` is not a sparse archive written by lightning_prune.save_sparse / sparse_archive (no "
            f"format {SPARSE_FORMAT!r})."
        )
    if archive.get("version") != SPARSE_VERSION:
        raise ValueError(
            f"Sparse archive format version {archive.get('version')!r} is not supported (this version reads "
            f"{SPARSE_VERSION}); load it with the lightning-prune release that wrote it."
        )
    return archive


def load_sparse_state_dict(archive: Mapping[str, Any] | str | Path) -> dict[str, Tensor]:
    """Decode a sparse archive (a path, or :func:`sparse_archive`'s dict) into a dense state dict.

    Raises:
        ValueError: Not a sparse archive, an unsupported version, or a damaged entry (sections outside the
            blob, or sizes that disagree with the entry's shape).

    Example:
        >>> w = torch.tensor([[0.0, 2.0], [-0.0, 0.0]]).repeat(40, 40)
        >>> restored = load_sparse_state_dict(sparse_archive({"w": w}))["w"]
        >>> torch.equal(restored.view(torch.int32), w.view(torch.int32))  # bitwise: -0.0 stays -0.0
        True
    """
    read = _read(archive)
    blob = read.get("blob")
    if not isinstance(blob, Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError("The sparse archive is damaged: it has no `blob` of bytes.")
    return {key: _decode(key, entry, blob) for key, entry in read["tensors"].items()}


def _take(key: str, blob: Tensor, ref: Any, dtype: torch.dtype | None = None) -> Tensor:
    """The section ``ref`` of ``blob``: a 1-D view of its dtype (checked against ``dtype`` when given)."""
    try:
        offset, count, kind = int(ref["offset"]), int(ref["count"]), _DTYPES.get(ref["dtype"])
    except (TypeError, KeyError, ValueError):
        kind = None
    if kind is None or (dtype is not None and kind != dtype):
        raise ValueError(f"Sparse archive entry {key!r} is damaged: a section reference {ref!r} is not valid.")
    size = count * torch.empty(0, dtype=kind).element_size()
    if offset < 0 or count < 0 or offset % 8 or offset + size > blob.numel():
        raise ValueError(f"Sparse archive entry {key!r} is damaged: a section lies outside the archive's bytes.")
    return blob[offset : offset + size].view(kind)


def _decode(key: str, entry: Mapping[str, Any], blob: Tensor) -> Tensor:
    dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    shape = entry.get("shape")
    if dtype is None or not isinstance(shape, list):
        raise ValueError(f"Sparse archive entry {key!r} is damaged: dtype {entry.get('dtype')!r}, shape {shape!r}.")
    numel = math.prod(shape)
    encoding = entry.get("encoding")
    if encoding == "dense":
        data = _take(key, blob, entry.get("data"), dtype)
        if data.numel() != numel:
            raise ValueError(f"Sparse archive entry {key!r} is damaged: {data.numel()} entries for shape {shape}.")
        return data.clone().reshape(shape)
    if encoding not in ("bitmask", "indices"):
        raise ValueError(f"Sparse archive entry {key!r} has an unknown encoding {encoding!r}.")
    view = _INT_VIEW[torch.empty(0, dtype=dtype).element_size()]
    values = _take(key, blob, entry.get("values"), view)
    if encoding == "bitmask":
        nonzero = _unpackbits(_take(key, blob, entry.get("bitmask"), torch.uint8), numel)
    else:
        nonzero = torch.zeros(numel, dtype=torch.bool)
        nonzero[_take(key, blob, entry.get("indices")).long()] = True
    if values.numel() != int(nonzero.sum()):
        raise ValueError(
            f"Sparse archive entry {key!r} is damaged: {values.numel()} values for {int(nonzero.sum())} nonzero "
            "positions."
        )
    out = torch.zeros(numel, dtype=dtype)
    out.view(view)[nonzero] = values
    negative = entry.get("negative_zeros")
    if negative is not None:
        zeros = torch.nonzero(~nonzero).reshape(-1)
        if "bitmask" in negative:
            signs = _unpackbits(_take(key, blob, negative["bitmask"], torch.uint8), zeros.numel())
            out[zeros[signs]] = -0.0
        else:
            out[zeros[_take(key, blob, negative.get("indices")).long()]] = -0.0
    return out.reshape(shape)


@torch.no_grad()
def load_sparse(model: nn.Module, archive: Mapping[str, Any] | str | Path) -> nn.Module:
    """Load a sparse archive into ``model`` (in place, strictly) and return it.

    Every key, shape and dtype is checked before anything is loaded, so a model of another architecture or
    width is refused with the differences named and left unchanged; nothing is converted or broadcast.

    Args:
        model: A network of the architecture and widths the archive was saved from (for a compacted model,
            resize a fresh one with :func:`~lightning_prune.deploy.compact.load_compact` first).
        archive: A path written by :func:`save_sparse`, or :func:`sparse_archive`'s dict.

    Returns:
        ``model``, holding exactly the archived tensors.

    Raises:
        ValueError: The archive is not one, or its keys, shapes or dtypes differ from ``model``'s.

    Example:
        >>> archive = sparse_archive(nn.Linear(4, 3))
        >>> load_sparse(nn.Linear(4, 2), archive)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: The sparse archive does not fit this Linear (saved from a Linear): weight: archived shape ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    read = _read(archive)
    state = load_sparse_state_dict(read)
    current = model.state_dict()
    problems = [f"missing {key}" for key in current if key not in state]
    problems += [f"unexpected {key}" for key in state if key not in current]
    for key, saved in state.items():
        own = current.get(key)
        if own is None:
            continue
        if own.shape != saved.shape:
            problems.append(f"{key}: archived shape {tuple(saved.shape)}, the model's {tuple(own.shape)}")
        elif own.dtype != saved.dtype:
            problems.append(f"{key}: archived dtype {saved.dtype}, the model's {own.dtype}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        saved_from = read.get("architecture") or "a state dict"
        raise ValueError(
            f"The sparse archive does not fit this {type(model).__name__} (saved from a {saved_from}): {shown}. "
            "Build the model with the widths it was saved with."
        )
    model.load_state_dict(state, strict=True)
    return model
