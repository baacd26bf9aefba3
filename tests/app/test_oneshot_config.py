"""One-shot pruning in the Hydra application: pruning=wanda|sparsegpt|magnitude_oneshot and allocation=owl compose
into a PruningCallback and a OneShotPruning wired to it; scripts/oneshot.py prunes a saved checkpoint."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from _checks import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_prune import PruningCallback
from lightning_prune.app.config import ConfigError
from lightning_prune.app.oneshot import instantiate_oneshot, prune_checkpoint
from lightning_prune.app.train import instantiate_module, instantiate_pruning
from lightning_prune.app.validation import validate
from lightning_prune.callbacks import OneShotPruning
from lightning_prune.deploy.archive import load_sparse_state_dict, save_sparse
from lightning_prune.oneshot import OWL, Magnitude, SparseGPT, Wanda


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize(
    ("option", "method"), [("wanda", Wanda), ("sparsegpt", SparseGPT), ("magnitude_oneshot", Magnitude)]
)
def test_pruning_options_build_a_one_shot_pruning_wired_to_the_pruning_callback(option, method):
    cfg = _compose([f"pruning={option}", "pruning.structure=4:8"])
    validate(cfg)
    pruning = instantiate_pruning(cfg)
    oneshot = instantiate_oneshot(cfg, pruning)
    assert isinstance(pruning, PruningCallback) and isinstance(oneshot, OneShotPruning)
    assert oneshot.pruning is pruning and type(oneshot.method) is method
    assert pruning.schedule.sparsity_at(0) == pruning.sparsity == 0.5  # whatever the schedule group's shape
    assert repr(oneshot.structure) == "NMStructure(n=4, m=8)" and oneshot.num_samples == 128


def test_owl_is_an_allocation_of_one_shot_pruning():
    cfg = _compose(["pruning=sparsegpt", "allocation=owl", "pruning.sparsity=0.7", "allocation.lam=0.1"])
    validate(cfg)
    oneshot = instantiate_oneshot(cfg, instantiate_pruning(cfg))
    assert isinstance(oneshot.allocation, OWL) and oneshot.allocation.lam == 0.1


def test_owl_without_one_shot_pruning_is_refused():
    cfg = _compose(["allocation=owl"])
    with pytest.raises(ConfigError, match=r"allocation='lightning_prune.oneshot.OWL': sets the layer sparsities of"):
        validate(cfg)
    with pytest.raises(ConfigError, match="allocation=owl sets the layer sparsities of one-shot pruning"):
        instantiate_oneshot(cfg, instantiate_pruning(cfg))


def _language_config(tmp_path) -> DictConfig:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, source in enumerate(sorted((ROOT / "lightning_prune").rglob("*.py"))[:60]):
        shutil.copy(source, corpus / f"{i}.txt")
    cfg = _compose(
        [
            "data=pysource",
            "model=gpt_tiny",
            "module=language",
            f"data.root={corpus}",
            "data.pattern=*.txt",
            "data.seq_len=32",
            "data.batch_size=4",
            "data.samples_per_epoch=64",
            "data.max_eval_windows=8",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            "model.config.hidden_size=32",
            "model.config.intermediate_size=64",
            "model.config.num_hidden_layers=2",
            "model.config.num_attention_heads=4",
            "model.config.num_key_value_heads=2",
        ]
    )
    return cfg


def _script():
    spec = importlib.util.spec_from_file_location("oneshot_script", ROOT / "scripts" / "oneshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_prunes_a_saved_checkpoint_and_writes_the_masks_as_the_pruning_callback_does(tmp_path):
    cfg = _language_config(tmp_path)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    module = instantiate_module(cfg)
    dense = {k: v.clone() for k, v in module.state_dict().items()}
    torch.save({"state_dict": dense, "optimizer_states": [{}], "epoch": 3}, run / "checkpoints" / "last.ckpt")

    script = _script()
    out = tmp_path / "pruned.ckpt"
    assert (
        script.main([str(run), "--method", "sparsegpt", "--structure", "2:4", "--samples", "8", "--out", str(out)]) == 0
    )
    pruned = torch.load(out, weights_only=True)
    assert "optimizer_states" not in pruned and pruned["epoch"] == 3
    key = PruningCallback(sparsity=0.5, schedule="one_shot", start_epoch=0, structure="2:4").state_key
    masks = pruned["callbacks"][key]["masks"]
    block_masks = {n: m for n, m in masks.items() if ".layers." in n}
    assert len(block_masks) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for name, mask in block_masks.items():
        assert bool((mask.reshape(-1, 4).sum(1) == 2).all()), name  # 2 of every 4 kept
        weight = pruned["state_dict"][name]
        assert bool((weight[~mask] == 0).all()), name
        assert not torch.equal(weight[mask], dense[name][mask]), name  # SparseGPT updated the kept weights
    outside = [n for n in masks if ".layers." not in n]
    assert all(bool(masks[n].all()) for n in outside)  # embeddings and head stay dense
    assert pruned["callbacks"]["OneShotPruning"] == {"pruned_at": 0}

    # The pruned checkpoint loads strictly into the model (the masks never reparametrise it) and exports through the
    # sparse archive, checked against its masks, losslessly and smaller than the dense state dict.
    model = instantiate_module(cfg)
    model.load_state_dict(pruned["state_dict"], strict=True)
    archive = save_sparse(model, tmp_path / "sparse.pt", masks=block_masks)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    assert archive.stat().st_size < (tmp_path / "dense.pt").stat().st_size
    restored = load_sparse_state_dict(archive)
    for name, value in model.state_dict().items():
        assert torch.equal(restored[name], value), name


def test_the_script_reports_bad_input_and_writes_nothing(tmp_path, capsys):
    script = _script()
    assert script.main([str(tmp_path / "missing")]) == 2
    assert "does not exist: pass a run directory or a checkpoint file" in capsys.readouterr().err
    checkpoint = tmp_path / "a.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    assert script.main([str(checkpoint)]) == 2
    assert "No Hydra config for" in capsys.readouterr().err


def test_prune_checkpoint_refuses_a_checkpoint_of_another_model(tmp_path):
    cfg = _language_config(tmp_path)
    module, data = instantiate_module(cfg), instantiate(cfg.data)
    with pytest.raises(ValueError, match="The checkpoint does not fit the model: "):
        prune_checkpoint({"state_dict": {"x": torch.zeros(1)}}, module, data)
    with pytest.raises(ValueError, match="The checkpoint has no `state_dict`: not a Lightning checkpoint"):
        prune_checkpoint({}, module, data)
