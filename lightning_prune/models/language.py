"""A LightningModule that trains any causal language model with next-token cross-entropy, and its perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune._helpers import check_int, is_int
from lightning_prune.models.optim import check_training_arguments
from lightning_prune.training.distillation import DistillationMixin
from lightning_prune.training.regularization import L1RegularizationMixin, RegularizationKind

__all__ = ["LanguageModel", "WarmupCosine", "evaluate_perplexity", "next_token_loss"]

OptimizerName = Literal["sgd", "adam", "adamw"]
LRSchedule = Literal["cosine", "constant"]
_SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def next_token_loss(logits: Tensor, targets: Tensor, reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """Cross-entropy of ``(..., V)`` logits against ``(...)`` integer targets, over every token, in float32.

    Example:
        >>> logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens
        >>> round(float(next_token_loss(logits, torch.zeros(2, 3, dtype=torch.long)).exp()), 4)
        4.0
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"The model's logits {tuple(logits.shape)} do not match the targets {tuple(targets.shape)}: a causal "
            "language model must map (batch, T) tokens to (batch, T, vocab_size) logits."
        )
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction=reduction)


def evaluate_perplexity(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Perplexity of ``model`` on ``loader``: ``exp`` of the mean next-token cross-entropy over all its tokens.

    The mean is over tokens, not batches (a short last batch weighs what its tokens weigh). Runs in eval mode
    under ``torch.inference_mode()`` and restores the model's training mode afterwards; no random state is
    consumed. Works with any module mapping ``(batch, T)`` token ids to ``(batch, T, V)`` logits, a
    :class:`LanguageModel` included.

    Args:
        model: The language model.
        loader: Yields ``(inputs, targets)`` batches of token ids.

    Returns:
        The perplexity (1 is perfect; the vocabulary size is a uniform guess).

    Raises:
        ValueError: ``loader`` yielded no tokens.

    Example:
        >>> class Uniform(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.dummy = nn.Parameter(torch.zeros(()))
        ...     def forward(self, x):
        ...         return torch.zeros(*x.shape, 8)
        >>> batch = (torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
        >>> round(evaluate_perplexity(Uniform(), [batch, batch]), 4)
        8.0
    """
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    total, count = 0.0, 0
    model.eval()
    try:
        with torch.inference_mode():
            for inputs, targets in loader:
                logits = model(inputs.to(device))
                total += float(next_token_loss(logits, targets.to(device), reduction="sum"))
                count += targets.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("`loader` yielded no tokens: give it at least one (inputs, targets) batch.")
    return math.exp(total / count)


@dataclass(frozen=True)
class WarmupCosine:
    """The learning-rate factor at an optimizer step: linear warm-up, then cosine decay (or constant), with drops.

    ``factor(step) = w(step) · d(step) · gamma ** (milestones passed)``, where ``w`` rises linearly from
    ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, and ``d`` falls from 1 at the end of the
    warm-up to ``min_ratio`` at ``decay_steps`` along half a cosine (Loshchilov & Hutter, 2017, "SGDR"; without
    restarts), then stays there; with ``cosine=False``, ``d`` is 1. ``milestone_steps`` are the steps at which
    the rate is multiplied by ``gamma``. A pure function of the step, for ``torch.optim.lr_scheduler.LambdaLR``.

    Example:
        >>> f = WarmupCosine(warmup_steps=2, decay_steps=6, min_ratio=0.0)
        >>> [round(f(s), 3) for s in range(8)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0, 0.0]
    """

    warmup_steps: int = 0
    decay_steps: int = 1
    min_ratio: float = 0.0
    cosine: bool = True
    milestone_steps: tuple[int, ...] = ()
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        factor = 1.0
        if step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        elif self.cosine:
            span = max(1, self.decay_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            factor = self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        drops = sum(step >= m for m in self.milestone_steps)
        return factor * self.gamma**drops


class LanguageModel(L1RegularizationMixin, DistillationMixin, L.LightningModule):
    """Next-token cross-entropy training of a causal language model, with validation and test perplexity.

    The wrapped network is ``self.model`` and holds every parameter, so ``state_dict()`` is the network's own
    (keys prefixed with ``model.``) and pruning callbacks see only its layers. It maps ``(batch, T)`` token ids
    to ``(batch, T, vocab_size)`` logits (e.g. :class:`~lightning_prune.models.GPT`); batches are
    ``(inputs, targets)`` of the same shape, ``targets`` the next tokens. Logs ``train/loss`` (epoch mean),
    ``val/loss`` and ``test/loss`` (means over every token of the split) and ``val/ppl`` and ``test/ppl``
    (``exp`` of those means: the perplexity of the whole split, not a mean of per-batch perplexities).

    The optimizer decays only weights of two or more dimensions (matrices and embeddings), not norms and biases.
    The learning rate follows :class:`WarmupCosine`, stepped every optimizer step: ``warmup_steps`` of linear
    warm-up, then a cosine from ``lr`` to ``lr * min_lr_ratio`` at ``decay_steps`` (by default the run's last
    step, ``trainer.estimated_stepping_batches``), or a constant rate with ``lr_schedule="constant"``; and, as
    in :class:`~lightning_prune.models.ImageClassifier`, multiplied by ``lr_gamma`` at each epoch in
    ``lr_milestones``. A pruning callback's ``finetune_lr_scale`` scales the whole schedule.

    It includes :class:`~lightning_prune.training.L1RegularizationMixin` (off until ``reg_lambda`` > 0) and
    :class:`~lightning_prune.training.DistillationMixin` (active while a
    :class:`~lightning_prune.callbacks.DistillationCallback` has set a teacher; the distillation term is the
    KL divergence per token, averaged over tokens). ``train/loss`` logs the cross-entropy alone.

    Args:
        model: The language model.
        lr: Peak learning rate.
        optimizer: ``"adamw"`` (the default), ``"adam"`` or ``"sgd"`` (with momentum).
        momentum: SGD momentum; ignored by Adam and AdamW.
        weight_decay: Weight decay of the matrices and embeddings (decoupled for AdamW, L2 otherwise).
        betas: Adam's and AdamW's ``(beta1, beta2)``.
        lr_schedule: ``"cosine"`` (decay after the warm-up) or ``"constant"``.
        warmup_steps: Optimizer steps of linear warm-up.
        min_lr_ratio: The cosine's final rate, as a fraction of ``lr``.
        decay_steps: The step at which the cosine reaches its end; ``None``: the run's last step.
        lr_milestones: Epochs at which the rate is multiplied by ``lr_gamma``.
        lr_gamma: Factor applied at each milestone.
        reg_kind: The penalty's kind (see :class:`~lightning_prune.training.regularization.L1RegularizationMixin`).
        reg_lambda: Its weight λ; 0 (the default) trains without a penalty.
        reg_ignore: Module-name patterns left unpenalised, e.g. ``["lm_head"]``.
        reg_warmup_epochs: Ramp λ linearly over this many epochs.
        reg_stop_epoch: The first epoch without the penalty (``None``: to the end).

    Example:
        >>> from lightning_prune.models import GPT, GPTConfig
        >>> net = GPT(GPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
        >>> module = LanguageModel(net, lr=3e-3, warmup_steps=10)
        >>> module(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 256])
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        optimizer: OptimizerName = "adamw",
        momentum: float = 0.9,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        lr_schedule: LRSchedule = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        decay_steps: int | None = None,
        lr_milestones: Sequence[int] = (),
        lr_gamma: float = 0.1,
        reg_kind: RegularizationKind | None = None,
        reg_lambda: float = 0.0,
        reg_ignore: Sequence[str] = (),
        reg_warmup_epochs: int = 0,
        reg_stop_epoch: int | None = None,
    ) -> None:
        super().__init__(
            reg_kind=reg_kind,
            reg_lambda=reg_lambda,
            reg_ignore=reg_ignore,
            reg_warmup_epochs=reg_warmup_epochs,
            reg_stop_epoch=reg_stop_epoch,
        )
        milestones = check_training_arguments(model, lr, optimizer, momentum, weight_decay, lr_milestones, lr_gamma)
        beta_pair = tuple(float(b) for b in betas)
        if len(beta_pair) != 2 or not all(0 <= b < 1 for b in beta_pair):
            raise ValueError(f"`betas` must be two numbers in [0, 1), e.g. (0.9, 0.95), got {betas!r}.")
        if lr_schedule not in _SCHEDULES:
            raise ValueError(f"`lr_schedule` must be one of {_SCHEDULES}, got {lr_schedule!r}.")
        check_int("warmup_steps", warmup_steps, 0)
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1] (a fraction of `lr`), got {min_lr_ratio!r}.")
        if decay_steps is not None and (not is_int(decay_steps) or decay_steps < 1):
            raise ValueError(
                f"`decay_steps` must be an integer >= 1 or None (the run's last step), got {decay_steps!r}."
            )
        # Plain lists in the hyperparameters (not e.g. Hydra's ListConfig), so checkpoints load with weights_only=True.
        betas, lr_milestones, reg_ignore = (
            list(beta_pair),
            milestones,
            [str(p) for p in reg_ignore],
        )
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        # Per evaluation split: the sum of the token losses and the token count, summed over ranks at epoch end.
        # Plain tensors, replaced rather than updated in place, so a validation under torch.inference_mode (e.g.
        # trainer.validate before trainer.fit) leaves nothing that training-time code cannot touch.
        self._sums: dict[str, tuple[Tensor, int]] = {}

    @override
    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return next_token_loss(self(inputs), targets)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        # Weighted by tokens, so the epoch mean is the token mean even with a short last batch.
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch[1].numel())
        return loss

    def _accumulate(self, stage: str, batch: tuple[Tensor, Tensor]) -> None:
        tokens = batch[1].numel()
        total = self._loss(batch).detach() * tokens
        previous = self._sums.get(stage)
        self._sums[stage] = (total, tokens) if previous is None else (previous[0] + total, previous[1] + tokens)

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._accumulate("val", batch)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._accumulate("test", batch)

    def _log_split(self, stage: str) -> None:
        sums = self._sums.pop(stage, None)
        if sums is None:  # e.g. a loop of zero batches
            return
        strategy = self.trainer.strategy
        total = strategy.reduce(sums[0].double(), reduce_op="sum")
        count = strategy.reduce(torch.tensor(float(sums[1]), dtype=torch.float64, device=sums[0].device), "sum")
        loss = (total / count).float()  # the mean over every token of the split, on every rank alike
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/ppl", loss.exp(), prog_bar=stage == "val")

    @override
    def on_validation_epoch_start(self) -> None:
        self._sums.pop("val", None)  # a validation loop cut short (sanity check) leaves nothing behind

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_split("val")

    @override
    def on_test_epoch_start(self) -> None:
        self._sums.pop("test", None)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def _parameter_groups(self) -> list[dict[str, Any]]:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        seen: set[int] = set()
        for parameter in self.model.parameters():  # tied weights appear once
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        groups = [
            {"params": decay, "weight_decay": self.hparams["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return [group for group in groups if group["params"]]

    def lr_factor(self) -> WarmupCosine:
        """The schedule of the run the module is attached to (needs ``self.trainer``)."""
        hp = self.hparams
        cosine = hp["lr_schedule"] == "cosine"
        total = self.trainer.estimated_stepping_batches
        decay_steps = hp["decay_steps"]
        if decay_steps is None and cosine:
            if not math.isfinite(total):
                raise ValueError(
                    "`decay_steps` is None (decay over the whole run), but the run's length is unknown: set "
                    "`decay_steps`, the Trainer's `max_steps` or `max_epochs`, or use `lr_schedule='constant'`."
                )
            decay_steps = int(total)
        milestone_steps: tuple[int, ...] = ()
        if hp["lr_milestones"]:
            batches = self.trainer.num_training_batches
            if not math.isfinite(batches):
                raise ValueError("`lr_milestones` are epochs, but the training loader has no length: leave them empty.")
            per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
            milestone_steps = tuple(m * per_epoch for m in hp["lr_milestones"])
        return WarmupCosine(
            warmup_steps=hp["warmup_steps"],
            decay_steps=max(1, decay_steps or 1),
            min_ratio=hp["min_lr_ratio"],
            cosine=cosine,
            milestone_steps=milestone_steps,
            gamma=hp["lr_gamma"],
        )

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self._parameter_groups()
        optimizer: torch.optim.Optimizer
        if hp["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"])
        elif hp["optimizer"] == "adam":
            optimizer = torch.optim.Adam(groups, lr=hp["lr"], betas=tuple(hp["betas"]))
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp["lr"], betas=tuple(hp["betas"]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
