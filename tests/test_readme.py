"""The defaults the README states are the ones the configs and signatures have."""

import inspect
import re

import yaml
from _checks import CONF, ROOT
from omegaconf import OmegaConf

from lightning_prune import export_model


def _paragraph(start: str) -> str:
    """The README's paragraph that starts with ``start``, on one line."""
    readme = (ROOT / "README.md").read_text()
    return " ".join(readme.split(start, 1)[1].split("\n\n", 1)[0].split())


def test_the_export_defaults_the_readme_states_are_the_configs_and_export_models():
    text = _paragraph("**From Hydra and the command line.**")
    stated_part = text.split("default to (`conf/export/all.yaml`, the same as `export_model`'s): ", 1)[1]
    stated_part = stated_part.split(". Override any of them", 1)[0]
    stated = {key: yaml.safe_load(value) for key, value in re.findall(r"`(\w+): ([^`]+)`", stated_part)}
    config = OmegaConf.to_container(OmegaConf.load(CONF / "export" / "all.yaml"))
    config.pop("defaults")
    assert stated == config
    signature = inspect.signature(export_model).parameters
    for key, value in stated.items():
        if key in signature:
            default = signature[key].default
            assert (list(default) if isinstance(default, tuple) else default) == value, key
    # The examples come after the defaults, as overrides.
    assert "for example `export.forms=[sparse,onnx] export.latency=false export.threads=2`" in text
