"""Third-party noise the jobs filter out of their console and log file, for the duration of a job only.

Each run printed Lightning's tips about its cloud products (``💡 Tip: For seamless cloud logging ...``), the
FutureWarning that ``lightning/pytorch/utilities/_pytree.py`` triggers by constructing torch's deprecated
``LeafSpec``, and, with ``export=all``, the ONNX exporter's INFO lines (Hydra sets the root logger to INFO).
:func:`quiet_third_party` drops exactly these while a job runs and restores everything afterwards: nothing is
changed at import or for code outside the job, and every other warning and log record, the project's own
included, still shows.

Example:
    >>> import logging
    >>> with quiet_third_party():
    ...     len(logging.getLogger(LIGHTNING_LOGGER).filters)
    1
    >>> len(logging.getLogger(LIGHTNING_LOGGER).filters)
    0
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

#: The logger through which Lightning's ``rank_zero_info`` writes its tips.
LIGHTNING_LOGGER = "lightning.pytorch.utilities.rank_zero"
#: The start of every tip Lightning writes about its cloud products (litlogger, litmodels).
TIP_PREFIX = "💡 Tip: For seamless cloud"
#: The FutureWarning torch raises when Lightning constructs ``LeafSpec`` (regex for ``warnings.filterwarnings``).
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
#: Loggers whose INFO lines (the ONNX exporter's progress notes) are lifted to WARNING while a job runs.
ONNX_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


class _DropTips(logging.Filter):
    """Drops the records that start with :data:`TIP_PREFIX`; passes every other one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block (or the decorated function), drop the third-party noise listed in this module's docstring.

    The tips are dropped by a filter on :data:`LIGHTNING_LOGGER` (Lightning's other INFO lines still show), the
    ``LeafSpec`` FutureWarning by a ``warnings.catch_warnings`` block (every other warning keeps its filters), and
    the ONNX loggers' INFO lines by raising those loggers' level to WARNING, unless they are set higher already.
    Everything is restored on exit, also after an exception.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     with quiet_third_party():
        ...         warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        ...         warnings.warn("pruning.sparsity was reached late", UserWarning)
        >>> [str(w.message) for w in caught]
        ['pruning.sparsity was reached late']
    """
    tips = _DropTips()
    lightning = logging.getLogger(LIGHTNING_LOGGER)
    onnx = [logging.getLogger(name) for name in ONNX_LOGGERS]
    levels = [logger.level for logger in onnx]
    lightning.addFilter(tips)
    for logger in onnx:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
            yield
    finally:
        lightning.removeFilter(tips)
        for logger, level in zip(onnx, levels, strict=True):
            logger.setLevel(level)
