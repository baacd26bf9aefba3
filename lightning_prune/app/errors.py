"""How the command-line jobs report a mistake: one line naming the key, file or argument, not a traceback.

Hydra prints the whole traceback of an exception that leaves the task function. The scripts catch the errors
that mean "the input is wrong" (:data:`USER_ERRORS`: an invalid config, a misconfigured callback, a missing or
damaged file, a path that cannot be written, an out-of-range value) and print their message alone with exit
status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback instead, and sweeps (``-m``) let Hydra record the failure.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_prune.app.config import ConfigError

#: Exceptions whose message is the whole story: printed alone, without the traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, MisconfigurationException, OSError, ValueError)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` (or the exception it was raised from) is one of :data:`USER_ERRORS`.

    Example:
        >>> is_user_error(FileNotFoundError("ckpt_path='x.ckpt': no such checkpoint")), is_user_error(KeyError("a"))
        (True, False)
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, USER_ERRORS):
            return True
        seen = seen.__cause__
    return False


def exit_with_message(error: BaseException) -> None:
    """In a single run without ``HYDRA_FULL_ERROR=1``, print a user error's message and exit with status 1;
    otherwise return (the caller re-raises, so that Hydra shows the traceback or records the failed job)."""
    if not is_user_error(error) or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    if HydraConfig.initialized() and HydraConfig.get().mode != RunMode.RUN:
        return None
    text = str(error).strip() or type(error).__name__
    if not isinstance(error, (ConfigError, MisconfigurationException)):
        text = f"{type(error).__name__}: {text}"
    print(f"Error: {text}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
    sys.exit(1)
