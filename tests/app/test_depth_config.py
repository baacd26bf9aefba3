"""``pruning=depth`` (and ``pruning.depth`` beside head pruning): composes, validates, and in train() removes a
GPT's least important block when fitting starts, reports it, and saves a shallower model that load_compact reloads."""

import contextlib
import io
import json

import pytest
import torch
from _checks import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate

from lightning_prune.app.config import ConfigError
from lightning_prune.app.depth import instantiate_depth
from lightning_prune.app.train import instantiate_pruning, train
from lightning_prune.app.validation import validate
from lightning_prune.callbacks import DepthPruning
from lightning_prune.deploy import load_compact
from lightning_prune.models import evaluate_perplexity

LANGUAGE = ["data=pysource", "model=gpt_tiny", "module=language", "optimizer=adamw"]

#: A 3-layer GPT of width 32 on 40 of this package's files, 1 epoch of 4 steps.
TINY = [
    "data.pattern=*.txt",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.samples_per_epoch=16",
    "data.max_eval_windows=4",
    "data.val_fraction=0.2",
    "data.test_fraction=0.2",
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=3",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=2",
    "module.warmup_steps=1",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_checkpointing=false",
    "pruning.depth.num_samples=8",
]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_pruning_depth_composes_validates_and_builds_the_callback_alone_or_beside_head_pruning():
    cfg = _compose(["pruning=depth", *LANGUAGE, "pruning.depth.num_blocks=0.25"])
    validate(cfg)
    depth = instantiate_depth(cfg)
    assert isinstance(depth, DepthPruning) and (depth.num_blocks, depth.score) == (0.25, "influence")
    assert instantiate_pruning(cfg) is None  # no masks: the blocks are removed, the rest trains dense
    both = _compose(["experiment=pysource_gpt", "pruning.depth={num_blocks: 1, score: angular}"])
    validate(both)
    assert instantiate_pruning(both).structure.name == "heads"
    assert instantiate_depth(both).score == "angular"
    assert instantiate_depth(_compose(["experiment=pysource_gpt"])) is None


def test_bad_depth_options_are_refused_by_key():
    with pytest.raises(HydraException, match=r"^Could not override 'pruning\.depth\.num_block'\."):
        _compose(["pruning=depth", "pruning.depth.num_block=2"])
    added = _compose(["pruning=depth", *LANGUAGE, "+pruning.depth.num_block=2"])
    with pytest.raises(ConfigError, match=r"pruning\.depth\.num_block=2: unknown key; allowed: num_blocks, score, "):
        validate(added)
    cfg = _compose(["pruning=depth", *LANGUAGE, "pruning.depth.num_blocks=1.5", "pruning.depth.score=cosine"])
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    assert str(caught.value) == (
        "Invalid config:\n"
        "  pruning.depth.num_blocks=1.5: must be an integer >= 1 (blocks to remove) or a fraction in (0, 1)\n"
        "  pruning.depth.score='cosine': must be one of ['angular', 'influence', 'relative_norm']"
    )
    both = _compose(["experiment=pysource_gpt", "pruning.depth={num_blocks: 1, blocks_: x}"])
    with pytest.raises(ConfigError, match=r"pruning\.depth\.blocks_='x': unknown key; allowed: num_blocks, score"):
        validate(both)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, source in enumerate(sorted((ROOT / "lightning_prune").rglob("*.py"))[:40]):
        (folder / f"{i}.txt").write_bytes(source.read_bytes())
    return folder


def test_train_removes_a_block_reports_it_and_saves_a_model_load_compact_reloads(corpus, tmp_path):
    overrides = ["pruning=depth", *LANGUAGE, *TINY, f"data.root={corpus}"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        returned = train(_compose([*overrides, f"output_dir={tmp_path}"]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    depth = metrics["depth"]
    assert (depth["blocks_before"], depth["blocks_after"], depth["score"]) == (3, 2, "influence")
    assert len(depth["removed"]) == 1 and len(depth["scores"]) == 3
    assert depth["removed"] == [min(range(3), key=lambda i: depth["scores"][i])]
    assert f"removed blocks {depth['removed']} of 'model.layers' by influence (3 -> 2 blocks)" in out.getvalue()
    assert metrics["pruned_val_ppl"] == returned
    cfg = _compose(overrides)
    small = load_compact(instantiate(cfg.model, _convert_="all"), depth["path"])
    assert len(small.layers) == small.config.num_hidden_layers == 2
    assert sum(p.numel() for p in small.parameters()) == metrics["total_params"]
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    with torch.no_grad():
        assert evaluate_perplexity(small, datamodule.val_dataloader()) == pytest.approx(returned, rel=1e-5)
