"""Sparse layers for CPU inference: ``nn.Linear`` and 1x1 ``nn.Conv2d`` with their weight in CSR form.

The kernels (:data:`SPARSE_KERNELS`):

* ``"torch_csr"``: ``torch.addmm(bias, W_csr, x.T)`` with a ``torch.sparse_csr_tensor`` of int32 indices
  (MKL's sparse BLAS in PyTorch's x86 builds); differentiable in ``x``, so it also runs under autograd;
* ``"scipy_csr"``: ``scipy.sparse.csr_matrix @ x`` on NumPy views of the same arrays (single-threaded
  C++); used for tensors outside autograd (under ``torch.no_grad()`` / ``torch.inference_mode()``, or inputs
  that do not require gradients), with ``"torch_csr"``'s product taking over when autograd records.

Both hold the weight as three buffers (``crow_indices``, ``col_indices``, ``values``), so a converted layer
keeps only the nonzero weights and their indices; :meth:`SparseLinear.to_dense` gives the ``nn.Linear`` back.
:func:`lightning_prune.deploy.kernels.sparse_inference` measures which layers gain from them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> dense = nn.Linear(64, 8)
    >>> with torch.no_grad():
    ...     dense.weight[torch.rand(8, 64, generator=torch.Generator().manual_seed(0)) < 0.9] = 0
    >>> sparse = to_sparse_layer(dense)
    >>> x = torch.randn(4, 64)
    >>> torch.allclose(sparse(x), dense(x), atol=1e-6)
    True
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SparseKernel = Literal["torch_csr", "scipy_csr"]


#: The sparse kernels a layer can run with.
SPARSE_KERNELS: tuple[str, ...] = ("torch_csr", "scipy_csr")


#: What :func:`sparse_inference` chooses from: the dense layer itself and the sparse kernels.
KERNELS: tuple[str, ...] = ("dense", *SPARSE_KERNELS)


_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------- modules
def _csr_torch(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    # The indices come from to_sparse_csr and are buffers of this module: valid, so not checked on every call.
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _SparseMatmul(nn.Module):
    """``rows @ W.T + bias`` for a 2-D weight ``W`` held as CSR buffers, with a choice of kernel."""

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None, kernel: str) -> None:
        super().__init__()
        if kernel not in SPARSE_KERNELS:
            raise ValueError(f"`kernel` must be one of {list(SPARSE_KERNELS)}, got {kernel!r}.")
        if weight.dtype not in _DTYPES:
            raise ValueError(
                f"Sparse kernels multiply float32 or float64 weights, got {weight.dtype}: convert the model with "
                "`.float()` first, or leave this layer dense."
            )
        if weight.device.type != "cpu":
            raise ValueError(f"Sparse CPU kernels need the weight on the CPU, got {weight.device}: call `.cpu()`.")
        weight = weight.detach()
        with warnings.catch_warnings():  # PyTorch warns once that its CSR support is in beta: known, see above
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            csr = weight.to_sparse_csr()  # entries equal to 0 (either sign) are left out
        index = torch.int32 if weight.numel() < 2**31 else torch.int64
        self.register_buffer("crow_indices", csr.crow_indices().to(index))
        self.register_buffer("col_indices", csr.col_indices().to(index))
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_rows, self.in_cols = int(weight.shape[0]), int(weight.shape[1])
        self.kernel = kernel
        self._scipy_cache: tuple[tuple[int, ...], Any] | None = None

    @property
    def nnz(self) -> int:
        """Nonzero weights stored."""
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's entries that are zero."""
        return 1.0 - self.nnz / max(1, self.out_rows * self.in_cols)

    def dense_weight(self) -> Tensor:
        """The weight as a dense tensor of shape ``(out, in)``."""
        csr = _csr_torch(self.crow_indices, self.col_indices, self.values, (self.out_rows, self.in_cols))
        return csr.to_dense()

    def _scipy(self) -> Any:
        import scipy.sparse

        key = (self.values.data_ptr(), self.col_indices.data_ptr(), self.crow_indices.data_ptr(), self.nnz)
        if self._scipy_cache is None or self._scipy_cache[0] != key:
            matrix = scipy.sparse.csr_matrix(
                (self.values.numpy(), self.col_indices.numpy(), self.crow_indices.numpy()),
                shape=(self.out_rows, self.in_cols),
                copy=False,
            )
            self._scipy_cache = (key, matrix)
        return self._scipy_cache[1]

    def _rows(self, rows: Tensor) -> Tensor:
        """``rows @ W.T + bias`` for ``rows`` of shape ``(n, in)``: a contiguous ``(n, out)`` tensor."""
        if rows.dtype != self.values.dtype:
            raise TypeError(
                f"{type(self).__name__} holds {self.values.dtype} weights but got a {rows.dtype} input: convert "
                "the input (or the model) so that both have one dtype."
            )
        if rows.device != self.values.device:
            raise ValueError(f"{type(self).__name__} is on {self.values.device} but got an input on {rows.device}.")
        autograd = torch.is_grad_enabled() and rows.requires_grad
        if self.kernel == "scipy_csr" and not autograd and rows.device.type == "cpu":
            matrix = self._scipy()
            array = rows.detach().numpy()
            if rows.shape[0] == 1:
                product = torch.from_numpy(matrix @ array[0]).unsqueeze(0)
            else:
                product = torch.from_numpy(matrix @ array.T).T
            out = product if self.bias is None else product + self.bias
            return out.contiguous()
        weight = _csr_torch(self.crow_indices, self.col_indices, self.values, (self.out_rows, self.in_cols))
        rhs = rows.T
        product = torch.mm(weight, rhs) if self.bias is None else torch.addmm(self.bias.unsqueeze(1), weight, rhs)
        return product.T.contiguous()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scipy_cache"] = None  # views of this instance's buffers; rebuilt on first use
        return state


class SparseLinear(_SparseMatmul):
    """``nn.Linear`` with its weight in CSR form, for inference with a sparse kernel.

    Args:
        weight: The ``(out_features, in_features)`` weight; its zero entries are not stored.
        bias: The bias, or None.
        kernel: ``"torch_csr"`` or ``"scipy_csr"`` (see the module's description).

    Raises:
        ValueError: An unknown kernel, a weight that is not float32/float64 or not on the CPU.

    Example:
        >>> linear = nn.Linear(8, 4)
        >>> with torch.no_grad():
        ...     linear.weight[:, :6] = 0
        >>> sparse = SparseLinear.from_dense(linear, kernel="scipy_csr")
        >>> sparse
        SparseLinear(in_features=8, out_features=4, bias=True, kernel=scipy_csr, nnz=8, sparsity=0.75)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(sparse(x), linear(x), atol=1e-6)
        True
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, kernel: str = "torch_csr") -> None:
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"`weight` must be a 2-D tensor (out_features, in_features), got {shape}.")
        super().__init__(weight, bias, kernel)
        self.in_features, self.out_features = self.in_cols, self.out_rows

    @classmethod
    def from_dense(cls, linear: nn.Module, kernel: str = "torch_csr") -> SparseLinear:
        """The sparse version of an ``nn.Linear``.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense needs an nn.Linear, got {type(linear).__name__}.")
        return cls(linear.weight, linear.bias, kernel)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(dtype=self.values.dtype, device=self.values.device)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W.T + b`` over the last dimension of ``x``, like ``nn.Linear``."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"SparseLinear expects inputs whose last dimension is in_features={self.in_features}, got shape "
                f"{tuple(x.shape)}."
            )
        rows = x.reshape(-1, self.in_features)
        return self._rows(rows).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kernel={self.kernel}, nnz={self.nnz}, sparsity={self.sparsity:.4g}"
        )


class SparseConv2d(_SparseMatmul):
    """A 1x1 ``nn.Conv2d`` (``groups=1``, zero padding) with its weight in CSR form.

    A 1x1 convolution is a linear layer applied at every pixel: the input is laid out as one row per pixel
    (free for channels-last inputs), multiplied like :class:`SparseLinear`, and returned as ``(batch, out, H,
    W)`` in the input's memory format. Stride and zero padding are applied first.

    Example:
        >>> conv = nn.Conv2d(16, 8, kernel_size=1, stride=2)
        >>> with torch.no_grad():
        ...     conv.weight[:, :12] = 0
        >>> sparse = SparseConv2d.from_dense(conv)
        >>> x = torch.randn(2, 16, 9, 9)
        >>> torch.allclose(sparse(x), conv(x), atol=1e-6)
        True
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        kernel: str = "torch_csr",
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
    ) -> None:
        if not isinstance(weight, Tensor) or weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"`weight` must be a 1x1 convolution weight (out, in, 1, 1), got {shape}.")
        super().__init__(weight.reshape(weight.shape[0], weight.shape[1]), bias, kernel)
        self.in_channels, self.out_channels = self.in_cols, self.out_rows
        self.stride = (int(stride[0]), int(stride[1]))
        self.padding = (int(padding[0]), int(padding[1]))

    @classmethod
    def from_dense(cls, conv: nn.Module, kernel: str = "torch_csr") -> SparseConv2d:
        """The sparse version of a 1x1 ``nn.Conv2d``.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            ValueError: Its kernel is not 1x1, it is grouped, or pads other than with zeros.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense needs an nn.Conv2d, got {type(conv).__name__}.")
        reason = _conv_unsupported(conv)
        if reason:
            raise ValueError(f"SparseConv2d supports 1x1 convolutions only: this one {reason}.")
        padding = (0, 0) if isinstance(conv.padding, str) else conv.padding
        return cls(conv.weight, conv.bias, kernel, stride=conv.stride, padding=padding)  # type: ignore[arg-type]

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same weight, bias, stride and padding."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, 1, stride=self.stride, padding=self.padding, bias=self.bias is not None
        ).to(dtype=self.values.dtype, device=self.values.device)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight().reshape(self.out_channels, self.in_channels, 1, 1))
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: Tensor) -> Tensor:
        """The convolution of ``x`` of shape ``(batch, in_channels, H, W)``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SparseConv2d expects inputs of shape (batch, {self.in_channels}, H, W), got {tuple(x.shape)}."
            )
        # The output's memory format follows the input's, as nn.Conv2d's does.
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if any(self.padding):
            x = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        batch, _, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, self.in_channels)
        out = self._rows(rows).reshape(batch, height, width, self.out_channels).permute(0, 3, 1, 2)
        return out if channels_last else out.contiguous()  # the permuted rows are channels-last already

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, kernel={self.kernel}, nnz={self.nnz}, "
            f"sparsity={self.sparsity:.4g}"
        )


def _conv_unsupported(conv: nn.Conv2d) -> str:
    """Why a Conv2d has no sparse version ("" when it has one)."""
    if tuple(conv.kernel_size) != (1, 1):
        return f"has kernel_size {tuple(conv.kernel_size)}"
    if conv.groups != 1:
        return f"is grouped (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"pads with padding_mode={conv.padding_mode!r}"
    return ""


def unsupported_reason(module: nn.Module) -> str:
    """Why ``module`` cannot run with a sparse kernel, or "" when it can (a Linear or a 1x1 Conv2d).

    Example:
        >>> unsupported_reason(nn.Linear(2, 2)), unsupported_reason(nn.Conv2d(2, 2, 3))
        ('', 'Conv2d has kernel_size (3, 3)')
    """
    if isinstance(module, nn.Linear):
        reason = ""
    elif isinstance(module, nn.Conv2d):
        reason = _conv_unsupported(module)
        reason = f"Conv2d {reason}" if reason else ""
    else:
        reason = f"{type(module).__name__} is neither an nn.Linear nor a 1x1 nn.Conv2d"
    weight = getattr(module, "weight", None)
    if not reason and isinstance(weight, Tensor) and weight.dtype not in _DTYPES:
        reason = f"{type(module).__name__} has {weight.dtype} weights (sparse kernels take float32 or float64)"
    return reason


def to_sparse_layer(module: nn.Module, kernel: str = "torch_csr") -> SparseLinear | SparseConv2d:
    """The sparse version of one layer: :class:`SparseLinear` for an ``nn.Linear``, :class:`SparseConv2d` for
    a 1x1 ``nn.Conv2d``.

    Raises:
        ValueError: ``module`` is another kind of layer (the message says why), or ``kernel`` is unknown.

    Example:
        >>> to_sparse_layer(nn.Conv2d(4, 4, kernel_size=3))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: No sparse kernel for this layer: Conv2d has kernel_size (3, 3). Sparse inference supports ...
    """
    if kernel not in SPARSE_KERNELS:
        raise ValueError(f"`kernel` must be one of {list(SPARSE_KERNELS)}, got {kernel!r}.")
    reason = unsupported_reason(module)
    if reason:
        raise ValueError(
            f"No sparse kernel for this layer: {reason}. Sparse inference supports nn.Linear and 1x1 nn.Conv2d "
            "(groups=1, zero padding) with float32 or float64 weights."
        )
    if isinstance(module, nn.Linear):
        return SparseLinear.from_dense(module, kernel)
    return SparseConv2d.from_dense(module, kernel)
