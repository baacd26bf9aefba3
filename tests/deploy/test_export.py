"""Deployable exports: torch.export and ONNX round trips, the deployment report, Hydra and the command line."""

import importlib.util
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _checks import CONF, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from lightning_prune import MaskSet, PruningCallback, prunable_parameters
from lightning_prune.app.config import ConfigError
from lightning_prune.app.validation import validate
from lightning_prune.criteria.magnitude import MagnitudeImportance
from lightning_prune.data import DigitsDataModule
from lightning_prune.deploy.archive import load_sparse
from lightning_prune.deploy.export import ExportError, export_program, inference_model
from lightning_prune.deploy.onnx_export import export_onnx, onnx_files, onnx_runner
from lightning_prune.deploy.report import _DESCRIPTIONS, FILE_NAMES, ExportReport, export_model, run_export
from lightning_prune.models import MLP, ImageClassifier, SmallCNN, resnet20
from lightning_prune.structures.channel import prune_channels_
from lightning_prune.structures.unstructured import Unstructured


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).double().norm() / b.detach().double().norm())


def _mlp() -> tuple[nn.Module, MaskSet, torch.Tensor]:
    torch.manual_seed(0)
    net = MLP().eval()
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), sparsity=0.9)
    return net, masks, torch.randn(4, 1, 8, 8)


def _cnn() -> tuple[nn.Module, MaskSet, torch.Tensor]:
    torch.manual_seed(0)
    net = SmallCNN()
    x = torch.randn(6, 1, 8, 8)
    net(x)  # BatchNorm statistics other than the defaults
    return net.eval(), prune_channels_(net, x, sparsity=0.5), x


def _resnet() -> tuple[nn.Module, MaskSet, torch.Tensor]:
    torch.manual_seed(0)
    net = resnet20(in_channels=1)
    x = torch.randn(4, 1, 16, 16)
    net(x)
    return net.eval(), prune_channels_(net, x, sparsity=0.5, scope="layer"), x


def _resnet_unstructured() -> tuple[nn.Module, MaskSet, torch.Tensor]:
    torch.manual_seed(0)
    net = resnet20(in_channels=1)
    x = torch.randn(4, 1, 16, 16)
    net(x)
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), sparsity=0.8)
    return net.eval(), masks, x


def _num_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(
    "build",
    [
        _mlp,
        _cnn,
        _resnet_unstructured,
        pytest.param(_resnet, marks=pytest.mark.slow),  # two Torch-Pruning traces of ResNet-20: several seconds
    ],
    ids=["mlp", "cnn-bn-channels", "resnet20", "resnet20-channels"],
)
def test_exported_program_reloads_and_reproduces_the_pruned_model(build, tmp_path):
    net, masks, x = build()
    channels = build in (_cnn, _resnet)
    program = export_program(net, x, tmp_path / "model.pt2", masks=masks, compact="auto" if channels else False)
    reloaded = torch.export.load(tmp_path / "model.pt2").module()
    for batch in (x[:1], x, torch.randn(9, *x.shape[1:])):
        with torch.no_grad():
            assert _rel(reloaded(batch), net(batch)) <= 1e-5
    ops = {str(node.target) for node in program.graph.nodes}
    assert not any("batch_norm" in op for op in ops)  # folded into the convolutions
    params = sum(p.numel() for p in net.parameters())
    exported = sum(t.numel() for t in program.state_dict.values())
    if channels:
        assert exported < 0.6 * params  # compacted: half of the channels are gone
    else:
        assert exported <= params  # BatchNorm folded away, nothing removed


def test_onnx_of_a_channel_pruned_cnn_with_batchnorm_matches_under_onnx_runtime(tmp_path):
    net, masks, x = _cnn()
    path = export_onnx(net, x, tmp_path / "model.onnx", masks=masks)
    assert onnx_files(path) == [path]  # small: weights inside the file
    run = onnx_runner(path, threads=1)
    for batch in (x[:1], torch.randn(11, 1, 8, 8)):
        (out,) = run(batch)
        with torch.no_grad():
            assert _rel(out, net(batch)) <= 1e-5
    import onnx

    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


@pytest.mark.slow
@pytest.mark.parametrize("build", [_mlp, _resnet], ids=["mlp", "resnet20-channels"])
def test_onnx_round_trip_of_more_models(build, tmp_path):
    net, masks, x = build()
    path = export_onnx(net, x, tmp_path / "model.onnx", masks=masks)
    batch = torch.randn(5, *x.shape[1:])
    (out,) = onnx_runner(path)(batch)
    with torch.no_grad():
        assert _rel(out, net(batch)) <= 1e-5


def test_inference_model_compacts_and_folds_a_copy():
    net, masks, x = _cnn()
    small = inference_model(net, x, masks=masks)
    assert small.features[0].out_channels < net.features[0].out_channels and _num_batchnorms(small) == 0
    assert _num_batchnorms(net) == 2 and net.features[0].out_channels == 32  # unchanged
    with torch.no_grad():
        assert _rel(small(x), net(x)) <= 1e-5
    plain = inference_model(net, x, compact=False)
    assert plain.features[0].out_channels == 32 and _num_batchnorms(plain) == 0
    with pytest.raises(
        ValueError,
        match=r"`compact=True` but Sequential cannot be compacted: Sequential has no "
        r"channel group to prune",
    ):
        inference_model(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4), compact=True)
    with pytest.raises(ValueError, match=r"`compact` must be True, False or 'auto', got 'yes'"):
        inference_model(net, x, compact="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`example_inputs` must be a tensor or a non-empty tuple of tensors"):
        inference_model(net, [x])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`example_inputs` must be batched.*got shape \(\)"):
        inference_model(net, torch.tensor(1.0))


class _Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x


def test_an_unexportable_layer_is_named():
    net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), _Gate()), nn.Linear(8, 2)).eval()
    with pytest.raises(
        ExportError,
        match=r"torch\.export cannot export Sequential: layer '1\.1' \(_Gate\) fails on "
        r"its own: .*data-dependent",
    ):
        export_program(net, torch.randn(3, 4))


@pytest.mark.slow
def test_an_unexportable_layer_is_named_by_the_onnx_export(tmp_path):
    net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), _Gate()), nn.Linear(8, 2)).eval()
    with pytest.raises(ExportError, match=r"torch\.onnx\.export cannot export Sequential: layer '1\.1' \(_Gate\)"):
        export_onnx(net, torch.randn(3, 4), tmp_path / "model.onnx")


def test_exports_refuse_masks_that_were_not_applied(tmp_path):
    net, masks, x = _mlp()
    with torch.no_grad():
        net.features[1].weight.add_(1.0)  # every pruned weight nonzero again
    with pytest.raises(ValueError, match=r"masks were not applied to MLP: features\.1\.weight has \d+ nonzero entries"):
        export_program(net, x, masks=masks)
    with pytest.raises(ValueError, match=r"masks were not applied"):
        export_model(net, x, tmp_path, masks=masks, forms=["onnx"], latency=False)
    assert not (tmp_path / "model.onnx").exists()


def test_a_wrong_export_is_caught(tmp_path):
    class Noisy(nn.Module):  # differs between calls: no export can reproduce it
        def forward(self, x):
            return x + torch.rand_like(x)

    with pytest.raises(
        RuntimeError,
        match=r"The ExportedProgram computes something else than the pruned model: "
        r"relative error .* \(more than rtol=1e-05\)",
    ):
        export_program(Noisy(), torch.randn(3, 4), compact=False)


def test_missing_onnx_packages_are_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(
        ImportError,
        match=r"ONNX export needs the `onnx` and `onnxruntime` packages.*pip install "
        r"\"lightning-prune\[export\]\"",
    ):
        export_onnx(nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "m.onnx")


# ---------------------------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits CNN trained 2 short epochs by Lightning, magnitude-pruned to 80% at the start of epoch 1."""
    pl.seed_everything(0, workers=True)
    module = ImageClassifier(SmallCNN(channels=(8, 16), hidden=32), lr=0.05)
    pruning = PruningCallback(sparsity=0.8, schedule="one_shot", start_epoch=1)
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=8,
        limit_val_batches=2,
        callbacks=[pruning],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path_factory.mktemp("fit"),
    )
    datamodule = DigitsDataModule(batch_size=64)
    trainer.fit(module, datamodule=datamodule)
    inputs, _ = next(iter(datamodule.test_dataloader()))
    return module, pruning, inputs[:8]


def test_every_form_of_a_trainer_pruned_model_round_trips(trained, tmp_path):
    module, pruning, x = trained
    net = module.model
    assert pruning.achieved_sparsity == pytest.approx(0.8, abs=1e-3)
    report = export_model(net, x, tmp_path, masks=pruning, batch_sizes=(1, 4), blocks=1, repeats=2, threads=1)
    assert set(report.sizes) == set(FILE_NAMES)
    assert all((tmp_path / name).is_file() for name in FILE_NAMES.values())
    assert report.sizes["sparse"] < 0.5 * report.sizes["dense"]  # a tiny model: BatchNorm and biases weigh
    fresh = SmallCNN(channels=(8, 16), hidden=32)
    load_sparse(fresh, tmp_path / "sparse.pt")
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))
    batch = torch.cat([x, x[:3]])
    with torch.no_grad():
        expected = net.eval()(batch)
        assert _rel(torch.export.load(tmp_path / "model.pt2").module()(batch), expected) <= 1e-5
    (out,) = onnx_runner(tmp_path / "model.onnx")(batch)
    assert _rel(out, expected) <= 1e-5
    assert set(report.latency_ms) >= {"dense", "masked", "compact", "torch_export", "onnx"}
    assert all(set(by) == {1, 4} and all(ms > 0 for ms in by.values()) for by in report.latency_ms.values())
    # Each speed-up is printed as a ratio only where its blocks were judged stable, else as "unstable".
    assert set(report.stable) == set(report.latency_ms) and all(set(by) == {1, 4} for by in report.stable.values())
    rows = {line.split("  ")[1].strip(): line for line in report.table().splitlines() if line.startswith("  ")}
    for variant, by in report.speedup.items():
        row = rows[_DESCRIPTIONS[variant]]
        assert all(f"{by[b]:.2f}x" in row for b in (1, 4) if report.stable[variant][b])
        single = report.one_thread.get(variant, {}).get("stable", True)  # the "b1 1 thread" column, judged apart
        assert ("unstable (machine busy)" in row) == (not (all(report.stable[variant].values()) and single))
    assert [c["name"] for c in report.sparse_layers] == ["classifier.1", "head"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["sizes"] == report.sizes and saved["latency_ms"]["dense"].keys() == {"1", "4"}
    table = report.table()
    assert "sparse.pt" in table and "ONNX Runtime" in table and "x dense b4" in table


def test_export_model_checks_its_options(trained, tmp_path):
    net = trained[0].model
    x = trained[2]
    with pytest.raises(
        ValueError,
        match=r"`forms` must be a list of \['dense', 'sparse', 'torch_export', 'onnx'\], "
        r"got unknown \['tflite'\]",
    ):
        export_model(net, x, tmp_path, forms=["tflite"])
    with pytest.raises(ValueError, match=r"`batch_sizes` must be a non-empty sequence of integers >= 1"):
        export_model(net, x, tmp_path, batch_sizes=[])
    with pytest.raises(ValueError, match=r"`blocks` must be an integer >= 1, got 0"):
        export_model(net, x, tmp_path, blocks=0)
    with pytest.raises(TypeError, match=r"`latency` must be True or False, got 'no'"):
        export_model(net, x, tmp_path, latency="no")  # type: ignore[arg-type]


def test_run_export_reports_a_failure_without_raising(tmp_path):
    net, masks, x = _mlp()
    with torch.no_grad():
        net.head.weight.fill_(1.0)
    report, text = run_export({"forms": ["sparse"], "dir": "out", "latency": False}, net, x, tmp_path, masks=masks)
    assert report["status"] == "failed" and "masks were not applied to MLP: head.weight" in report["error"]
    assert text.startswith("Export failed: ValueError")
    ok, text = run_export({"forms": ["sparse"], "dir": "out", "latency": False}, net, x, tmp_path)
    assert ok["status"] == "ok" and ok["files"]["sparse"] == str(tmp_path / "out" / "sparse.pt")
    assert "sparse.pt" in text
    assert run_export(None, net, x, tmp_path) == (None, "")


def test_report_table_lists_latencies():
    report = ExportReport(
        "Net",
        "out",
        latency_ms={"dense": {1: 2.0, 64: 20.0}, "sparse_kernels": {1: 0.5, 64: 8.0}},
        speedup={"dense": {1: 1.0, 64: 1.0}, "sparse_kernels": {1: 4.0, 64: 2.5}},
        settings={"repeats": 10, "blocks": 3, "threads": 2},
    )
    lines = report.table().splitlines()
    assert lines[1].split() == ["latency", "(ms)", "b1", "b64", "x", "dense", "b1", "x", "dense", "b64"]
    assert lines[3].split()[-4:] == ["0.500", "8.000", "4.00x", "2.50x"]


# ---------------------------------------------------------------------------------------------- Hydra and the CLI
def _compose(overrides):
    import lightning_prune.app.train  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_export_group_composes_and_validates():
    assert not _compose([]).export  # export=none by default: nothing is exported
    cfg = _compose(["export=all"])
    validate(cfg)
    assert list(cfg.export.forms) == ["dense", "sparse", "torch_export", "onnx"] and cfg.export.dir == "export"
    bad = _compose(["export=all", "export.forms=[dense,tflite]", "export.batch_sizes=[0]", "export.compact=maybe"])
    with pytest.raises(ConfigError) as caught:
        validate(bad)
    message = str(caught.value)
    assert "export.forms=['dense', 'tflite']: must be a list of ['dense', 'sparse', 'torch_export', 'onnx']" in message
    assert "export.batch_sizes=[0]: must be a non-empty list of integers >= 1" in message
    assert "export.compact='maybe': must be true, false or auto" in message


FAST = [
    "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false",
    "model.channels=[8,16]",
    "model.hidden=32",
    "pruning.start_epoch=0",
    "pruning.end_epoch=1",
    "optimizer.lr_milestones=[]",
]


@pytest.mark.slow
def test_train_exports_when_the_group_asks_and_the_cli_reexports(tmp_path, capsys):
    from lightning_prune.app.train import train

    cfg = _compose([*FAST, "export=all", "export.repeats=2", "export.blocks=1", f"output_dir={tmp_path}"])
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["export"]["status"] == "ok"
    assert metrics["export"]["sizes"]["sparse"] < 0.5 * metrics["export"]["sizes"]["dense"]
    assert all((tmp_path / "export" / name).is_file() for name in FILE_NAMES.values())
    assert "Deployment of SmallCNN" in capsys.readouterr().out
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    main = _cli()
    assert main([str(tmp_path), "--out", str(tmp_path / "again"), "--blocks", "1", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "Deployment of SmallCNN" in out and "ONNX Runtime" in out
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["sizes"]["sparse"] == metrics["export"]["sizes"]["sparse"]  # the same weights and masks


def _cli():
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main


def test_cli_errors_name_what_is_missing(tmp_path, capsys):
    main = _cli()
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist: pass a run directory or a checkpoint file" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "No Hydra config for" in capsys.readouterr().err
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(_compose([]), tmp_path / ".hydra" / "config.yaml")
    assert main([str(tmp_path)]) == 2
    assert "No checkpoint (*.ckpt) under" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured sparse kernels need a CUDA GPU")
def test_semi_structured_2_4_linear_matches_dense_on_gpu():
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    linear = nn.Linear(512, 512).half().cuda().eval()
    with torch.no_grad():
        groups = linear.weight.view(-1, 4)
        drop = groups.abs().argsort(dim=1)[:, :2]  # the two smallest of every four
        groups.scatter_(1, drop, 0.0)
    x = torch.randn(64, 512, device="cuda", dtype=torch.half)
    expected = linear(x)
    linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight))
    assert _rel(linear(x).float(), expected.float()) <= 1e-2


def test_export_arguments_are_checked(tmp_path):
    net = nn.Linear(3, 2).eval()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"`rtol` must be a number >= 0 \(e\.g\. 1e-5\), got -1"):
        export_program(net, x, rtol=-1)
    with pytest.raises(TypeError, match=r"`dynamic_batch` must be True or False, got 'yes'"):
        export_program(net, x, dynamic_batch="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`opset_version` must be None or an integer, got '18'"):
        export_onnx(net, x, tmp_path / "m.onnx", opset_version="18")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"No ONNX file at '.*missing\.onnx'"):
        onnx_runner(tmp_path / "missing.onnx")
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"`threads` must be None or an integer >= 1, got 0"):
        onnx_runner(tmp_path / "m.onnx", threads=0)


def test_cli_refuses_a_checkpoint_with_arbitrary_objects_unless_trusted(tmp_path):
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.save({"state_dict": {}, "when": Path("somewhere")}, tmp_path / "odd.ckpt")
    with pytest.raises(
        ValueError, match=r"does not read: \['pathlib\.PosixPath'\]\. If you trust the file, pass --trust"
    ):
        script.load_checkpoint(tmp_path / "odd.ckpt")
    assert script.load_checkpoint(tmp_path / "odd.ckpt", trust=True)["when"] == Path("somewhere")
