"""Every option of every config group composes and instantiates; every malformed override fails early and clearly."""

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from _checks import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch import nn

import lightning_prune.app.train as train_module
from lightning_prune import DistillationCallback, PruningCallback
from lightning_prune.app.config import ConfigError, TrainerConfig
from lightning_prune.app.train import (
    instantiate_distillation,
    instantiate_logger,
    instantiate_module,
    instantiate_pruning,
    train,
)
from lightning_prune.app.validation import ROOT_KEYS, channel_importances, validate
from lightning_prune.criteria import IMPORTANCES
from lightning_prune.criteria.base import Importance
from lightning_prune.criteria.magnitude import LpNormImportance
from lightning_prune.schedules import SCHEDULES, IterativeSchedule, build_schedule
from lightning_prune.structures.channel import ChannelStructure


def _compose(overrides: list[str], *, hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


def _groups() -> dict[str, list[str]]:
    """Every config group under conf/ (nested ones as ``hydra/launcher``) and its options, found on disk."""
    groups: dict[str, list[str]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        if path.parent != CONF:
            groups.setdefault(path.parent.relative_to(CONF).as_posix(), []).append(path.stem)
    return groups


GROUPS = _groups()
IN_DEFAULTS = set(_compose([], hydra=True).hydra.runtime.choices)
OPTIONS = [(group, option) for group, options in GROUPS.items() for option in options]
#: Language-model options go together (an image model cannot read bytes, a GPT cannot read images).
LANGUAGE_OPTIONS = {("data", "pysource"), ("model", "gpt_tiny"), ("module", "language"), ("experiment", "pysource_gpt")}
LANGUAGE = ["data=pysource", "model=gpt_tiny", "module=language"]


def _override(group: str, option: str) -> str:
    """``group=option`` for a group in the defaults list, ``+group=option`` for an optional one (experiment)."""
    return f"{group}={option}" if group in IN_DEFAULTS else f"+{group}={option}"


def test_groups_are_discovered():
    assert {"data", "model", "pruning", "schedule", "trainer", "logger", "optimizer"} <= set(GROUPS)
    assert set(GROUPS["schedule"]) == set(SCHEDULES)
    assert {"cpu", "gpu", "ddp"} <= set(GROUPS["trainer"])
    assert {"csv", "tensorboard"} <= set(GROUPS["logger"])
    assert {"sgd", "adam", "adamw"} <= set(GROUPS["optimizer"])
    assert {"none", "magnitude", "magnitude_layerwise", "channel"} <= set(GROUPS["pruning"])
    assert "digits_resnet20_channel" in GROUPS["experiment"]
    assert set(GROUPS["regularization"]) == {"none", "l1", "group_lasso", "bn_slimming"}
    assert set(GROUPS["distillation"]) == {"none", "kd"}
    assert set(GROUPS["module"]) == {"classifier", "language"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_validates_and_instantiates(group, option, tmp_path):
    language = (group, option) in LANGUAGE_OPTIONS
    extra = ["pruning=wanda"] if (group, option) == ("allocation", "owl") else []  # OWL allocates one-shot pruning
    overrides = [_override(group, option), *(LANGUAGE if language else []), *extra]
    cfg = _compose(overrides, hydra=group.startswith("hydra/"))
    validate(cfg)
    # Building objects: cheap ones always; datamodules only constructed (no files read before setup()).
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, L.LightningDataModule)
    net = instantiate(cfg.model, _convert_="all")
    assert isinstance(net, nn.Module)
    if language:
        tokens = torch.zeros(2, cfg.data.seq_len, dtype=torch.long)
        assert net.eval()(tokens).shape == (2, cfg.data.seq_len, cfg.data.vocab_size)
    elif group in ("data", "model", "experiment") and sum(p.numel() for p in net.parameters()) < 2_000_000:
        shape = tuple(cfg.data.get("input_shape") or datamodule.input_shape)
        assert net.eval()(torch.zeros(2, *shape)).shape == (2, cfg.model.num_classes)
    module = instantiate_module(cfg)
    assert module.hparams.optimizer == cfg.optimizer.optimizer
    assert module.reg_lambda == (cfg.regularization.strength if "kind" in cfg.regularization else 0.0)
    distillation = instantiate_distillation(cfg)
    assert isinstance(distillation, DistillationCallback) == bool(cfg.distillation.get("_target_"))
    pruning = instantiate_pruning(cfg)
    if cfg.pruning.get("_target_"):
        assert isinstance(pruning, PruningCallback)
        assert pruning.sparsity == cfg.pruning.sparsity and pruning.scope == cfg.pruning.scope
    else:
        assert pruning is None
    logger = instantiate_logger(cfg, tmp_path)
    assert isinstance(logger, Logger)
    overrides = {"accelerator": "cpu"} if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available() else {}
    trainer = instantiate(cfg.trainer, logger=False, default_root_dir=tmp_path, **overrides)
    assert isinstance(trainer, L.Trainer)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_schedule_group_sets_the_shape_and_pruning_the_targets(schedule):
    cfg = _compose([f"schedule={schedule}", "pruning.sparsity=0.8", "pruning.start_epoch=2"])
    validate(cfg)
    callback = instantiate_pruning(cfg)
    assert isinstance(callback, PruningCallback)
    assert isinstance(callback.schedule, SCHEDULES[schedule])
    # One-shot pruning ends where it starts, and the learning-rate drop follows.
    end = 2 if schedule == "one_shot" else 20
    assert callback.schedule.end_epoch == end == cfg.optimizer.lr_milestones[0]
    # The composed schedule is the one the schedule's own constructor builds from these bounds, epoch by epoch
    # (not only the echoed overrides): the group's shape, steps and final target all reach the callback.
    direct = build_schedule(schedule, sparsity=0.8, start_epoch=2, end_epoch=end, every_n_epochs=1)
    epochs = range(cfg.trainer.max_epochs)
    assert [callback.schedule.sparsity_at(e) for e in epochs] == [direct.sparsity_at(e) for e in epochs]
    assert callback.schedule.sparsity_at(1) == 0.0 and callback.schedule.sparsity_at(end) == pytest.approx(0.8)
    if schedule == "iterative":
        assert isinstance(callback.schedule, IterativeSchedule) and len(callback.schedule.sparsities) == 19


def test_default_schedule_is_the_main_job_and_pruning_none_ignores_it():
    cfg = _compose([])
    assert cfg.pruning.schedule == "cubic" and cfg.trainer.accelerator == "cpu"
    assert cfg.logger._target_.endswith("CSVLogger") and cfg.optimizer.optimizer == "sgd"
    none = _compose(["pruning=none", "schedule=one_shot"])
    validate(none)
    assert instantiate_pruning(none) is None
    assert list(none.optimizer.lr_milestones) == [none.trainer.max_epochs]  # no learning-rate drop


def test_ddp_trainer_documents_multi_gpu_and_multi_node():
    cfg = _compose(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", 4, 2)
    text = (CONF / "trainer" / "ddp.yaml").read_text()
    assert "num_nodes" in text and "MASTER_ADDR" in text


def test_trainer_schema_defaults_are_the_trainers():
    signature = inspect.signature(L.Trainer.__init__).parameters
    for field in dataclasses.fields(TrainerConfig):
        if field.name != "_target_":
            assert field.name in signature, field.name
            assert field.default == signature[field.name].default, field.name


# (overrides, exception, message). Compose-time errors come from the schemas and Hydra; ConfigError from
# validate(), which train() calls before building anything.
MALFORMED = [
    # unknown group options
    (["model=resnet99"], HydraException, r"Could not find 'model/resnet99'"),
    (["pruning=structured"], HydraException, r"Could not find 'pruning/structured'"),
    (["schedule=quadratic"], HydraException, r"Could not find 'schedule/quadratic'"),
    (["trainer=tpu"], HydraException, r"Could not find 'trainer/tpu'"),
    # misspelt keys
    (["pruning.sparsityy=0.5"], HydraException, r"Key 'sparsityy' not in 'PruningConfig'"),
    (["trainer.max_epoch=3"], HydraException, r"Key 'max_epoch' not in 'TrainerConfig'"),
    (["optimizer.learning_rate=0.1"], HydraException, r"Key 'learning_rate' not in 'OptimizerConfig'"),
    (["logger.save_directory=x"], HydraException, r"Key 'save_directory' not in 'CSVLoggerConfig'"),
    (
        ["+pruning.sparsityy=0.5"],
        ConfigError,
        r"pruning\.sparsityy=0\.5: unknown key; did you mean pruning\.sparsity\?",
    ),
    (["+foo=bar"], ConfigError, r"foo='bar': unknown top-level key; remove the override \(`\+` adds a key nothing"),
    (["++sed=1"], ConfigError, r"sed=1: unknown top-level key; did you mean seed\?"),
    (["+trainer.max_epoch=3"], ConfigError, r"trainer\.max_epoch=3: unknown key; did you mean trainer\.max_epochs\?"),
    # wrong types
    (["pruning.sparsity=abc"], ConfigError, r"pruning\.sparsity='abc': must be in \[0, 1\)"),
    (["trainer.max_epochs=1.5"], HydraException, r"Value '1\.5' of type 'float' could not be converted to Integer"),
    (["pruning.start_epoch=ten"], HydraException, r"Value 'ten' of type 'str' could not be converted to Integer"),
    (["trainer.enable_checkpointing=maybe"], HydraException, r"Value 'maybe' is not a valid bool"),
    (["seed=abc"], ConfigError, r"seed='abc': must be an integer >= 0"),
    # out of range
    (["pruning.sparsity=1.5"], ConfigError, r"pruning\.sparsity=1\.5: must be in \[0, 1\)"),
    (["pruning.sparsity=-0.1"], ConfigError, r"pruning\.sparsity=-0\.1: must be in \[0, 1\)"),
    (["seed=-1"], ConfigError, r"seed=-1: must be an integer >= 0"),
    (["pruning.every_n_epochs=0"], ConfigError, r"pruning\.every_n_epochs=0: must be an integer >= 1"),
    (["data.batch_size=0"], ConfigError, r"data\.batch_size=0: must be an integer >= 1"),
    (["trainer.max_epochs=0"], ConfigError, r"trainer\.max_epochs=0: must be an integer >= 1"),
    (["trainer.devices=0"], ConfigError, r"trainer\.devices=0: must be 'auto', an integer >= 1"),
    (["optimizer.lr=0"], ConfigError, r"optimizer\.lr=0\.0: must be a number > 0"),
    (["optimizer.momentum=1.0"], ConfigError, r"optimizer\.momentum=1\.0: must be in \[0, 1\)"),
    (["pruning.scope=local"], ConfigError, r"pruning\.scope='local': must be one of \['global', 'layer'\]"),
    (["pruning.schedule=quadratic"], ConfigError, r"pruning\.schedule='quadratic': must be one of \['cubic'"),
    # contradictory schedule bounds
    (
        ["pruning.start_epoch=12", "pruning.end_epoch=11"],
        ConfigError,
        r"end_epoch=11: must be >= pruning\.start_epoch=12",
    ),
    (["pruning.end_epoch=30"], ConfigError, r"end_epoch=30: must be < trainer\.max_epochs=30"),
    (
        ["pruning.start_epoch=40", "pruning.end_epoch=null", "optimizer.lr_milestones=[25]"],
        ConfigError,
        r"start_epoch=40: must be < trainer\.max_epochs=30",
    ),
    (
        ["schedule=one_shot", "pruning.end_epoch=12"],
        ConfigError,
        r"one_shot schedule prunes once, at pruning\.start_epoch=10",
    ),
    (["schedule=iterative", "pruning.end_epoch=null"], ConfigError, r"iterative schedule needs an end epoch"),
    (["pruning.end_epoch=null"], ConfigError, r"optimizer\.lr_milestones=\[None\]: .*set it explicitly"),
    (
        ["trainer=ddp", "trainer.strategy=fsdp"],
        ConfigError,
        r"trainer\.strategy='fsdp': pruning needs whole parameters",
    ),
    # channel pruning
    (["pruning=channel", "pruning.round_too=8"], HydraException, r"Key 'round_too' not in 'PruningConfig'"),
    (
        ["pruning=channel", "pruning.round_to=eight"],
        HydraException,
        r"Value 'eight' of type 'str' could not be converted to Integer",
    ),
    (["pruning=channel", "pruning.compact=maybe"], HydraException, r"Value 'maybe' is not a valid bool"),
    (["pruning=channel", "pruning.round_to=0"], ConfigError, r"pruning\.round_to=0: must be an integer >= 1"),
    (
        ["pruning=channel", "pruning.max_layer_sparsity=1.0"],
        ConfigError,
        r"pruning\.max_layer_sparsity=1\.0: must be in \[0, 1\) \(the largest fraction of one layer's channels",
    ),
    (
        ["pruning=channel", "pruning.max_layer_sparsity=-0.5"],
        ConfigError,
        r"pruning\.max_layer_sparsity=-0\.5: must be in \[0, 1\)",
    ),
    (
        ["pruning=channel", "pruning.sparsity=1.0"],
        ConfigError,
        r"pruning\.sparsity=1\.0: must be in \[0, 1\) \(the final fraction of channels pruned\)",
    ),
    (
        ["pruning=channel", "pruning.structure=blocks"],
        ConfigError,
        r"pruning\.structure='blocks': must be one of \['2:4', 'block', 'channel', 'experts', 'heads', "
        r"'unstructured', \"an N:M pattern",
    ),
    (
        ["pruning.round_to=8"],
        ConfigError,
        r"pruning\.round_to=8: applies to pruning\.structure=channel only \(got structure='unstructured'\)",
    ),
    (
        ["pruning.max_layer_sparsity=0.5"],
        ConfigError,
        r"pruning\.max_layer_sparsity=0\.5: applies to pruning\.structure=channel only",
    ),
    (
        ["pruning.compact=true"],
        ConfigError,
        r"pruning\.compact=True: removes pruned channels and needs pruning\.structure=channel",
    ),
    (
        ["pruning=channel", "pruning.structure=unstructured"],
        ConfigError,
        r"round_to=1: applies to .*\n.*max_layer_sparsity=0\.9: applies to .*\n.*compact=True: removes pruned",
    ),
    (["pruning.finetune_lr_scale=0"], ConfigError, r"pruning\.finetune_lr_scale=0\.0: must be a number > 0"),
    # regularization and distillation
    (["regularization=l2"], HydraException, r"Could not find 'regularization/l2'"),
    (
        ["regularization=l1", "regularization.strenght=1"],
        HydraException,
        r"Key 'strenght' not in 'RegularizationConfig'",
    ),
    (
        ["regularization=l1", "regularization.strength=-1e-4"],
        ConfigError,
        r"regularization\.strength=-0\.0001: must be a number >= 0",
    ),
    (
        ["regularization=group_lasso", "regularization.kind=l2"],
        ConfigError,
        r"regularization\.kind='l2': must be one of \['bn_slimming', 'group_lasso', 'l1'\]",
    ),
    (
        ["regularization=l1", "regularization.warmup_epochs=-1"],
        ConfigError,
        r"regularization\.warmup_epochs=-1: must be an integer >= 0",
    ),
    (["distillation=kd", "distillation.alpha=1.5"], ConfigError, r"distillation\.alpha=1\.5: must be in \[0, 1\]"),
    (
        ["distillation=kd", "distillation.temperature=0"],
        ConfigError,
        r"distillation\.temperature=0\.0: must be a number > 0",
    ),
    (
        ["distillation=kd", "distillation.start_epoch=30"],
        ConfigError,
        r"distillation\.start_epoch=30: must be < trainer\.max_epochs=30",
    ),
    (
        ["distillation=kd", "pruning=none"],
        ConfigError,
        r"distillation\.start_epoch=None: null means when pruning starts, but there is no pruning callback",
    ),
]


def test_malformed_overrides_are_distinct_and_cover_every_group():
    ids = [" ".join(overrides) for overrides, _, _ in MALFORMED]
    assert len(set(ids)) == len(ids), "a case is listed twice"
    groups = {o.lstrip("+").split(".")[0].split("=")[0] for overrides, _, _ in MALFORMED for o in overrides}
    expected = {"data", "distillation", "logger", "model", "optimizer", "pruning", "regularization", "trainer", "seed"}
    assert expected <= groups, f"no malformed case for {sorted(expected - groups)}"


@pytest.mark.parametrize(("overrides", "error", "match"), MALFORMED, ids=[" ".join(o) for o, _, _ in MALFORMED])
def test_malformed_override_fails_before_training(overrides, error, match, monkeypatch):
    def no_instantiation(*args, **kwargs):
        raise AssertionError("train() instantiated something before validating the config")

    monkeypatch.setattr(train_module, "instantiate", no_instantiation)
    with pytest.raises(error) as info:
        train(_compose(overrides))
    # Hydra puts the detail (key, value, type) in the chained cause; the CLI prints both.
    message = str(info.value) + "\n" + str(info.value.__cause__ or "")
    assert re.search(match, message), message


def test_root_keys_name_every_config_group_and_root_key():
    """A group added to conf/ (or a key to config.yaml) without a ROOT_KEYS entry would be refused as unknown."""
    assert {group.split("/")[0] for group in GROUPS} - {"hydra"} <= set(ROOT_KEYS)
    assert set(_compose([])) <= set(ROOT_KEYS)
    validate(_compose(["+sensitivity=default", "hparams_search=optuna", "experiment=digits_lottery"]))


def test_script_refuses_an_unknown_top_level_key_in_one_line(tmp_path):
    done = _script("+pruning_sparsity=0.5", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
    assert done.returncode == 1
    assert "pruning_sparsity=0.5: unknown top-level key; did you mean pruning?" in done.stderr
    assert "Traceback" not in done.stderr


def test_validate_lists_every_problem_at_once():
    cfg = _compose(["pruning.sparsity=1.5", "seed=-1", "optimizer.lr=-1"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).count("\n") == 3  # a header and one line per problem
    assert isinstance(info.value, ValueError)


def test_validate_accepts_a_bare_config():
    validate(OmegaConf.create({}))
    validate(OmegaConf.create({"pruning": {"schedule": "cubic"}, "data": {"_target_": "x"}}))


def _script(*overrides: str, env: dict[str, str] | None = None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides, f"hydra.run.dir={cwd}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_script_prints_config_errors_cleanly_and_records_the_failure(tmp_path):
    done = _script("pruning.sparsity=1.5", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
    assert done.returncode == 1
    assert "pruning.sparsity=1.5: must be in [0, 1)" in done.stderr
    assert "Traceback" not in done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "pruning.sparsity=1.5" in metrics["error"]
    assert metrics["overrides"] == ["pruning.sparsity=1.5"]


@pytest.mark.slow
def test_script_shows_the_traceback_with_hydra_full_error(tmp_path):
    full = _script("pruning.sparsity=1.5", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "ConfigError" in full.stderr


def test_script_reports_compose_errors_with_key_and_value(tmp_path):
    done = _script("trainer.max_epochs=1.5", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
    assert done.returncode == 1
    assert "trainer.max_epochs" in done.stderr and "'1.5'" in done.stderr and "Integer" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "metrics.json").exists()  # nothing ran


def test_channel_pruning_config_builds_a_compacting_channel_callback():
    cfg = _compose(["pruning=channel", "pruning.sparsity=0.3", "pruning.round_to=4"])
    validate(cfg)
    callback = instantiate_pruning(cfg)
    assert isinstance(callback, PruningCallback)
    assert isinstance(callback.structure, ChannelStructure)
    assert (callback.structure.round_to, callback.structure.max_layer_sparsity) == (4, 0.9)
    assert callback.sparsity == pytest.approx(0.3) and callback.scope == "global"
    assert repr(callback.importance) == repr(LpNormImportance(p=1))
    assert callback.compact and callback.compact_path is None and callback.report_latency
    assert callback.ignore == ()  # the head's outputs are the logits, which channel pruning always keeps


def test_channel_pruning_needs_an_importance_that_scores_channels(monkeypatch):
    class Random(Importance):
        def __call__(self, name, param):
            return torch.rand_like(param)

    monkeypatch.setitem(IMPORTANCES, "random", Random)
    assert "random" not in channel_importances()
    validate(_compose(["pruning.importance=random"]))  # any importance scores single weights
    with pytest.raises(
        ConfigError, match=r"pruning\.importance='random': not with pruning\.structure='channel': .* by a norm"
    ):
        validate(_compose(["pruning=channel", "pruning.importance=random"]))
    for importance in ("l1", "l2", "magnitude", "taylor", "fisher"):
        validate(_compose(["pruning=channel", f"pruning.importance={importance}"]))
    for importance in ("apoz", "activation"):  # they score channels only
        validate(_compose(["pruning=channel", f"pruning.importance={importance}"]))
        with pytest.raises(
            ConfigError, match=rf"pruning\.importance='{importance}': not with pruning\.structure='unstructured'"
        ):
            validate(_compose([f"pruning.importance={importance}"]))


def test_digits_resnet20_channel_experiment():
    cfg = _compose(["experiment=digits_resnet20_channel"])
    validate(cfg)
    assert cfg.data._target_.endswith("DigitsDataModule") and list(cfg.data.input_shape) == [1, 32, 32]
    assert cfg.model._target_.endswith("CifarResNet") and cfg.model.in_channels == 1
    assert cfg.pruning.structure == "channel" and cfg.pruning.compact is True
    assert cfg.pruning.start_epoch < cfg.pruning.end_epoch < cfg.trainer.max_epochs
    assert list(cfg.optimizer.lr_milestones) == [cfg.pruning.end_epoch]  # fine-tuning at lr * 0.1 follows
    assert instantiate(cfg.data).input_shape == (1, 32, 32)
    rgb = _compose(["experiment=digits_resnet20_channel", "data.channels=3"])
    assert list(rgb.data.input_shape) == [3, 32, 32] and rgb.model.in_channels == 3


PRUNING_OPTIONS = GROUPS["pruning"]
#: Pruning choices without a PruningCallback: none, and depth (whole blocks removed when fitting starts, no masks).
WITHOUT_CALLBACK = ("none", "depth")
REGULARIZATION_OPTIONS = GROUPS["regularization"]


@pytest.mark.parametrize("distillation", ["none", "kd"])
@pytest.mark.parametrize("regularization", REGULARIZATION_OPTIONS)
@pytest.mark.parametrize("pruning", PRUNING_OPTIONS)
def test_regularization_and_distillation_compose_with_every_pruning_choice(pruning, regularization, distillation):
    overrides = [f"pruning={pruning}", f"regularization={regularization}", f"distillation={distillation}"]
    if pruning in WITHOUT_CALLBACK and distillation == "kd":
        overrides.append("distillation.start_epoch=5")  # nothing to take the start from
    cfg = _compose(overrides)
    validate(cfg)
    module = instantiate_module(cfg)
    if regularization == "none":
        assert module.reg_lambda == 0.0
    else:
        assert (module.reg_kind, module.reg_lambda) == (cfg.regularization.kind, cfg.regularization.strength)
        # Off when pruning starts, so that fine-tuning runs without the penalty; the whole run without pruning.
        assert module.reg_stop_epoch == cfg.pruning.get("start_epoch")
    callback = instantiate_distillation(cfg)
    assert (callback is not None) == (distillation == "kd")
    if callback is not None:
        assert isinstance(callback, DistillationCallback)
        assert (callback.alpha, callback.temperature) == (cfg.distillation.alpha, cfg.distillation.temperature)
    assert (instantiate_pruning(cfg) is None) == (pruning in WITHOUT_CALLBACK)
