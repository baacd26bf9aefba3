"""What the block and N:M structures share: per-entry scores of a weight's 2-D view, and their checks."""

from __future__ import annotations

from torch import Tensor

from lightning_prune._helpers import is_number
from lightning_prune.criteria.base import Importance
from lightning_prune.masks.maskset import MaskSet
from lightning_prune.structures.base import Scope, Structure, Target
from lightning_prune.structures.unstructured import Unstructured


# ---------------------------------------------------------------------------------------------- shared
def layer_name(name: str) -> str:
    """The module name of a parameter name, as ``ignore`` takes it."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def check_entry_importance(structure: Structure, importance: Importance) -> None:
    if not isinstance(importance, Importance):
        raise TypeError(f"`importance` must be an Importance object, got {type(importance).__name__}.")
    if not getattr(importance, "scores_entries", True):
        raise ValueError(
            f"{structure!r} needs a score for every single weight (magnitude, l1, l2, taylor, fisher), but "
            f"{importance!r} scores whole channels only. Use structure='channel' for it."
        )
    try:
        Unstructured().check_importance(importance)
    except ValueError as err:
        raise ValueError(
            f"{structure!r} needs a score for every single weight (magnitude, l1, l2, taylor, fisher): {err} "
            "Criteria that score whole channels need structure='channel'."
        ) from err


def entry_scores(structure: Structure, importance: Importance, name: str, param: Tensor) -> Tensor:
    """``importance``'s score of every entry of ``param``, with a clear error when it cannot give them."""
    try:
        scores = importance(name, param)
    except (NotImplementedError, TypeError) as err:
        raise ValueError(
            f"{structure!r} needs a score for every weight of {name!r}, but {importance!r} cannot score single "
            f"entries ({type(err).__name__}: {err}). Use a per-entry criterion (magnitude, l1, l2, taylor, "
            "fisher), or structure='channel' for channel criteria."
        ) from err
    if not isinstance(scores, Tensor) or scores.shape != param.shape:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"{structure!r} needs a score for every weight of {name!r} (shape {tuple(param.shape)}), but "
            f"{importance!r} returned {shape}. Use a per-entry criterion (magnitude, l1, l2, taylor, fisher), or "
            "structure='channel' for channel criteria."
        )
    return scores


def check_matrix(structure: Structure, name: str, param: Tensor) -> None:
    if param.dim() < 2:
        raise ValueError(
            f"{structure!r} prunes weight matrices (Linear and Conv weights), but {name!r} has shape "
            f"{tuple(param.shape)}. Add {layer_name(name)!r} to `ignore`."
        )


def groups_of(masks: MaskSet, per_layer: list[float] | None, scope: Scope) -> list[list[int]]:
    """Indices of the tensors ranked together: all of them for one global target, else one by one."""
    indices = list(range(len(masks.params)))
    return [indices] if per_layer is None and scope == "global" else [[i] for i in indices]


def single_target(sparsity: Target) -> float:
    return float(sparsity) if is_number(sparsity) else 0.0
