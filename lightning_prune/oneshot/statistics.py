"""Statistics of a layer's calibration inputs, accumulated batch by batch and summed over processes.

Both statistics are plain sums plus a token count, so that statistics gathered on different processes (each on
its own share of the calibration samples) add up to those of one process that saw all the samples:
:meth:`Statistic.reduce_` all-reduces them (a no-op outside a process group).

* :class:`ColumnSquares`: ``sum_t x_tj^2`` per input feature ``j``, held in float64 (Wanda's ``||X_j||_2^2``;
  partial sums of up to 1024 rows in float32).
* :class:`InputCovariance`: ``sum_t x_t x_t^T``, ``in x in`` (SparseGPT's Hessian ``H = 2 X X^T`` up to the
  factor, which the optimal-brain-surgeon update does not depend on), in float32 by default (as the reference
  implementation) or float64.

Example:
    >>> import torch
    >>> stat = ColumnSquares(3)
    >>> stat.add_(torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]]))
    >>> stat.squares.tolist(), stat.norms()[1].item(), int(stat.count)
    ([2.0, 4.0, 0.0], 2.0, 2)
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from lightning_prune.masks.distributed import all_reduce_sum_

__all__ = ["ColumnSquares", "InputCovariance", "Statistic"]

#: Input rows processed at once, so that casts of bf16 inputs to the statistic's dtype stay small.
_ROW_CHUNK = 4096
#: Input rows squared at once by :class:`ColumnSquares` (a float32 temporary of this many rows).
_SQUARE_ROWS = 1024


class Statistic(ABC):
    """A sum over the calibration inputs of one layer (or of several layers that share their input)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        #: Tokens (input rows) seen, as a float64 tensor so that it is all-reduced with the sums.
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @abstractmethod
    def _add_rows(self, rows: Tensor) -> None:
        """Accumulate ``(tokens, in)`` rows."""

    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """The sums (without :attr:`count`), in a fixed order: what :meth:`reduce_` all-reduces."""

    @torch.no_grad()
    def add_(self, rows: Tensor) -> None:
        """Accumulate the ``(tokens, in)`` input rows of one call of the layer."""
        if rows.dim() != 2 or rows.shape[1] != self.in_features:
            raise ValueError(
                f"expected inputs of shape (tokens, {self.in_features}), got {tuple(rows.shape)}"
            )  # an internal error: the adapter gives rows of the layer's input width
        for start in range(0, rows.shape[0], _ROW_CHUNK):
            self._add_rows(rows[start : start + _ROW_CHUNK])
        self.count += rows.shape[0]

    @torch.no_grad()
    def reduce_(self) -> None:
        """Sum the statistic over every process of the default process group, in place."""
        for tensor in [*self.tensors(), self.count]:
            all_reduce_sum_(tensor)


class ColumnSquares(Statistic):
    """``sum_t x_tj^2`` per input feature, held in float64 (partial sums over 1024 rows in float32): Wanda's
    squared input norms."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, device)
        self.squares = torch.zeros(in_features, dtype=torch.float64, device=device)

    def _add_rows(self, rows: Tensor) -> None:
        # Squares summed in float32 over at most _SQUARE_ROWS rows, then added in float64: about 10x faster than
        # a float64 reduction, with a relative error near 1e-7 (each partial sum of squares is of positive terms).
        for start in range(0, rows.shape[0], _SQUARE_ROWS):
            part = rows[start : start + _SQUARE_ROWS]
            part = part.square() if part.dtype == torch.float32 else part.float().square_()
            self.squares += part.sum(0)

    def tensors(self) -> list[Tensor]:
        return [self.squares]

    def norms(self) -> Tensor:
        """``||X_j||_2`` per input feature (float64)."""
        return self.squares.sqrt()


class InputCovariance(Statistic):
    """``sum_t x_t x_t^T`` (``in x in``): SparseGPT's Hessian, up to a constant factor.

    Args:
        in_features: the input width.
        device: where the sum lives (the layer's device).
        dtype: float32 (default, as the reference) or float64.
    """

    def __init__(
        self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(in_features, device)
        self.dtype = dtype
        self.sum: Tensor | None = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self._inverse: tuple[float, Tensor] | None = None

    def _add_rows(self, rows: Tensor) -> None:
        if self.sum is None:
            raise RuntimeError("InputCovariance.add_ after inverse_cholesky()")  # internal misuse
        rows = rows.to(self.dtype)
        self.sum.addmm_(rows.t(), rows)

    def tensors(self) -> list[Tensor]:
        return [] if self.sum is None else [self.sum]

    def squares(self) -> Tensor:
        """``sum_t x_tj^2`` per input feature: the diagonal (float64)."""
        if self.sum is None:
            raise RuntimeError("the covariance was consumed by inverse_cholesky()")
        return self.sum.diagonal().double()

    @torch.no_grad()
    def inverse_cholesky(self, damping: float, layer: str = "layer") -> Tensor:
        """The upper Cholesky factor ``U`` of ``(H + lambda I)^-1``, with ``lambda = damping * mean(diag H)``.

        Inputs that are zero on every calibration token (``H_jj = 0``) get ``H_jj = 1``, so that they do not
        make ``H`` singular; they do not affect the reconstruction error. Computed once and cached (layers that
        share their input share it), in place in the covariance's memory: one ``in x in`` matrix is held (and a
        temporary of up to about half of one while the inverse is taken).

        Raises:
            ValueError: ``H + lambda I`` is not positive definite (too few calibration tokens for the input
                width, or no damping); the message names ``layer`` and what to change.
        """
        if self._inverse is not None:
            if self._inverse[0] != damping:
                raise RuntimeError("inverse_cholesky called with two dampings")  # internal misuse
            return self._inverse[1]
        if self.sum is None:
            raise RuntimeError("the covariance was consumed")  # internal misuse
        h = self.sum
        self.sum = None
        diag = h.diagonal()
        dead = diag == 0
        diag[dead] = 1.0
        diag += damping * float(diag.mean())
        # LAPACK works in place on a column-major matrix: the transposed view of `h` is one. It holds H itself once
        # the lower triangle (the one the factorisation reads) is mirrored onto the upper one.
        _mirror_lower_(h)
        work = h.mT
        info = torch.empty((), dtype=torch.int32, device=h.device)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if int(info) != 0:
            raise ValueError(
                f"SparseGPT: the Hessian of {layer!r} is singular even after dampening "
                f"(damping={damping} of its mean diagonal; {int(self.count)} calibration tokens for "
                f"{self.in_features} inputs, Cholesky failed at row {int(info)}). Give more calibration samples "
                "(`num_samples`), a larger `damping` (e.g. 0.1), or dtype=torch.float64."
            )
        torch.cholesky_inverse(work, out=work)
        torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
        if int(info) != 0:
            raise ValueError(
                f"SparseGPT: the inverse Hessian of {layer!r} is not positive definite in {self.dtype} "
                f"(damping={damping}). Use dtype=torch.float64, a larger `damping`, or more calibration samples."
            )
        upper = work
        self._inverse = (damping, upper)
        return upper


#: Rows mirrored at once by :func:`_mirror_lower_`.
_MIRROR_ROWS = 256


def _mirror_lower_(h: Tensor) -> None:
    """Copy the lower triangle of the square matrix ``h`` onto its upper triangle, in place, a band of rows at a
    time (temporaries of at most one diagonal block)."""
    n = h.shape[0]
    for start in range(0, n, _MIRROR_ROWS):
        stop = min(start + _MIRROR_ROWS, n)
        square = h[start:stop, start:stop]
        square.copy_(square.tril() + square.tril(-1).mT)
        h[start:stop, stop:].copy_(h[stop:, start:stop].mT)
