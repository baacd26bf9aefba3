"""The package's layers: imports run one way down, no module imports itself in a circle, and the plain-PyTorch core
imports neither Lightning nor Hydra."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_prune"

#: The layers, bottom first: a module may import from its own layer and the layers below it, never above. Within a
#: layer, the import graph between modules must still be free of cycles.
LAYERS: list[set[str]] = [
    {"_helpers", "_files", "_attention", "schedules"},
    {"masks"},
    {"criteria"},
    {"structures"},
    {"rewinding", "pruner", "oneshot", "sensitivity", "deploy"},
    {"training"},
    {"callbacks"},
    {"data", "models"},
    {"app"},
]
#: Importable without Lightning or Hydra: the plain-PyTorch core.
CORE = [
    "lightning_prune",
    "lightning_prune.schedules",
    "lightning_prune.pruner",
    "lightning_prune.masks",
    "lightning_prune.criteria",
    "lightning_prune.structures",
    "lightning_prune.rewinding",
    "lightning_prune.oneshot",
    "lightning_prune.sensitivity",
    "lightning_prune.deploy",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str) -> Iterator[str]:
    """The ``lightning_prune`` modules ``path`` imports, at module level or inside functions, leaving out imports
    only type checkers see (``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("lightning_prune"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("lightning_prune"):
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


MODULES = modules()


def graph() -> dict[str, set[str]]:
    return {
        name: {target for target in imported(path, name) if target in MODULES and target != name}
        for name, path in MODULES.items()
    }


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:  # the top-level facade resolves its names lazily: it belongs to no layer
        return None
    return next(i for i, layer in enumerate(LAYERS) if parts[1] in layer)


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in MODULES if m != "lightning_prune" and not any(m.split(".")[1] in layer for layer in LAYERS)]
    assert unplaced == [], f"place these in LAYERS: {unplaced}"


def test_imports_run_one_way_down():
    upward = [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in graph().items()
        for target in sorted(targets)
        if layer_of(source) is not None and (layer_of(target) is None or layer_of(target) > layer_of(source))  # type: ignore[operator]
    ]
    assert upward == []


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of ``edges`` closes, each as the path from its first node back to it."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def test_the_import_graph_has_no_cycle():
    cycles = find_cycles(graph())
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_nested_imports_and_finds_cycles(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lightning_prune.app import train\n"
        "def f():\n    from lightning_prune.masks import maskset\n"
    )
    assert list(imported(source, "lightning_prune.probe")) == ["lightning_prune.masks.maskset"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_core_imports_neither_lightning_nor_hydra():
    script = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in CORE)
        + "from lightning_prune import MaskSet, Pruner, prune_lowest_, build_schedule, Unstructured, compact\n"
        + "heavy = {'lightning', 'lightning_fabric', 'pytorch_lightning', 'hydra', 'omegaconf'}\n"
        + "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_lightning_names_still_resolve_from_the_top_level():
    script = (
        "import sys, lightning_prune\n"
        "assert 'lightning' not in sys.modules\n"
        "from lightning_prune import PruningCallback, DistillationCallback, MaskInvariantChecker, SensitivityCallback\n"
        "print(PruningCallback.__module__, 'lightning' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.split() == ["lightning_prune.callbacks.pruning", "True"]


def test_unknown_top_level_names_fail_like_any_module_attribute():
    import lightning_prune

    with pytest.raises(AttributeError, match="module 'lightning_prune' has no attribute 'PruningCalback'"):
        lightning_prune.PruningCalback  # noqa: B018
    assert set(lightning_prune.__all__) <= set(dir(lightning_prune))


def test_the_wheel_lists_every_subpackage():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    subpackages = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert subpackages - listed == set()
