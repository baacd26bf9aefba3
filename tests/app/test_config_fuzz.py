"""Config fuzzing: a generated set of malformed overrides, each of which must end in a clear, specific error before
training starts.

The cases are derived from the configs themselves: every key of every schema'd group (``pruning``, ``trainer``,
``logger``, ``optimizer``, ``regularization``, ``distillation``) gets a misspelt twin (``key`` -> ``keyy``, both as an
override and as a ``+`` addition), a value of the wrong type, and the out-of-range values of :data:`OUT_OF_RANGE`;
every group gets an option that does not exist; every numeric key of every ``data`` and ``model`` option gets a value
of the wrong type and an out-of-range one; and schedule bounds are combined into contradictions. A case passes
when ``train(cfg)`` raises one of :data:`CLEAR_ERRORS` before ``Trainer.fit`` is reached, and its own message (not
only a cause deep in its chain) names the key.
"""

import dataclasses
import typing
from pathlib import Path

import lightning.pytorch as pl
import pytest
from _checks import CONF
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from omegaconf import OmegaConf

import lightning_prune.app.train as train_module
from lightning_prune.app.config import (
    AllocationConfig,
    ConfigError,
    CSVLoggerConfig,
    DistillationConfig,
    OptimizerConfig,
    PruningConfig,
    RegularizationConfig,
    TrainerConfig,
)

#: The schema of each group, and the overrides that select an option using it.
SCHEMAS = {
    "pruning": (PruningConfig, []),
    "trainer": (TrainerConfig, []),
    "logger": (CSVLoggerConfig, []),
    "optimizer": (OptimizerConfig, []),
    "regularization": (RegularizationConfig, ["regularization=l1"]),
    "distillation": (DistillationConfig, ["distillation=kd"]),
    "allocation": (AllocationConfig, ["allocation=sensitivity"]),
}

#: Values outside what each key allows (the schemas give the types; these are the ranges).
OUT_OF_RANGE: dict[str, list[object]] = {
    "pruning.sparsity": [1.0, 1.5, -0.1],
    "pruning.start_epoch": [-1],
    "pruning.end_epoch": [-1],
    "pruning.every_n_epochs": [0, -2],
    "pruning.round_to": [0, -8],
    "pruning.max_layer_sparsity": [1.0, -0.5],
    "pruning.finetune_lr_scale": [0, -0.1],
    "pruning.schedule": ["quadratic"],
    "pruning.importance": ["random"],
    "pruning.structure": ["diagonal"],
    "pruning.scope": ["local"],
    "pruning.importance_batches": [0],
    "pruning.block_shape": ["[0,4]", "[4,4,4]"],
    "pruning.rewind_epoch": [-1, 11],
    "trainer.max_epochs": [0, -3],
    "trainer.min_epochs": [-1],
    "trainer.max_steps": [-2],
    "trainer.min_steps": [-1],
    "trainer.num_nodes": [0],
    "trainer.devices": [0, -2],
    "trainer.accumulate_grad_batches": [0],
    "trainer.check_val_every_n_epoch": [0],
    "trainer.num_sanity_val_steps": [-2],
    "trainer.log_every_n_steps": [-1],
    "trainer.gradient_clip_val": [-1.0],
    "trainer.gradient_clip_algorithm": ["l3"],
    "trainer.reload_dataloaders_every_n_epochs": [-1],
    "trainer.limit_train_batches": [-1, 1.5],
    "trainer.limit_val_batches": [-1, 2.5],
    "trainer.limit_test_batches": [-0.5],
    "trainer.val_check_interval": [0, -1],
    "trainer.overfit_batches": [-1],
    "trainer.precision": ["17"],
    "trainer.accelerator": ["abacus"],
    "trainer.profiler": ["stopwatch"],
    "trainer.fast_dev_run": [-1],
    "logger.flush_logs_every_n_steps": [0],
    "optimizer.optimizer": ["lbfgs"],
    "optimizer.lr": [0, -0.1],
    "optimizer.momentum": [1.0, -0.1],
    "optimizer.weight_decay": [-1e-4],
    "optimizer.lr_gamma": [0],
    "optimizer.lr_milestones": ["[-1]"],
    "regularization.kind": ["l2"],
    "regularization.strength": [-1e-4],
    "regularization.warmup_epochs": [-1],
    "regularization.stop_epoch": [-1],
    "distillation.alpha": [1.5, -0.5],
    "distillation.temperature": [0, -1],
    "distillation.start_epoch": [-1, 30],
    "allocation.target_sparsity": [1.5, -0.5],
    "allocation.macs_budget": [0, 1.5],
    "allocation.max_drop": [-0.1],
    "allocation.ratios": ["[1.5]", "[]"],
}


def _wrong_types(annotation: object) -> list[str]:
    """Values of another type than ``annotation`` allows (none for ``Any`` and ``str``, which take anything)."""
    args = set(typing.get_args(annotation)) - {type(None)}
    base = annotation if not args else (args.pop() if len(args) == 1 else None)
    if typing.get_origin(base) is list:
        return ["{a: 1}"]
    return {int: ["abc", "1.5"], float: ["abc"], bool: ["maybe"]}.get(base, [])  # type: ignore[call-overload]


def _schema_cases() -> list[tuple[list[str], str]]:
    cases: list[tuple[list[str], str]] = []
    for group, (schema, selection) in SCHEMAS.items():
        hints = typing.get_type_hints(schema)
        for field in dataclasses.fields(schema):
            if field.name == "_target_":
                continue
            key = f"{group}.{field.name}"
            typo = field.name + ("s" if not field.name.endswith("s") else "_")
            cases.append(([*selection, f"{group}.{typo}=1"], typo))
            cases.append(([*selection, f"+{group}.{typo}=1"], typo))
            cases += [([*selection, f"{key}={value}"], field.name) for value in _wrong_types(hints[field.name])]
            cases += [([*selection, f"{key}={value}"], field.name) for value in OUT_OF_RANGE.get(key, [])]
    return cases


def _group_cases() -> list[tuple[list[str], str]]:
    groups = sorted({p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if p.parent != CONF})
    groups = [g for g in groups if not g.startswith("hydra")]
    return [
        ([f"{g}=no_such_option"] if g not in ("experiment", "hparams_search") else [f"+{g}=no_such_option"], g)
        for g in groups
    ]


def _open_group_cases() -> list[tuple[list[str], str]]:
    """Every numeric key of every ``data`` and ``model`` option: a string, and a negative number."""
    cases: list[tuple[list[str], str]] = []
    for group in ("data", "model"):
        for path in sorted((CONF / group).glob("*.yaml")):
            node = OmegaConf.load(path)
            for key in node:
                if OmegaConf.is_interpolation(node, key) or key in ("_target_", "seed"):
                    continue
                value = node[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                for bad in ("abc", -1):
                    cases.append(([f"{group}={path.stem}", f"{group}.{key}={bad}"], str(key)))
    return cases


def _schedule_cases() -> list[tuple[list[str], str]]:
    cases: list[tuple[list[str], str]] = []
    for start in (5, 10, 15):
        for end in (start - 1, start - 5):
            cases.append(([f"pruning.start_epoch={start}", f"pruning.end_epoch={end}"], "end_epoch"))
        cases.append(([f"pruning.start_epoch={start}", "pruning.end_epoch=30"], "end_epoch"))
        cases.append(
            ([f"pruning.start_epoch={start}", f"pruning.end_epoch={start}", "trainer.max_epochs=3"], "end_epoch")
        )
        cases.append(
            (["schedule=one_shot", f"pruning.start_epoch={start}", f"pruning.end_epoch={start + 2}"], "end_epoch")
        )
    cases.append((["schedule=iterative", "pruning.end_epoch=null"], "end_epoch"))
    cases.append((["pruning.start_epoch=40", "pruning.end_epoch=null", "optimizer.lr_milestones=[5]"], "start_epoch"))
    cases.append((["distillation=kd", "distillation.start_epoch=35"], "start_epoch"))
    # Contradictions between keys of the pruning group.
    cases.append((["pruning.importance=apoz"], "importance"))  # channels only
    cases.append(
        (["pruning=taylor", "schedule=one_shot", "pruning.start_epoch=0", "pruning.end_epoch=0"], "start_epoch")
    )
    cases.append((["pruning=nm", "pruning.sparsity=0.9"], "sparsity"))  # 2:4 prunes at most half
    cases.append((["pruning.structure=5:4"], "structure"))
    cases.append((["pruning.structure=2:x"], "structure"))
    cases.append((["pruning.block_shape=[4,4]"], "block_shape"))  # structure=unstructured
    cases.append((["pruning.importance_batches=8"], "importance_batches"))  # magnitude collects nothing
    cases.append((["+pruning.sparsity.features.0=1.5", "pruning.scope=layer"], "sparsity"))
    cases.append((["allocation=sensitivity", "pruning=none"], "allocation"))
    cases.append(
        (["allocation=sensitivity", "allocation.target_sparsity=0.5", "allocation.macs_budget=0.5"], "macs_budget")
    )
    return cases


CASES = _schema_cases() + _group_cases() + _open_group_cases() + _schedule_cases()
#: Composing takes about 0.1 s a case: the default suite runs every third case, `-m slow` the others.
QUICK = [case for i, case in enumerate(CASES) if i % 3 == 0]
REST = [case for i, case in enumerate(CASES) if i % 3 != 0]


def test_the_generated_set_is_large_and_covers_every_group():
    assert len(CASES) >= 300
    touched = {o.lstrip("+").split(".")[0].split("=")[0] for overrides, _ in CASES for o in overrides}
    assert {"pruning", "trainer", "logger", "optimizer", "regularization", "distillation", "data", "model"} <= touched


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


#: The errors a user may see for a malformed override: the app's own, and Hydra's for composition and instantiation
#: (whose message carries the key and the cause). A raw ``TypeError`` or ``KeyError`` from deep inside is a failure.
CLEAR_ERRORS = (ConfigError, ConfigCompositionException, InstantiationException, MissingConfigException)


def check_fails_clearly_before_training(overrides: list[str], key: str, monkeypatch, tmp_path: Path) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(pl.Trainer, "fit", no_training)
    with pytest.raises(CLEAR_ERRORS) as info:  # a type a user can read; the message is checked below
        cfg = compose(config_name="config", overrides=[*overrides, f"output_dir={tmp_path}"])
        train_module.train(cfg)
    error = info.value
    assert key in str(error), f"{overrides}: the message does not name {key!r}: {type(error).__name__}: {error}"


@pytest.mark.parametrize(("overrides", "key"), QUICK, ids=[" ".join(o) for o, _ in QUICK])
def test_a_malformed_override_fails_clearly_before_training(hydra_conf, overrides, key, monkeypatch, tmp_path):
    check_fails_clearly_before_training(overrides, key, monkeypatch, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "key"), REST, ids=[" ".join(o) for o, _ in REST])
def test_every_other_malformed_override_fails_clearly_before_training(
    hydra_conf, overrides, key, monkeypatch, tmp_path
):
    check_fails_clearly_before_training(overrides, key, monkeypatch, tmp_path)
