"""Another project reuses the configs: the wheel ships conf/ and a Hydra plugin puts it on the search path."""

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _checks import ROOT
from hydra import compose, initialize_config_module
from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

import lightning_prune.app.train  # noqa: F401  (registers the schemas the configs extend)
from hydra_plugins.lightning_prune_searchpath import LightningPruneSearchPathPlugin, config_source

SOURCES = ("pyproject.toml", "README.md", "lightning_prune", "conf", "hydra_plugins")

APP = """
import json

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

import lightning_prune
from lightning_prune import PruningCallback


@hydra.main(config_path="conf", config_name="app", version_base="1.3")
def main(cfg):
    net = instantiate(cfg.net)
    callback = instantiate(cfg.pruning, _convert_="all")
    assert isinstance(callback, PruningCallback)
    sources = [(p.provider, p.path) for p in HydraConfig.get().runtime.config_sources]
    print(json.dumps({
        "package": lightning_prune.__file__,
        "schedule": type(callback.schedule).__name__,
        "sparsity": callback.sparsity,
        "end_epoch": callback.schedule.end_epoch,
        "net": type(net).__name__,
        "sources": sources,
        "choices": dict(HydraConfig.get().runtime.choices),
    }))


main()
"""

APP_CONFIG = """
defaults:
  - net: tiny        # the app's own group
  - pruning: magnitude  # from lightning-prune
  - schedule: cubic     # from lightning-prune
  - _self_

pruning:
  start_epoch: 0
  end_epoch: 4
"""


def _write_app(path: Path) -> Path:
    (path / "conf" / "net").mkdir(parents=True)
    (path / "conf" / "app.yaml").write_text(APP_CONFIG)
    (path / "conf" / "net" / "tiny.yaml").write_text("_target_: torch.nn.Linear\nin_features: 4\nout_features: 2\n")
    (path / "app.py").write_text(textwrap.dedent(APP))
    return path / "app.py"


def _run(app: Path, *overrides: str, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(app), *overrides, f"hydra.run.dir={app.parent / 'run'}"],
        cwd=app.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.slow
def test_wheel_ships_configs_and_plugin_for_other_projects(tmp_path):
    # Build from a copy, so stale build/ output in the checkout can never end up in the wheel.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)], check=True
    )
    [wheel] = (tmp_path / "dist").glob("lightning_prune-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    assert (site / "lightning_prune" / "conf" / "schedule" / "cubic.yaml").is_file()
    assert (site / "hydra_plugins" / "lightning_prune_searchpath" / "__init__.py").is_file()
    assert not (site / "conf").exists()

    app = _write_app(tmp_path / "app")
    done = _run(app, "pruning.sparsity=0.7", "schedule=linear", pythonpath=site)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).is_relative_to(site)  # the wheel, not the checkout
    assert (result["schedule"], result["sparsity"], result["end_epoch"]) == ("LinearSchedule", 0.7, 4)
    assert result["net"] == "Linear" and result["choices"]["net"] == "tiny"
    assert ["lightning_prune", "lightning_prune.conf"] in result["sources"]  # provider, pkg:// path

    # The schemas come along: a misspelt key fails while composing, naming it.
    bad = _run(app, "pruning.sparsityy=0.7", pythonpath=site)
    assert bad.returncode == 1 and "Key 'sparsityy' not in 'PruningConfig'" in bad.stderr


def test_editable_install_finds_the_configs():
    # `pip install -e .` maps lightning_prune.conf to the checkout's conf/ (no copy).
    assert config_source() == "pkg://lightning_prune.conf"
    assert (importlib.resources.files("lightning_prune.conf") / "config.yaml").is_file()
    with initialize_config_module(config_module="lightning_prune.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["schedule=exponential"])
    assert cfg.pruning.schedule == "exponential" and cfg.pruning._target_ == "lightning_prune.PruningCallback"


def test_plugin_appends_the_configs_after_the_apps_own():
    path = ConfigSearchPathImpl()
    path.append(provider="main", path="file:///some/app/conf")
    LightningPruneSearchPathPlugin().manipulate_search_path(path)
    providers = [(p.provider, p.path) for p in path.get_path()]
    assert providers.index(("main", "file:///some/app/conf")) < providers.index(("lightning_prune", config_source()))
