"""Sparsity-inducing penalties: L1, group lasso over output channels, L1 on BatchNorm scales; and a mixin.

Pruning removes what training has already made small. Training with a penalty pushes unimportant weights
towards zero beforehand, so that less accuracy is lost at the moment of pruning:

* **L1** (``"l1"``): ``Σ|w|`` over the prunable weights (those of
  :func:`~lightning_prune.masks.params.prunable_parameters`), the partner of unstructured magnitude pruning
  (Han et al., 2015, "Learning both Weights and Connections for Efficient Neural Networks", compare L1 and L2
  regularisation before pruning).
* **Group lasso** (``"group_lasso"``): ``Σ_c ‖w_c‖₂`` over the output channels of every prunable weight (its rows
  along dim 0: a convolution's filters, a linear layer's output features), which drives whole channels to zero,
  the partner of channel pruning (Yuan & Lin, 2006; Wen et al., 2016, "Learning Structured Sparsity in Deep
  Neural Networks").
* **BN slimming** (``"bn_slimming"``): ``Σ|gamma|`` over the scales of the BatchNorm layers (Liu et al., 2017,
  "Learning Efficient Convolutional Networks through Network Slimming"); a channel whose gamma is small contributes
  little, and channel pruning's L1 importance counts gamma with the filter it scales.

The penalties are pure functions of tensors and work in any PyTorch loop::

    loss = criterion(model(x), y) + 1e-4 * l1_penalty(prunable_parameters(model).values())

:class:`L1RegularizationMixin` adds ``λ · penalty`` to the loss a LightningModule's ``training_step`` returns
(see :mod:`lightning_prune.training.loss` for when and how), logs its mean over each epoch as ``reg/<kind>``
and needs no change to the step itself; :class:`GroupLassoMixin` and :class:`BNSlimmingMixin` are the same
with another default kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lightning_prune._helpers import is_int, is_number
from lightning_prune.masks.params import PRUNABLE_TYPES, check_patterns, name_matches, pattern_list, prunable_parameters
from lightning_prune.training.loss import TrainingLossMixin

RegularizationKind = Literal["l1", "group_lasso", "bn_slimming"]


#: BatchNorm layers whose ``weight`` (gamma) BN slimming penalises: BatchNorm1d/2d/3d, SyncBatchNorm and lazy ones.
BN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


def _tensors(params: Iterable[Tensor], what: str) -> list[Tensor]:
    tensors = list(params)
    if not tensors:
        raise ValueError(f"{what} needs at least one tensor, got none.")
    if not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(f"{what} takes tensors, got {[type(t).__name__ for t in tensors]}.")
    return tensors


class _L1Norm(torch.autograd.Function):
    """``Σ|w|`` over several tensors as one autograd node: the gradient is ``sign(w)`` without the per-tensor
    abs/sum nodes of plain autograd (about a third cheaper on the digits models)."""

    @staticmethod
    def forward(ctx: Any, *params: Tensor) -> Tensor:
        ctx.save_for_backward(*params)
        total = params[0].detach().abs().sum()
        for p in params[1:]:
            total = total + p.detach().abs().sum()
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        signs = torch._foreach_sign(ctx.saved_tensors)
        torch._foreach_mul_(signs, grad)
        return tuple(signs)


class _GroupNorms(torch.autograd.Function):
    """``Σ_c ‖w_c‖₂`` over the rows of several tensors as one autograd node (gradient ``w_c / ‖w_c‖₂``, 0 for a
    zero row)."""

    @staticmethod
    def forward(ctx: Any, *params: Tensor) -> Tensor:
        norms = [torch.linalg.vector_norm(p.detach().reshape(p.shape[0], -1), 2, dim=1) for p in params]
        ctx.save_for_backward(*params, *norms)
        total = norms[0].sum()
        for n in norms[1:]:
            total = total + n.sum()
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        saved = ctx.saved_tensors
        params, norms = saved[: len(saved) // 2], saved[len(saved) // 2 :]
        grads = []
        for p, n in zip(params, norms):
            scale = torch.where(n > 0, grad / n, torch.zeros_like(n))
            grads.append(p * scale.reshape(-1, *([1] * (p.dim() - 1))))
        return tuple(grads)


def l1_penalty(params: Iterable[Tensor]) -> Tensor:
    """``Σ|w|`` over every entry of ``params``, a differentiable scalar (gradient ``sign(w)``, 0 at 0).

    Example:
        >>> l1_penalty([torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])])
        tensor(3.5000)
    """
    return _L1Norm.apply(*_tensors(params, "l1_penalty"))


def group_lasso_penalty(params: Iterable[Tensor]) -> Tensor:
    """``Σ_c ‖w_c‖₂`` over the output channels ``w_c = w[c]`` (dim 0) of every tensor in ``params``.

    The gradient of a channel is ``w_c / ‖w_c‖₂``, and 0 for a channel that is all zeros (pruned). A 1-D
    tensor has one-entry channels: its penalty is its L1 norm.

    Example:
        >>> group_lasso_penalty([torch.tensor([[3.0, 4.0], [0.0, 1.0]])])  # ‖(3, 4)‖ + ‖(0, 1)‖
        tensor(6.)
    """
    return _GroupNorms.apply(*_tensors(params, "group_lasso_penalty"))


def bn_slimming_penalty(params: Iterable[Tensor]) -> Tensor:
    """``Σ|gamma|`` over BatchNorm scales (Network Slimming): :func:`l1_penalty` of the gamma tensors, e.g.
    ``bn_parameters(model).values()``.

    Example:
        >>> bn = nn.BatchNorm2d(3)
        >>> _ = nn.init.constant_(bn.weight, -0.5)
        >>> bn_slimming_penalty(bn_parameters(nn.Sequential(bn)).values())
        tensor(1.5000, grad_fn=<_L1NormBackward>)
    """
    return l1_penalty(_tensors(params, "bn_slimming_penalty"))


#: The penalty of each kind, a function of the selected tensors.
PENALTIES: dict[str, Callable[[Iterable[Tensor]], Tensor]] = {
    "l1": l1_penalty,
    "group_lasso": group_lasso_penalty,
    "bn_slimming": bn_slimming_penalty,
}


def bn_parameters(module: nn.Module, ignore: Sequence[str] = ()) -> dict[str, nn.Parameter]:
    """The scales (``weight``, gamma) of ``module``'s BatchNorm layers by qualified name, minus those under ``ignore``.

    Raises:
        ValueError: an ``ignore`` pattern matches no module, or no BatchNorm layer with a learnable scale is
            left.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> list(bn_parameters(net))
        ['1.weight']
    """
    if isinstance(ignore, str):
        ignore = [ignore]
    check_patterns(module, ignore, BN_TYPES)
    params: dict[str, nn.Parameter] = {}
    for name, m in module.named_modules():
        weight = getattr(m, "weight", None)
        if not name or not isinstance(m, BN_TYPES) or not isinstance(weight, nn.Parameter):
            continue
        if any(name_matches(name, pattern) for pattern in ignore):
            continue
        params[f"{name}.weight"] = weight
    if not params:
        raise ValueError(
            f"{type(module).__name__} has no BatchNorm layer with a learnable scale (affine=True)"
            f"{' outside `ignore`=' + repr(list(ignore)) if ignore else ''}: BN slimming has nothing to penalise."
        )
    return params


def regularized_parameters(
    module: nn.Module, kind: RegularizationKind = "l1", ignore: Sequence[str] = ()
) -> dict[str, nn.Parameter]:
    """The tensors the penalty ``kind`` acts on, by qualified name: the prunable weights (Linear and Conv, as
    :func:`~lightning_prune.masks.params.prunable_parameters` selects them) for ``"l1"`` and ``"group_lasso"``,
    the BatchNorm scales for ``"bn_slimming"``; in both cases minus the modules ``ignore`` matches.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
        >>> list(regularized_parameters(net, "group_lasso", ignore=["3"]))
        ['0.weight']
        >>> list(regularized_parameters(net, "bn_slimming"))
        ['1.weight']
    """
    _check_kind("kind", kind)
    if kind == "bn_slimming":
        return bn_parameters(module, ignore)
    return prunable_parameters(module, ignore, PRUNABLE_TYPES)


def _check_kind(name: str, kind: object) -> None:
    if kind not in PENALTIES:
        raise ValueError(f"`{name}` must be one of {sorted(PENALTIES)}, got {kind!r}.")


class L1RegularizationMixin(TrainingLossMixin):
    """Adds ``λ · penalty`` to the loss of a LightningModule's ``training_step``; logs the term's epoch mean as
    ``reg/<kind>``.

    Place it before ``LightningModule`` in the bases and pass its arguments through ``super().__init__``; the
    module's own ``training_step`` stays as it is. The penalty is added to the step's tensor (or its dict's
    ``"loss"``) only on the outermost call while the Trainer trains, never in validation, testing or a
    ``validation_step`` that reuses ``training_step``; being part of that loss, it is divided by
    ``accumulate_grad_batches`` like the task loss (so one optimizer step gets the gradient of ``λ · penalty``
    once) and averaged like it under DDP (identical on every rank). With manual optimisation nothing is added:
    add :meth:`regularization_penalty` to the loss yourself.

    Args:
        reg_lambda: λ, the penalty's weight (>= 0; 0 turns it off at no cost). Its scale follows the number of
            penalised entries: ``Σ|w|`` over LeNet-300-100's 266k weights is in the thousands.
        reg_kind: ``"l1"`` (``Σ|w|``, the default), ``"group_lasso"`` (``Σ_c ‖w_c‖₂`` over output channels) or
            ``"bn_slimming"`` (``Σ|gamma|`` over BatchNorm scales). :class:`GroupLassoMixin` and
            :class:`BNSlimmingMixin` change the default.
        reg_ignore: module-name patterns (``fnmatch``, as ``PruningCallback``'s ``ignore``) left unpenalised.
        reg_warmup_epochs: ramp λ linearly over the first epochs: ``λ · min(1, epoch / reg_warmup_epochs)``,
            i.e. nothing in epoch 0 and the full λ from epoch ``reg_warmup_epochs`` on (0: no warm-up).
        reg_stop_epoch: the first epoch without the penalty, e.g. the epoch pruning starts, so that fine-tuning
            runs without it; ``None`` keeps it to the end.
        reg_params: a function of the module returning the tensors to penalise by name, instead of the selection
            of ``reg_kind`` and ``reg_ignore``.

    Raises:
        ValueError: a λ below 0, an unknown kind, a negative epoch.
        TypeError: the mixin after ``LightningModule`` in the bases (at class creation), two mixins with
            different kinds, or a module that is not a LightningModule.

    Example:
        >>> import torch.nn.functional as F
        >>> class Net(L1RegularizationMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__(reg_lambda=1e-3, reg_ignore=["head"])
        ...         self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
        ...
        ...     def forward(self, x):
        ...         return self.head(self.body(x).relu())
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return F.cross_entropy(self(x), y)  # + 1e-3 * Σ|body.weight| is added in training
        >>> net = Net()
        >>> list(net.regularized_parameters())
        ['body.weight']
        >>> torch.isclose(net.regularization_penalty(), 1e-3 * net.body.weight.abs().sum()).item()
        True
    """

    _default_reg_kind: ClassVar[str] = "l1"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kinds = {
            c.__dict__["_default_reg_kind"]
            for c in cls.__mro__
            if issubclass(c, L1RegularizationMixin)
            and c is not L1RegularizationMixin
            and "_default_reg_kind" in c.__dict__
        }
        if len(kinds) > 1:
            raise TypeError(
                f"{cls.__name__} combines regularization mixins of different kinds {sorted(kinds)}: a module has one "
                "penalty. Keep one mixin, or choose with `reg_kind`."
            )

    def __init__(
        self,
        *args: Any,
        reg_lambda: float = 1e-4,
        reg_kind: RegularizationKind | None = None,
        reg_ignore: Sequence[str] = (),
        reg_warmup_epochs: int = 0,
        reg_stop_epoch: int | None = None,
        reg_params: Callable[[nn.Module], Mapping[str, Tensor]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self, pl.LightningModule):
            raise TypeError(
                f"{type(self).__name__}: {L1RegularizationMixin.__name__} is for LightningModules "
                "(`class Net(L1RegularizationMixin, LightningModule)`); in a plain loop add `l1_penalty(...)` to the "
                "loss."
            )
        kind = self._default_reg_kind if reg_kind is None else reg_kind
        _check_kind("reg_kind", kind)
        if not is_number(reg_lambda) or not reg_lambda >= 0:
            raise ValueError(f"`reg_lambda` (λ) must be a number >= 0, got {reg_lambda!r}.")
        reg_ignore = pattern_list(reg_ignore, "reg_ignore")
        if not is_int(reg_warmup_epochs) or reg_warmup_epochs < 0:
            raise ValueError(f"`reg_warmup_epochs` must be an integer >= 0, got {reg_warmup_epochs!r}.")
        if reg_stop_epoch is not None and (not is_int(reg_stop_epoch) or reg_stop_epoch < 0):
            raise ValueError(f"`reg_stop_epoch` must be an integer >= 0 or None, got {reg_stop_epoch!r}.")
        if reg_params is not None and not callable(reg_params):
            raise TypeError(f"`reg_params` must be a function of the module or None, got {reg_params!r}.")
        self.reg_lambda = float(reg_lambda)
        self.reg_kind: str = kind
        self.reg_ignore: tuple[str, ...] = tuple(reg_ignore)
        self.reg_warmup_epochs = reg_warmup_epochs
        self.reg_stop_epoch = reg_stop_epoch
        self.reg_params = reg_params
        self._reg_selection: tuple[Any, list[Tensor]] | None = None

    def regularization_strength(self, epoch: int | None = None) -> float:
        """λ in force at ``epoch`` (the current epoch by default), after warm-up and stop.

        Example:
            >>> class Net(L1RegularizationMixin, pl.LightningModule):
            ...     def __init__(self):
            ...         super().__init__(reg_lambda=0.1, reg_warmup_epochs=4, reg_stop_epoch=6)
            >>> [round(Net().regularization_strength(e), 6) for e in range(7)]
            [0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.0]
        """
        module: Any = self
        if epoch is None:
            epoch = int(module.current_epoch)
        if self.reg_stop_epoch is not None and epoch >= self.reg_stop_epoch:
            return 0.0
        if self.reg_warmup_epochs > 0 and epoch < self.reg_warmup_epochs:
            return self.reg_lambda * epoch / self.reg_warmup_epochs
        return self.reg_lambda

    def regularized_parameters(self) -> dict[str, Tensor]:
        """The tensors the penalty acts on, by name (``reg_params``, else :func:`regularized_parameters`)."""
        module: Any = self
        if self.reg_params is not None:
            params = dict(self.reg_params(module))
            if not params or not all(isinstance(p, Tensor) for p in params.values()):
                raise ValueError(f"`reg_params` must return a non-empty mapping of names to tensors, got {params!r}.")
            return params
        return dict(regularized_parameters(module, self.reg_kind, self.reg_ignore))  # type: ignore[arg-type]

    def regularization_penalty(self, epoch: int | None = None) -> Tensor:
        """``λ · penalty`` at ``epoch`` (the current one by default): what training adds to the loss.

        The selected tensors are looked up once per epoch and Trainer, then reused.
        """
        return self.regularization_strength(epoch) * PENALTIES[self.reg_kind](self._selected(epoch))

    def _selected(self, epoch: int | None = None) -> list[Tensor]:
        module: Any = self
        key = (id(module._trainer), module.current_epoch if epoch is None else epoch)
        if self._reg_selection is None or self._reg_selection[0] != key:
            self._reg_selection = (key, list(self.regularized_parameters().values()))
        return self._reg_selection[1]

    def _add_loss_terms(self, loss: Tensor) -> Tensor:
        loss = super()._add_loss_terms(loss)
        if self.reg_lambda == 0.0:
            return loss
        params = self._selected()  # also in warm-up's first epoch: bad `reg_ignore` patterns fail on step one
        strength = self.regularization_strength()
        if strength == 0.0:
            return loss
        term = strength * PENALTIES[self.reg_kind](params)
        self._log_epoch_mean(f"reg/{self.reg_kind}", term)
        return loss + term


class GroupLassoMixin(L1RegularizationMixin):
    """:class:`L1RegularizationMixin` with ``reg_kind="group_lasso"``: ``λ · Σ_c ‖w_c‖₂`` over output channels.

    Example:
        >>> class Net(GroupLassoMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__(reg_lambda=1e-3)
        ...         self.conv = nn.Conv2d(1, 4, 3)
        >>> Net().reg_kind
        'group_lasso'
    """

    _default_reg_kind: ClassVar[str] = "group_lasso"


class BNSlimmingMixin(L1RegularizationMixin):
    """:class:`L1RegularizationMixin` with ``reg_kind="bn_slimming"``: ``λ · Σ|gamma|`` over BatchNorm scales
    (Liu et al., 2017, who used λ = 1e-4 or 1e-5 on CIFAR).

    Example:
        >>> class Net(BNSlimmingMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__(reg_lambda=1e-4)
        ...         self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> list(Net().regularized_parameters())
        ['features.1.weight']
    """

    _default_reg_kind: ClassVar[str] = "bn_slimming"
