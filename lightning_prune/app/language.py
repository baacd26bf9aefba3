"""What :func:`~lightning_prune.app.train.train` does differently for a language model (``module=language``).

A run of :class:`~lightning_prune.models.LanguageModel` reports perplexity where a classifier reports accuracy:
validation and test perplexity of the dense model (:class:`PerplexityAtEpochStart`, just before pruning starts),
the pruned one (masked, after fine-tuning) and the compact one. Head pruning (``pruning=heads``) is compacted here,
after training, with :func:`~lightning_prune.deploy.transformer.compact_heads` (the pruning callback compacts
channels only): :func:`compact_language_model` builds the smaller model, compares its parameters, MACs and CPU
latency with the masked model's (:func:`~lightning_prune.deploy.profile.compaction_report`: "unstable" when the
machine was busy), measures its perplexity and saves it.

Example:
    >>> perplexity_lines({"val": 4.0, "test": 4.2}, {"val": 4.4, "test": 4.5}, None, "before pruning")[0]
    '  perplexity       validation  test'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_prune._files import ArtifactWriteError
from lightning_prune.app.probe import EpochStartProbe
from lightning_prune.callbacks.pruning import PruningCallback
from lightning_prune.deploy.compact import save_compact
from lightning_prune.deploy.profile import compaction_report
from lightning_prune.deploy.transformer import compact_heads
from lightning_prune.models.language import evaluate_perplexity
from lightning_prune.structures.heads import HeadMaskSet

__all__ = [
    "PerplexityAtEpochStart",
    "compact_language_model",
    "evaluate_splits",
    "perplexity_lines",
    "token_example",
]

#: Side-by-side latency of the masked and compact models: a batch of 64 sequences takes a few hundred ms on two
#: cores, so fewer blocks and calls than the classification report's (5 x 10) keep it to seconds.
LATENCY_BLOCKS = 3
LATENCY_REPEATS = 5


def evaluate_splits(model: nn.Module, datamodule: Any) -> dict[str, float]:
    """Validation and test perplexity of ``model`` on ``datamodule``'s fixed windows: ``{"val": ..., "test": ...}``.

    Example:
        >>> from lightning_prune.models import GPT, GPTConfig
        >>> class Windows:
        ...     def val_dataloader(self):
        ...         return [(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))]
        ...     test_dataloader = val_dataloader
        >>> net = GPT(GPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
        >>> sorted(evaluate_splits(net, Windows()))
        ['test', 'val']
    """
    return {
        "val": evaluate_perplexity(model, datamodule.val_dataloader()),
        "test": evaluate_perplexity(model, datamodule.test_dataloader()),
    }


class PerplexityAtEpochStart(EpochStartProbe):
    """Measures validation and test perplexity at the start of training epoch ``epoch``, e.g. just before pruning.

    The language-model counterpart of :class:`~lightning_prune.app.train.AccuracyAtEpochStart`: the result is in
    :attr:`perplexity` (``{"val": ..., "test": ...}``) and logged as ``dense/val_ppl`` and ``dense/test_ppl``.

    Args:
        epoch: The epoch at whose start the model is evaluated.
        pruning: The :class:`~lightning_prune.callbacks.PruningCallback` to measure before.

    Example:
        >>> PerplexityAtEpochStart(epoch=5).perplexity is None
        True
    """

    def __init__(self, epoch: int, pruning: PruningCallback | None = None) -> None:
        super().__init__(epoch, pruning)
        self.perplexity: dict[str, float] | None = None

    @override
    def measure(self, pl_module: L.LightningModule, datamodule: Any) -> None:
        self.perplexity = evaluate_splits(pl_module, datamodule)
        for split, value in self.perplexity.items():
            pl_module.log(f"dense/{split}_ppl", value, on_step=False, on_epoch=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity}  # a run resumed after `epoch` still reports the dense perplexity

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.perplexity = state_dict.get("perplexity", self.perplexity)


def token_example(datamodule: Any) -> torch.Tensor:
    """One sequence of token ids from ``datamodule``'s test split, shaped ``(1, T)``: the input that MACs and latency
    are measured on.

    Example:
        >>> class Windows:
        ...     def test_dataloader(self):
        ...         return [(torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long))]
        >>> token_example(Windows()).shape
        torch.Size([1, 8])
    """
    inputs, _ = next(iter(datamodule.test_dataloader()))
    return inputs[:1]


def compact_language_model(
    net: nn.Module,
    pruning: PruningCallback,
    datamodule: Any,
    path: Path,
    *,
    latency: bool = True,
) -> tuple[dict[str, Any], str] | None:
    """Remove the heads and neurons ``pruning`` pruned from ``net``, measure the smaller model and save it.

    Args:
        net: The pruned network (masked, full width), e.g. ``LanguageModel.model``.
        pruning: The pruning callback that pruned it; only head pruning (``structure=heads``) is compacted.
        datamodule: Its validation and test windows give the compact model's perplexity.
        path: Where to save the compact model (:func:`~lightning_prune.deploy.compact.save_compact`; reload it with
            ``lightning_prune.load_compact(model, path)``).
        latency: Time the masked and compact models side by side at batch 1 and 64.

    Returns:
        None when ``pruning`` does not prune heads; otherwise the figures for ``metrics.json`` (as
        :func:`~lightning_prune.app.summary.compaction_metrics`: ``<figure>_before`` and ``<figure>_after`` for
        ``params``, ``macs`` and ``latency_b<batch>_ms``, ``latency_b<batch>_stable``, ``path``; plus ``val_ppl``,
        ``test_ppl``, ``widths`` (each layer's heads, key/value heads and MLP width), and ``save_error`` when the
        file could not be written) and the comparison table.
    """
    masks = pruning.masks
    if not isinstance(masks, HeadMaskSet):
        return None
    small = compact_heads(net, masks).eval()
    report, text = compaction_report(
        net, small, token_example(datamodule), latency=latency, blocks=LATENCY_BLOCKS, repeats=LATENCY_REPEATS
    )
    figures: dict[str, Any] = {key.removeprefix("compact/"): value for key, value in report.items()}
    figures.update({f"{split}_ppl": value for split, value in evaluate_splits(small, datamodule).items()})
    layer_widths = getattr(small, "layer_widths", None)
    figures["widths"] = layer_widths() if callable(layer_widths) else None
    figures["path"] = str(path)
    try:
        save_compact(small, path)
    except ArtifactWriteError as err:
        figures["save_error"] = str(err)
    return figures, text


def perplexity_lines(
    dense: dict[str, float] | None, pruned: dict[str, float], compact: dict[str, Any] | None, dense_when: str
) -> list[str]:
    """The summary's perplexity table: dense, pruned and compact rows of validation and test perplexity.

    Args:
        dense: :class:`PerplexityAtEpochStart`'s figures, or None without pruning (then no dense row).
        pruned: The final model's (:func:`evaluate_splits`).
        compact: :func:`compact_language_model`'s figures (``val_ppl``, ``test_ppl``), or None.
        dense_when: When the dense figures were taken, e.g. ``"start of epoch 5, before pruning"``.

    Example:
        >>> print("\\n".join(perplexity_lines(None, {"val": 4.0, "test": 4.25}, None, "")))
          perplexity       validation  test
            final          4.0000      4.2500
    """
    rows = [("dense", dense, f"  ({dense_when})")] if dense is not None else []
    rows.append(("pruned" if dense is not None else "final", pruned, ""))
    if compact is not None:
        rows.append(
            ("compact", {"val": compact["val_ppl"], "test": compact["test_ppl"]}, "  (the compact model's own)")
        )
    lines = [f"  {'perplexity':<16} validation  test"]
    lines += [f"    {name:<14} {ppl['val']:<11.4f} {ppl['test']:.4f}{note}" for name, ppl, note in rows]
    return lines
