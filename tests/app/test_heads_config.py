"""``pruning=heads`` composes with the language-model options and prunes a GPT's heads and neurons."""

import pytest
from _checks import CONF
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_prune.app.train import instantiate_pruning
from lightning_prune.app.validation import validate
from lightning_prune.structures import HeadStructure


def test_pruning_heads_composes_validates_and_binds_to_the_gpt():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["pruning=heads", "data=pysource", "model=gpt_tiny"])
    validate(cfg)
    pruning = instantiate_pruning(cfg)
    assert isinstance(pruning.structure, HeadStructure) and pruning.scope == "layer"
    net = instantiate(cfg.model, _convert_="all")
    masks = pruning.pruner.bind(net)
    assert [g.channels for g in masks.groups[:2]] == [4, 384]  # 4 key/value groups of 2 query heads; 384 neurons
    pruning.pruner.prune(0.25)
    assert pruning.pruner.achieved_sparsity == pytest.approx(0.25, abs=0.01)
