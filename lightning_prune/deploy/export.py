"""Deployable exports of a pruned model: the inference copy and ``torch.export`` programs, checked against it.

A channel-pruned model only becomes smaller once its pruned channels are removed, and BatchNorm layers cost a
pass over their activations until they are folded into the convolution before them. :func:`inference_model`
does both on a copy (:func:`~lightning_prune.deploy.compact.compact`, then
:func:`~lightning_prune.deploy.fold.deployable`); :func:`export_program` turns that copy into an
``ExportedProgram`` (``torch.export``, saved with ``torch.export.save``), and
:func:`~lightning_prune.deploy.onnx_export.export_onnx` into an ONNX file, from the same starting point
(``_export_setup``) and with the same checks. Every export is reloaded
from disk and compared with the pruned model it came from on the example inputs and, with a dynamic batch
dimension, on a batch of another size: outputs must agree to ``rtol`` (1e-5 by default) relative, in the L2
norm of each output.

Before anything is exported, :func:`~lightning_prune.deploy.archive.check_masks_applied` refuses a model
whose masks were never applied. A model that ``torch.export`` or the ONNX exporter cannot handle fails with
an :class:`ExportError` naming the innermost layer that fails on its own and the exporter's reason: the
layer's submodules are exported one by one, with the inputs they got in an eager forward, until the culprit
is found.

Example:
    >>> import tempfile
    >>> import torch
    >>> from pathlib import Path
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10))
    >>> x = torch.randn(4, 1, 8, 8)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     program = export_program(net.eval(), x, Path(folder) / "net.pt2")
    ...     reloaded = torch.export.load(Path(folder) / "net.pt2").module()
    ...     torch.allclose(reloaded(x[:3]), net(x[:3]), rtol=1e-5, atol=1e-6)
    True
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_prune._files import (
    atomic_write,
    check_path,
    prepare_folder,
    verify_sidecar,
    write_sidecar,
)
from lightning_prune._helpers import batched, check_flag, eval_mode, is_number, positional_tensors
from lightning_prune.deploy.archive import check_masks_applied
from lightning_prune.deploy.fold import deployable, relative_error

CompactMode = bool | Literal["auto"]


Inputs = Tensor | tuple[Tensor, ...]


class ExportError(ValueError):
    """A model that an exporter cannot handle; the message names the layer and the exporter's reason."""


# ---------------------------------------------------------------------------------------------- helpers
def _check_runs(model: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """A ``ValueError`` naming ``example_inputs`` when ``model`` does not run on them (wrong rank, dtype, ...)."""
    try:
        _reference_outputs(model, inputs)
    except Exception as err:
        described = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
        raise ValueError(
            f"`example_inputs` ({described}) do not run through {type(model).__name__}: {_first_lines(err)}. "
            "Pass one batch (batch first) of the inputs the model takes."
        ) from err


def _check_rtol(rtol: object) -> float:
    if not is_number(rtol) or not 0 <= rtol < math.inf:
        raise ValueError(f"`rtol` must be a number >= 0 (e.g. 1e-5), got {rtol!r}.")
    return float(rtol)


def _dynamic_shapes(inputs: tuple[Tensor, ...]) -> tuple[dict[int, Any] | None, ...]:
    batch = torch.export.Dim("batch")
    size = inputs[0].shape[0]
    return tuple({0: batch} if x.dim() >= 1 and x.shape[0] == size else None for x in inputs)


def _other_batch(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A batch of another size than the example's, to check a dynamic batch dimension with (its samples in
    reverse order, so that outputs baked in as constants show)."""
    batch = inputs[0].shape[0]
    return batched(inputs, batch + 1 if batch < 3 else batch - 1, reverse=True)


def _reference_outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
    with eval_mode(model), torch.no_grad():
        return model(*inputs)


# ---------------------------------------------------------------------------------------------- preparation
def inference_model(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    masks: Any = None,
    compact: CompactMode = "auto",
    fold_bn: bool = True,
    channels_last: bool = False,
    ignore: Sequence[str] = (),
) -> nn.Module:
    """The copy of a pruned model that gets exported: compacted, BatchNorm folded, in eval mode.

    ``model`` is not changed. Steps: :func:`~lightning_prune.deploy.archive.check_masks_applied`; then, for a
    transformer, :func:`~lightning_prune.deploy.transformer.compact_zero_heads`, which removes the attention heads and
    MLP neurons whose entries are all zero; then
    :func:`~lightning_prune.deploy.compact.compact`, which removes every coupled channel whose entries are all zero
    (Torch-Pruning's layer surgery, checked against ``model``); then
    :func:`~lightning_prune.deploy.fold.deployable`, which folds each BatchNorm into the convolution or linear layer
    before it.

    Args:
        model: The pruned network.
        example_inputs: One input batch (a tensor or a tuple of positional inputs).
        masks: Checked to be applied (see :func:`~lightning_prune.deploy.archive.check_masks_applied`).
        compact: ``True`` to compact (an error if the model has neither a zero head or neuron nor a channel
            group), ``False`` to skip it,
            ``"auto"`` to compact when Torch-Pruning can trace channel groups and to export the model as it is
            otherwise (a plain stack of linear layers whose channels all reach the output, say).
        fold_bn: Fold BatchNorms.
        channels_last: Store 4-D weights channels-last (for eager PyTorch inference; exporters choose their own
            layouts, so the default is off).
        ignore: Module-name patterns whose output channels stay whole when compacting.

    Returns:
        The eval-mode copy.

    Raises:
        ValueError: The masks were not applied, or ``compact=True`` and the model cannot be compacted.
        TypeError: A bad argument type.

    Example:
        >>> from lightning_prune.structures.channel import prune_channels_
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> _ = prune_channels_(net, x, sparsity=0.5)
        >>> small = inference_model(net, x)
        >>> small[0].out_channels, type(small[1]).__name__, small.training
        (8, 'Identity', False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    inputs = positional_tensors(example_inputs, batch_first=True)
    if compact not in (True, False, "auto"):
        raise ValueError(f"`compact` must be True, False or 'auto', got {compact!r}.")
    check_flag("fold_bn", fold_bn)
    check_flag("channels_last", channels_last)
    check_masks_applied(model, masks)
    small = model
    if compact is not False:
        from lightning_prune.deploy.compact import compact as compact_model
        from lightning_prune.deploy.transformer import compact_zero_heads

        # Zero attention heads and MLP neurons first: the channel tracer leaves attention's reshapes whole.
        headless = compact_zero_heads(model, ignore)
        source = model if headless is None else headless
        try:
            with warnings.catch_warnings(record=compact == "auto"):  # "auto": groups left whole are expected
                small = compact_model(source, inputs, ignore)
        except (ValueError, RuntimeError) as err:
            if compact is True and headless is None:
                raise ValueError(f"`compact=True` but {type(model).__name__} cannot be compacted: {err}") from err
            small = source
    with eval_mode(model):
        prepared = deployable(small, inputs, fold_bn=fold_bn, channels_last=channels_last)
    return prepared


# ---------------------------------------------------------------------------------------------- diagnosis
def _record_calls(model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """The (copied) arguments of each submodule's first call in one eval forward of ``model``."""
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []

    def clone(value: Any) -> Any:
        return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, Tensor) else v, value)

    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _name: str = name) -> None:
            if _name not in calls:
                calls[_name] = (clone(args), clone(kwargs))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _reference_outputs(model, inputs)
    except Exception:  # the eager forward itself fails: the caller reports the exporter's error as it is
        pass
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _first_lines(err: BaseException, limit: int = 400) -> str:
    """The first lines of the innermost cause of ``err`` (exporters wrap the real reason)."""
    while err.__cause__ is not None:
        err = err.__cause__
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # terminal colours
    text = " ".join(line.strip() for line in plain.strip().splitlines()[:4] if line.strip())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diagnose(
    exporter: str,
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    attempt: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], object],
    error: BaseException,
) -> ExportError:
    """An :class:`ExportError` naming the innermost submodule of ``model`` that ``attempt`` fails on."""
    calls = _record_calls(model, inputs)
    name, module, reason = "", model, error
    while True:
        failed = None
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full not in calls:
                continue
            args, kwargs = calls[full]
            try:
                with eval_mode(child):
                    attempt(child, args, kwargs)
            except Exception as child_error:
                failed = (full, child, child_error)
                break
        if failed is None:
            break
        name, module, reason = failed
    if "specialized it to be a constant" in str(error):
        return ExportError(
            f"{exporter} cannot export {type(model).__name__} with a dynamic batch: the model treats the first "
            f"dimension of `example_inputs` (shape {tuple(inputs[0].shape)}) as a fixed size, not as the batch. "
            "Pass the inputs batch first (e.g. x.unsqueeze(0) for one sample), or `dynamic_batch=False`."
        )
    where = (
        f"layer {name!r} ({type(module).__name__}) fails on its own"
        if name
        else f"{type(model).__name__}'s own forward fails (every submodule exports alone)"
    )
    return ExportError(
        f"{exporter} cannot export {type(model).__name__}: {where}: {_first_lines(reason)}. Rewrite that code "
        "for the exporter (data-dependent Python control flow, NumPy calls and unsupported operators are the usual "
        "causes), or leave this export form out."
    )


def _check_outputs(
    what: str,
    run: Callable[..., Any],
    model: nn.Module,
    batches: Sequence[tuple[Tensor, ...]],
    rtol: float,
    *,
    flat: bool = False,
) -> float:
    """Run ``run`` and ``model`` on each batch; raise unless they agree to ``rtol``; return the worst error.
    ``flat``: ``run`` returns the list of ``model``'s output tensors (as ONNX Runtime does)."""
    worst = 0.0
    for batch in batches:
        expected = _reference_outputs(model, batch)
        if flat:
            expected = [t for t in pytree.tree_leaves(expected) if isinstance(t, Tensor)]
        with torch.no_grad():
            got = run(*batch)
        error = relative_error(got, expected)
        if not error <= rtol:
            raise RuntimeError(
                f"The {what} computes something else than the pruned model: relative error {error:.2e} (more than "
                f"rtol={rtol:g}) on a batch of {batch[0].shape[0]}."
            )
        worst = max(worst, error)
    return worst


def _export_setup(
    model: nn.Module,
    example_inputs: Inputs,
    masks: Any,
    compact: CompactMode,
    fold_bn: bool,
    dynamic_batch: bool,
    check: bool,
    rtol: float,
    prepared: nn.Module | None,
) -> tuple[tuple[Tensor, ...], nn.Module, tuple[Tensor, ...], tuple[dict[int, Any] | None, ...] | None, float]:
    """What both exporters start from, their arguments checked: the inputs, the inference copy (``prepared`` or
    :func:`inference_model`'s), the batch to trace (of two samples at least when the batch is dynamic, since
    PyTorch specialises a size of 1), its dynamic shapes (None for a fixed batch) and ``rtol``."""
    inputs = positional_tensors(example_inputs, batch_first=True)
    check_flag("dynamic_batch", dynamic_batch)
    check_flag("check", check)
    rtol = _check_rtol(rtol)
    _check_runs(model, inputs)
    if prepared is None:
        prepared = inference_model(model, inputs, masks=masks, compact=compact, fold_bn=fold_bn)
    else:
        check_masks_applied(model, masks)
    trace = batched(inputs, max(2, inputs[0].shape[0])) if dynamic_batch else inputs
    shapes = _dynamic_shapes(trace) if dynamic_batch else None
    return inputs, prepared, trace, shapes, rtol


# ---------------------------------------------------------------------------------------------- torch.export
def export_program(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | Path | None = None,
    *,
    masks: Any = None,
    compact: CompactMode = "auto",
    fold_bn: bool = True,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-5,
    prepared: nn.Module | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` of the compacted, BatchNorm-folded copy of ``model``, saved to ``path`` if given.

    The copy is :func:`inference_model`'s (or ``prepared``, when built already). It is exported with
    ``torch.export.export(strict=False)``, with the batch dimension dynamic (``torch.export.Dim``) unless
    ``dynamic_batch=False``; an example batch of one is repeated to two for tracing, since PyTorch specialises
    sizes 0 and 1. With ``path``, the program is written with ``torch.export.save`` and the check runs on the
    program ``torch.export.load`` reads back.

    Args:
        model: The pruned network (the reference of the check).
        example_inputs: One input batch (a tensor or a tuple of positional inputs).
        path: Where to save the program (``.pt2``); None to keep it in memory.
        masks: Checked to be applied first.
        compact: See :func:`inference_model`.
        fold_bn: See :func:`inference_model`.
        dynamic_batch: Export with a dynamic batch dimension.
        check: Compare the program's outputs with ``model``'s on the example inputs and on a batch of another
            size; raise ``RuntimeError`` beyond ``rtol``.
        rtol: The check's tolerance (L2-relative, per output).
        prepared: The copy to export, if already built by :func:`inference_model`.

    Returns:
        The ``ExportedProgram`` (the reloaded one when saved).

    Raises:
        ExportError: ``torch.export`` fails; the message names the layer and why.
        ValueError: The masks were not applied (see :func:`inference_model`), or ``model`` does not run on
            ``example_inputs`` (wrong rank or dtype).
        ArtifactWriteError: ``path`` could not be written (an ``OSError`` naming it and the reason; the previous
            file is unchanged).
        RuntimeError: The program computes something else than ``model``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> program = export_program(net, torch.randn(1, 4))
        >>> program.module()(torch.randn(5, 4)).shape
        torch.Size([5, 2])
    """
    if path is not None:
        path = check_path(path)
        prepare_folder(path)  # a folder that cannot hold the file fails before the export, not after
    inputs, prepared, trace, shapes, rtol = _export_setup(
        model, example_inputs, masks, compact, fold_bn, dynamic_batch, check, rtol, prepared
    )

    def attempt(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
        return torch.export.export(module, args, kwargs, strict=False)

    try:
        with eval_mode(prepared):
            program = torch.export.export(prepared, trace, dynamic_shapes=shapes, strict=False)
    except Exception as err:
        raise _diagnose("torch.export", prepared, trace, attempt, err) from err
    if path is not None:
        buffer = io.BytesIO()  # torch's file writer aborts the process on a full disk; Python's write raises
        torch.export.save(program, buffer)
        atomic_write(path, buffer.getbuffer())
        write_sidecar(path)
        program = load_program(path)
    if check:
        batches = [inputs, _other_batch(inputs)] if dynamic_batch else [inputs]
        _check_outputs("ExportedProgram", program.module(), model, batches, rtol)
    return program


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """``torch.export.load`` of a program :func:`export_program` saved, checked against its digest first.

    Raises:
        ValueError: No file at ``path``, or its bytes differ from the digest written beside it (``.sha256``).

    Example:
        >>> import tempfile
        >>> net = nn.Linear(3, 1)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = export_program(net, torch.randn(2, 3), Path(folder) / "net.pt2")
        ...     load_program(Path(folder) / "net.pt2").module()(torch.randn(4, 3)).shape
        torch.Size([4, 1])
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"No exported program at {str(path)!r}: the file does not exist.")
    verify_sidecar(path)
    try:
        return torch.export.load(path)
    except Exception as err:
        raise ValueError(
            f"{str(path)!r} is not a program saved by torch.export.save, or it is damaged ({_first_lines(err)})."
        ) from err
