"""How the other callbacks find the :class:`~lightning_prune.callbacks.PruningCallback` they work with among the
Trainer's callbacks."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_prune.callbacks.pruning import PruningCallback


def find_pruning_callback(
    trainer: pl.Trainer, pruning: PruningCallback | None, who: str, *, required: bool = True
) -> PruningCallback | None:
    """The pruning callback another callback works with: ``pruning`` when given (it must be one of the Trainer's
    callbacks), else the only :class:`PruningCallback` among them.

    Raises:
        MisconfigurationException: ``pruning`` is not among the Trainer's callbacks, or it is not given and the
            Trainer has none (when ``required``) or several.
    """
    callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
    if pruning is not None:
        if not any(c is pruning for c in callbacks):
            raise MisconfigurationException(
                f"{who}: its `pruning` callback is not among the Trainer's callbacks; add it to "
                "`Trainer(callbacks=[...])`."
            )
        return pruning
    found = [c for c in callbacks if isinstance(c, PruningCallback)]
    if len(found) == 1:
        return found[0]
    if not found and not required:
        return None
    raise MisconfigurationException(
        f"{who} needs one PruningCallback among the Trainer's callbacks, found {len(found)}"
        + (": pass the one to use as `pruning=`." if found else ".")
    )
