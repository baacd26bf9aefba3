"""The sensitivity job keeps a finished analysis: an allocation that cannot meet its bounds fails only after the
table and the plot are written, and the message lists them. It drops third-party noise as the training job does."""

import logging
import warnings

import pytest
from _checks import CONF
from hydra import compose, initialize_config_dir

from lightning_prune.app import sensitivity as sensitivity_job
from lightning_prune.app.quiet import LIGHTNING_LOGGER, TIP_PREFIX
from lightning_prune.app.sensitivity import run_sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_allocation_that_cannot_be_met_fails_after_writing_the_table_and_plot(tmp_path):
    overrides = [
        "+sensitivity=default",
        "model.channels=[8,16]",
        "model.hidden=32",
        "sensitivity.epochs=0",
        "sensitivity.ratios=[0.5]",
        "sensitivity.target_sparsity=0.9",  # above every ratio analysed: no allocation reaches it
        "sensitivity.max_drop=0.0",
        f"output_dir='{tmp_path}'",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with pytest.raises(ValueError, match=r"The analysis is saved \(.*sensitivity\.csv, .*sensitivity\.png, "):
        run_sensitivity(cfg)
    assert (tmp_path / "sensitivity.csv").read_text().startswith("layer,size,macs,ratio,sparsity,metric")
    assert (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sensitivity.md").exists()
    assert not (tmp_path / "allocation.yaml").exists()


def test_the_job_drops_third_party_noise_and_keeps_our_warnings(tmp_path, caplog, monkeypatch):
    overrides = [
        "+sensitivity=default",
        "model=mlp",
        "model.hidden=[32]",
        "sensitivity.epochs=1",  # a dense epoch: Lightning's fit writes its tips and the LeafSpec warning
        "sensitivity.ratios=[0.5]",
        "sensitivity.target_sparsity=0.5",
        "sensitivity.plot=false",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"output_dir='{tmp_path}'",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    ours = "lightning_prune: a warning raised while the job runs"
    analyze = sensitivity_job.analyze

    def analyze_and_warn(*args, **kwargs):
        warnings.warn(ours, UserWarning, stacklevel=2)
        return analyze(*args, **kwargs)

    monkeypatch.setattr(sensitivity_job, "analyze", analyze_and_warn)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_sensitivity(cfg)
    lines = [r.getMessage() for r in caplog.records]
    messages = [str(w.message) for w in caught]
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in lines  # Lightning's other lines still show
    assert not any(line.startswith(TIP_PREFIX) for line in lines)
    assert not any("LeafSpec" in m for m in messages)
    assert messages.count(ours) == 1
    assert logging.getLogger(LIGHTNING_LOGGER).filters == []  # restored after the job
