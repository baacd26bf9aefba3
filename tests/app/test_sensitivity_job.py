"""The sensitivity job keeps a finished analysis: an allocation that cannot meet its bounds fails only after the
table and the plot are written, and the message lists them."""

import pytest
from _checks import CONF
from hydra import compose, initialize_config_dir

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
