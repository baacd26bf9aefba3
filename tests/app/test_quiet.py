"""The jobs drop Lightning's product tips, the LeafSpec deprecation warning and ONNX INFO lines during a run only;
Lightning's other lines and the project's own warnings still show."""

import logging
import warnings

import torch
from _checks import images, tiny_trainer
from lightning import LightningModule
from torch import nn

from lightning_prune import PruningCallback
from lightning_prune.app.quiet import LIGHTNING_LOGGER, ONNX_LOGGERS, TIP_PREFIX, quiet_third_party


class _Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, caplog, *, quiet: bool) -> tuple[list[str], list[str]]:
    """Fit one epoch with a schedule that cannot finish (PruningCallback warns); the log lines and warnings."""
    caplog.clear()
    pruning = PruningCallback(sparsity=0.5, schedule="linear", start_epoch=0, end_epoch=3)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_third_party() if quiet else warnings.catch_warnings():
            tiny_trainer(tmp_path, [pruning], max_epochs=1).fit(_Tiny(), images())
    return [r.getMessage() for r in caplog.records], [str(w.message) for w in caught]


def test_a_run_drops_the_noise_and_keeps_our_warnings(tmp_path, caplog):
    loud_logs, loud_warnings = _fit(tmp_path, caplog, quiet=False)
    quiet_logs, quiet_warnings = _fit(tmp_path, caplog, quiet=True)
    ours = "PruningCallback: the schedule ends at epoch 3 but the Trainer stops after epoch 0"
    # Without the filter the noise is there (so this test can fail), with it gone.
    assert any(line.startswith(TIP_PREFIX) for line in loud_logs)
    assert any("is deprecated" in w and "LeafSpec" in w for w in loud_warnings)
    assert not any(line.startswith(TIP_PREFIX) for line in quiet_logs)
    assert not any("LeafSpec" in w for w in quiet_warnings)
    # Lightning's other lines and our own warning still show.
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in quiet_logs
    assert any(w.startswith(ours) for w in quiet_warnings) and any(w.startswith(ours) for w in loud_warnings)


def test_onnx_info_lines_are_dropped_and_everything_is_restored(caplog):
    exporter = logging.getLogger("torch.onnx._internal.exporter._core")
    # torch sets its loggers to WARNING; a logging config such as Hydra's can lower them, as this one does.
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="torch.onnx"):
        before = [logging.getLogger(name).level for name in ONNX_LOGGERS]
        with quiet_third_party():
            exporter.info("Run decomposition...")
            exporter.warning("Failed to convert the exported program: falling back")
            logging.getLogger("lightning_prune.app.train").info("Summary (MLP, seed 0)")
        exporter.info("Translate the graph into ONNX...")
        after = [logging.getLogger(name).level for name in ONNX_LOGGERS]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Failed to convert the exported program: falling back",
        "Summary (MLP, seed 0)",
        "Translate the graph into ONNX...",
    ]
    assert after == before and before[0] == logging.INFO
    assert logging.getLogger(LIGHTNING_LOGGER).filters == []
