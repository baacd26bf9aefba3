"""``experiment=pysource_gpt``: train() trains a GPT, prunes its heads and neurons, compacts it and reports
perplexity; sweeps of such runs are summarised with perplexity columns."""

import contextlib
import io
import json
import math

import pytest
from _checks import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_prune.app.config import ConfigError
from lightning_prune.app.sweep import summarize_sweep
from lightning_prune.app.train import train
from lightning_prune.app.validation import validate
from lightning_prune.deploy import load_compact
from lightning_prune.models import evaluate_perplexity

#: The main job shrunk to seconds: a 2-layer GPT of width 32 on 60 of this package's files, 3 epochs of 8 steps
#: (dense, pruning, fine-tuning).
TINY = [
    "data.pattern=*.txt",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.samples_per_epoch=32",
    "data.max_eval_windows=8",
    "data.val_fraction=0.2",
    "data.test_fraction=0.2",
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=2",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=2",
    "module.warmup_steps=2",
    "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false",
    "trainer.enable_checkpointing=false",
    "trainer.log_every_n_steps=1",
    "pruning.start_epoch=1",
    "pruning.end_epoch=1",
    "pruning.sparsity=0.5",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, source in enumerate(sorted((ROOT / "lightning_prune").rglob("*.py"))[:60]):
        (folder / f"{i}.txt").write_bytes(source.read_bytes())
    return folder


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["experiment=pysource_gpt", *overrides])


def test_the_experiment_is_the_language_model_main_job():
    cfg = _compose([])
    validate(cfg)
    assert cfg.module._target_ == "lightning_prune.models.LanguageModel"
    assert (cfg.data._target_, cfg.model._target_) == (
        "lightning_prune.data.PySourceDataModule",
        "lightning_prune.models.GPT",
    )
    assert (cfg.pruning.structure, cfg.pruning.schedule, cfg.pruning.sparsity) == ("heads", "cubic", 0.26)
    # Dense, then pruning, then fine-tuning: 12 epochs of 100 steps, 1,200 steps of about 413 ms on 2 quiet cores.
    assert 0 < cfg.pruning.start_epoch < cfg.pruning.end_epoch < cfg.trainer.max_epochs - 1
    assert cfg.trainer.max_epochs * cfg.data.samples_per_epoch // cfg.data.batch_size == 1200


def test_a_language_run_refuses_what_measures_accuracy():
    cfg = _compose(["export=all", "allocation=sensitivity"])
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    assert str(caught.value) == (
        "Invalid config:\n"
        "  allocation='lightning_prune.SensitivityCallback': measures accuracy, which module=language does not "
        "report: use allocation=none\n"
        "  export.forms=['dense', 'sparse', 'torch_export', 'onnx']: exports classifiers; with module=language use "
        "export=none"
    )


@pytest.fixture(scope="module")
def sweep(corpus, tmp_path_factory):
    """Two tiny runs of the experiment, as the jobs of a sweep over the pruning ratio (the first without latency),
    and what each printed."""
    folder = tmp_path_factory.mktemp("sweep")
    printed = []
    for job, (sparsity, latency) in enumerate(((0.25, "false"), (0.5, "true"))):
        overrides = [f"data.root={corpus}", f"output_dir={folder / str(job)}", f"pruning.sparsity={sparsity}"]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            returned = train(_compose([*TINY, *overrides, f"pruning.report_latency={latency}"]))
        printed.append((returned, out.getvalue()))
    return folder, printed


def test_the_experiment_trains_prunes_compacts_and_reports_perplexity(sweep, corpus):
    metrics = json.loads((sweep[0] / "1" / "metrics.json").read_text())
    assert metrics["status"] == "ok"
    names = [f"{stage}_{split}_ppl" for stage in ("dense", "pruned", "compact") for split in ("val", "test")]
    assert all(math.isfinite(metrics[name]) and 1 < metrics[name] < 256 for name in names)
    compact = metrics["compact"]
    assert compact["params_after"] == metrics["compact_params"] < compact["params_before"] == metrics["total_params"]
    assert compact["macs_after"] < compact["macs_before"]
    assert {"latency_b1_ms_before", "latency_b1_ms_after", "latency_b64_stable"} <= set(compact)
    # Half the heads and neurons of every layer go: 2 of 4 query heads (1 of 2 key/value heads), 32 of 64 neurons.
    assert compact["widths"] == [{"num_heads": 2, "num_kv_heads": 1, "head_dim": 8, "intermediate_size": 32}] * 2
    # The compact model computes the pruned model's function: the same perplexity on the same windows.
    assert metrics["compact_val_ppl"] == pytest.approx(metrics["pruned_val_ppl"], rel=1e-4)
    assert metrics["compact_test_ppl"] == pytest.approx(metrics["pruned_test_ppl"], rel=1e-4)
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.02)

    # The saved compact model reloads into a fresh GPT and computes what the run measured.
    cfg = _compose([*TINY, f"data.root={corpus}"])
    small = load_compact(instantiate(cfg.model, _convert_="all"), compact["path"])
    assert sum(p.numel() for p in small.parameters()) == metrics["compact_params"]
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    assert evaluate_perplexity(small, datamodule.val_dataloader()) == pytest.approx(
        metrics["compact_val_ppl"], rel=1e-4
    )


def test_the_summary_prints_perplexity_and_sizes(sweep):
    folder, printed = sweep
    metrics = json.loads((folder / "0" / "metrics.json").read_text())
    returned, out = printed[0]
    assert returned == metrics["pruned_val_ppl"]
    assert "latency_b1_ms_before" not in metrics["compact"]
    dense = f"    dense          {metrics['dense_val_ppl']:<11.4f} {metrics['dense_test_ppl']:.4f}  (start of epoch 1"
    assert dense in out
    assert f"    pruned         {metrics['pruned_val_ppl']:<11.4f} {metrics['pruned_test_ppl']:.4f}\n" in out
    assert f"    compact        {metrics['compact_val_ppl']:<11.4f}" in out
    before, after = metrics["compact"]["params_before"], metrics["compact"]["params_after"]
    assert f"  compact params   {before:,} -> {after:,}  ({1 - after / before:.1%} fewer)" in out
    assert out.count("  schedule         cubic to ") == 1
    assert "latency b1" in printed[1][1] and "latency b1" not in out  # the table of the run that timed


def test_a_sweep_of_language_runs_is_summarised_with_perplexity(sweep):
    sweep, _ = sweep
    summary = summarize_sweep(sweep)
    assert [run.status for run in summary.runs] == ["completed", "completed"]
    metrics = [json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")]
    table = [line for line in summary.markdown_path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[3:7] == ["dense ppl", "pruned ppl", "compact ppl", "ppl change"]
    for line, m in zip(table[2:], metrics):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        change = m["pruned_val_ppl"] / m["dense_val_ppl"] - 1
        expected = [f"{m['dense_val_ppl']:.4f}", f"{m['pruned_val_ppl']:.4f}", f"{m['compact_val_ppl']:.4f}"]
        assert cells[3:7] == [*expected, f"{change * 100:+.1f}%"]
        assert cells[9] == str(m["compact_params"])
    assert metrics[1]["compact_params"] < metrics[0]["compact_params"]  # the higher ratio removes more
