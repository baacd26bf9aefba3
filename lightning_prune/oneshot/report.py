"""What a one-shot pruning run did: per-layer targets, sparsity, reconstruction error and time."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BlockProgress", "LayerReport", "OneShotReport"]


@dataclass(frozen=True)
class LayerReport:
    """One pruned layer.

    Attributes:
        name: the pruned parameter (``"model.layers.0.self_attn.q_proj.weight"``).
        block: the index of its block.
        shape: ``(out, in)``.
        target: the sparsity asked of it (after allocation).
        sparsity: the fraction of its weights pruned (read from its mask).
        error: ``||W X - W' X||_F / ||W X + b||_F`` over the calibration inputs that reached the layer in the pruned
            network (``W`` dense, ``W'`` pruned) on the first ``error_batches`` batches, or None when not measured
            (``error_batches=0``).
        seconds: time spent pruning it (selection and weight update, not the forward passes).
    """

    name: str
    block: int
    shape: tuple[int, int]
    target: float
    sparsity: float
    error: float | None
    seconds: float


@dataclass(frozen=True)
class BlockProgress:
    """Handed to ``progress`` after each block, and logged."""

    index: int
    total: int
    name: str
    layers: tuple[str, ...]
    sparsity: float
    seconds: float


@dataclass
class OneShotReport:
    """The summary :func:`~lightning_prune.oneshot.prune_one_shot` returns with the masks.

    Attributes:
        method, structure, allocation: what was run (their ``repr``).
        samples: calibration samples used, summed over processes.
        blocks: the number of blocks.
        layers: one :class:`LayerReport` per pruned layer, in model order.
        seconds: wall time of the whole call; ``capture_seconds`` of capturing block 0's inputs (every capture).
    """

    method: str
    structure: str
    allocation: str | None
    samples: int
    blocks: int
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    capture_seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """The fraction of pruned weights over all pruned layers."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(total, 1)

    def table(self) -> str:
        """A plain-text per-layer table.

        Example:
            >>> report = OneShotReport("Wanda()", "Unstructured()", None, 8, 1)
            >>> report.layers.append(LayerReport("b.0.fc.weight", 0, (4, 4), 0.5, 0.5, 0.1234, 0.001))
            >>> print(report.table())
            One-shot pruning: Wanda(), Unstructured(), 8 samples, 1 blocks, 0.0 s
            layer          shape  target  sparsity  rel. error
            --------------------------------------------------
            b.0.fc.weight    4x4  50.00%    50.00%      0.1234
            total                           50.00%
        """
        rows = [("layer", "shape", "target", "sparsity", "rel. error")]
        for r in self.layers:
            error = "" if r.error is None else f"{r.error:.4f}"
            rows.append((r.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.target:.2%}", f"{r.sparsity:.2%}", error))
        rows.append(("total", "", "", f"{self.sparsity:.2%}", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows
        ]
        lines.insert(1, "-" * max(len(line) for line in lines))
        allocation = f", {self.allocation}" if self.allocation else ""
        title = (
            f"One-shot pruning: {self.method}, {self.structure}{allocation}, {self.samples} samples, "
            f"{self.blocks} blocks, {self.seconds:.1f} s"
        )
        return title + "\n" + "\n".join(lines)
