"""ONNX files of a pruned model, written by PyTorch's ``torch.export``-based exporter and run with ONNX Runtime.

:func:`export_onnx` starts from the same compacted, BatchNorm-folded copy as
:func:`~lightning_prune.deploy.export.export_program` and checks the file the same way: it is validated with
``onnx.checker`` and run by ONNX Runtime (:func:`onnx_runner`) on the example inputs and on a batch of another size
against the pruned model. Needs ``pip install "lightning-prune[export]"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune._files import atomic_write_files, check_path, prepare_folder, verify_sidecar, write_sidecar
from lightning_prune._helpers import eval_mode, is_int
from lightning_prune.deploy.export import (
    CompactMode,
    Inputs,
    _check_outputs,
    _diagnose,
    _export_setup,
    _other_batch,
)

__all__ = ["MIN_ONNX_OPSET", "export_onnx", "onnx_files", "onnx_runner"]

#: The lowest ONNX opset that ``torch.onnx.export(dynamo=True)`` writes.
MIN_ONNX_OPSET = 18


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs the `onnx` and `onnxruntime` packages ({err.name} is missing): "
            'pip install "lightning-prune[export]".'
        ) from err
    return onnx, onnxruntime


def onnx_runner(path: str | Path, *, threads: int | None = None) -> Callable[..., list[Tensor]]:
    """A callable that runs an ONNX file with ONNX Runtime's CPU provider: tensors in, a list of tensors out.

    Args:
        path: The ``.onnx`` file.
        threads: ONNX Runtime's intra-op threads (None: its default, all cores).

    Raises:
        ImportError: ``onnxruntime`` is not installed.
        ValueError: ``path`` does not exist.

    Example:
        >>> import tempfile
        >>> from onnx import TensorProto, helper, save
        >>> x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3]) for n in ("x", "y"))
        >>> graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), f"{folder}/relu.onnx")
        ...     run = onnx_runner(f"{folder}/relu.onnx", threads=1)
        ...     run(torch.tensor([[-1.0, 0.5, 2.0]]))
        [tensor([[0.0000, 0.5000, 2.0000]])]
    """
    _, ort = _require_onnx()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"No ONNX file at {str(path)!r}.")
    verify_sidecar(path)
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ValueError(f"`threads` must be None or an integer >= 1, got {threads!r}.")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*tensors: Tensor) -> list[Tensor]:
        if len(tensors) != len(names):
            raise ValueError(f"The ONNX model takes {len(names)} inputs {names}, got {len(tensors)}.")
        feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(names, tensors)}
        return [torch.from_numpy(out) for out in session.run(None, feed)]

    return run


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | Path,
    *,
    masks: Any = None,
    compact: CompactMode = "auto",
    fold_bn: bool = True,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-5,
    opset_version: int | None = None,
    prepared: nn.Module | None = None,
) -> Path:
    """Write the compacted, BatchNorm-folded copy of ``model`` as an ONNX file and check it with ONNX Runtime.

    Exported with ``torch.onnx.export(dynamo=True)`` (PyTorch's ``torch.export``-based exporter, with its
    graph optimisations), the batch dimension dynamic unless ``dynamic_batch=False``; weights are stored in
    the file, or beside it (``<path>.data``) above ONNX's 2 GB protobuf limit. The file is validated with
    ``onnx.checker`` and run by ONNX Runtime (CPU) on the example inputs and on a batch of another size.

    Args:
        model: The pruned network (the reference of the check).
        example_inputs: One input batch (a tensor or a tuple of positional inputs).
        path: The ``.onnx`` file to write (its folder is created).
        masks: Checked to be applied first.
        compact: See :func:`~lightning_prune.deploy.export.inference_model`.
        fold_bn: See :func:`~lightning_prune.deploy.export.inference_model`.
        dynamic_batch: Export with a dynamic batch dimension.
        check: Run the file with ONNX Runtime and compare with ``model``; raise ``RuntimeError`` beyond ``rtol``.
        rtol: The check's tolerance (L2-relative, per output).
        opset_version: The ONNX opset (None: the exporter's default).
        prepared: The copy to export, if already built by :func:`~lightning_prune.deploy.export.inference_model`.

    Returns:
        ``path``.

    Raises:
        ImportError: ``onnx`` or ``onnxruntime`` is missing (``pip install "lightning-prune[export]"``).
        ExportError: The exporter fails; the message names the layer and why.
        ValueError: The masks were not applied, ``model`` does not run on ``example_inputs`` (wrong rank or
            dtype), or ``opset_version`` is below 18.
        ArtifactWriteError: ``path`` could not be written (an ``OSError`` naming it and the reason; the previous
            files are unchanged).
        RuntimeError: ONNX Runtime computes something else than ``model``.

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     written = export_onnx(net, torch.randn(2, 4), Path(folder) / "net.onnx")
        ...     [p.name for p in onnx_files(written)]
        ['net.onnx']
    """
    onnx, _ = _require_onnx()
    path = check_path(path)
    prepare_folder(path)  # a folder that cannot hold the file fails before the export, not after
    if opset_version is not None and not is_int(opset_version):
        raise TypeError(f"`opset_version` must be None or an integer, got {opset_version!r}.")
    if opset_version is not None and opset_version < MIN_ONNX_OPSET:
        raise ValueError(
            f"`opset_version` must be at least {MIN_ONNX_OPSET} (the lowest the exporter writes; it would silently "
            f"write opset {MIN_ONNX_OPSET} instead), got {opset_version}. Pass None for the exporter's default."
        )
    inputs, prepared, trace, shapes, rtol = _export_setup(
        model, example_inputs, masks, compact, fold_bn, dynamic_batch, check, rtol, prepared
    )

    def export(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None, dynamic: Any) -> Any:
        with warnings.catch_warnings():  # the exporter's notes on its own fallbacks are not the user's concern
            warnings.simplefilter("ignore", category=FutureWarning)
            return torch.onnx.export(
                module,
                args,
                kwargs=dict(kwargs) if kwargs else None,
                dynamo=True,
                dynamic_shapes=dynamic,
                verbose=False,
                opset_version=opset_version,
            )

    try:
        with eval_mode(prepared):
            program = export(prepared, trace, None, shapes)
    except Exception as err:
        raise _diagnose("torch.onnx.export", prepared, trace, lambda m, a, k: export(m, a, k, None), err) from err
    data = path.with_name(path.name + ".data")
    atomic_write_files(path, lambda staged: program.save(str(staged), external_data=None))
    if data.exists() and not _uses_external_data(onnx, path):
        data.unlink()  # a stale file beside a new model that keeps its weights inside would mislead
    write_sidecar(path, [data] if data.exists() else [])
    if check:
        onnx.checker.check_model(str(path))
        batches = [inputs, _other_batch(inputs)] if dynamic_batch else [inputs]
        _check_outputs("ONNX model (ONNX Runtime)", onnx_runner(path), model, batches, rtol, flat=True)
    return path


def _uses_external_data(onnx: Any, path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def onnx_files(path: str | Path) -> list[Path]:
    """The files an ONNX export wrote: ``path`` and its external-data file (``<path>.data``) if there is one.

    Example:
        >>> onnx_files("no/such/model.onnx")
        []
    """
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [p for p in (path, data) if p.exists()]
