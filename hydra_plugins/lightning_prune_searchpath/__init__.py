"""Hydra search-path plugin: any Hydra app with lightning-prune installed can compose its config groups.

Hydra imports every module under the ``hydra_plugins`` namespace package when it starts. This one appends
lightning-prune's configs to the config search path (after the app's own, so the app's files win) and
registers the schemas they extend, so an app's ``defaults`` can say ``pruning: magnitude`` and
``schedule: cubic`` next to its own model and data, or its command line ``pruning=magnitude``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from lightning_prune.app.config import register_configs

PROVIDER = "lightning_prune"


def config_source() -> str:
    """Where lightning-prune's configs are.

    ``pkg://lightning_prune.conf`` when the package is installed (from a wheel or in editable mode); the
    checkout's ``conf/`` when ``lightning_prune`` is imported straight from a source tree.

    Example:
        >>> config_source()
        'pkg://lightning_prune.conf'
    """
    if importlib.util.find_spec("lightning_prune.conf") is not None:
        return "pkg://lightning_prune.conf"
    spec = importlib.util.find_spec("lightning_prune")
    origin = spec.origin if spec is not None else None
    if origin is not None:
        checkout_conf = Path(origin).resolve().parents[1] / "conf"
        if (checkout_conf / "config.yaml").is_file():
            return checkout_conf.as_uri()
    return "pkg://lightning_prune.conf"


class LightningPruneSearchPathPlugin(SearchPathPlugin):
    """Appends lightning-prune's ``conf/`` to every Hydra app's search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        register_configs()
        search_path.append(provider=PROVIDER, path=config_source())
