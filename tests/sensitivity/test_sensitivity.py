"""Sensitivity analysis and per-layer allocation: analyze, allocate, predict, the report files, the callback and
the Hydra job."""

import copy
import csv
import errno
import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from _checks import CONF, ROOT, tiny_trainer
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import MagnitudeImportance, MaskSet, PruningCallback, Unstructured, _files, prunable_parameters
from lightning_prune._files import ArtifactWriteError, file_digest, verify_sidecar
from lightning_prune.app.config import ConfigError
from lightning_prune.callbacks.sensitivity import SensitivityCallback
from lightning_prune.deploy.profile import count_macs
from lightning_prune.sensitivity import (
    DEFAULT_RATIOS,
    LayerSensitivity,
    SensitivityPoint,
    SensitivityTable,
    allocate,
    analyze,
    check_ratios,
    sensitivity_figure,
    write_report,
)
from lightning_prune.sensitivity.report import ALLOCATED_LABEL
from lightning_prune.structures.channel import ChannelStructure


# ---------------------------------------------------------------------------------------------- fixtures
def sensitive_net() -> nn.Sequential:
    """``0`` is robust: 90% of its weights are tiny. ``2`` is sensitive: every weight is large."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        w = torch.randn(64, 16, generator=g) * 1e-4
        strong = torch.rand(64, 16, generator=g) < 0.1
        w[strong] = torch.randn(int(strong.sum()), generator=g).sign() * (
            1 + torch.rand(int(strong.sum()), generator=g)
        )
        net[0].weight.copy_(w)
        net[2].weight.copy_(torch.randn(8, 64, generator=g).sign() * (0.5 + 0.5 * torch.rand(8, 64, generator=g)))
    return net


def own_labels(net: nn.Module, n: int = 512, batch: int = 64, shape=(16,)) -> list:
    """Batches labelled with the model's own predictions: the baseline accuracy is exactly 1."""
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net.eval()(x).argmax(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 24),
        nn.ReLU(),
        nn.Linear(24, 4),
    )


def trained_bn_stats(net: nn.Module) -> None:
    """Give the BatchNorm layers non-trivial running statistics."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 1, 8, 8))


def snapshot(module: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in module.state_dict().items()}


def table_of(*layers: LayerSensitivity, ratios=(0.5, 0.8)) -> SensitivityTable:
    return SensitivityTable("accuracy", 0.9, "weights", "Unstructured()", "MagnitudeImportance()", ratios, layers)


def layer(name: str, size: int, *points: tuple[float, float]) -> LayerSensitivity:
    return LayerSensitivity(name, size, 0, tuple(SensitivityPoint(r, r, 0.9 - d, d) for r, d in points))


# ---------------------------------------------------------------------------------------------- analyze
def test_analysis_finds_the_sensitive_layer_and_the_allocation_spares_it():
    net = sensitive_net()
    data = own_labels(net)
    table = analyze(net, data, ratios=[0.3, 0.6, 0.8, 0.9])
    assert table.baseline == 1.0 and table.metric == "accuracy" and table.unit == "weights"
    assert table.names == ["0.weight", "2.weight"]
    robust, sensitive = table.layers
    assert (robust.size, sensitive.size) == (1024, 512)
    assert max(p.drop for p in robust.points) < 0.02  # only tiny weights go up to 90%
    assert sensitive.points[0].drop > 0.05  # 30% of large weights already hurt
    assert table.evaluations == 1 + 2 * 4
    allocation = allocate(table, target_sparsity=0.6)
    assert set(allocation) == {"0.weight", "2.weight"}
    assert allocation["2.weight"] < allocation["0.weight"]
    assert table.predict(allocation).sparsity == pytest.approx(0.6, abs=1e-12)
    # Uniform pruning at the same global sparsity is predicted to lose more.
    assert table.predict({"0.weight": 0.6, "2.weight": 0.6}).drop > table.predict(allocation).drop


def test_analysis_restores_the_model_bitwise_and_each_module_mode():
    net = conv_net()
    trained_bn_stats(net)
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = -0.0  # a signed zero must come back as -0.0
    data = own_labels(net, 64, 32, (1, 8, 8))
    net.train()
    net[4].eval()  # one module in another mode than its parent
    before = snapshot(net)
    modes = [m.training for m in net.modules()]
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = copy.deepcopy(net).eval()(x)  # taken before the analysis, from a copy that it never touches
    for structure in ("unstructured", ChannelStructure(round_to=2, max_layer_sparsity=0.75)):
        table = analyze(net, data, ratios=[0.25, 0.5, 0.9], structure=structure)
        assert table.layers
        assert snapshot(net) == before
        assert [m.training for m in net.modules()] == modes
    with torch.no_grad():  # no hook, mask or parametrization left behind that the state dict would not show
        assert torch.equal(net.eval()(x), expected)


def test_analysis_restores_the_layer_when_an_evaluation_raises():
    net = sensitive_net()
    before = snapshot(net)
    calls = []

    def evaluate(model: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluation failed")
        return 0.0

    with pytest.raises(RuntimeError, match="evaluation failed"):
        analyze(net, evaluate=evaluate, example_inputs=torch.randn(2, 16), ratios=[0.5, 0.9])
    assert snapshot(net) == before


def test_each_ratio_prunes_the_dense_layer_exactly_and_sizes_and_macs_are_counted():
    net = conv_net()
    data = own_labels(net, 64, 32, (1, 8, 8))
    table = analyze(net, data, ratios=[0.0, 0.1, 0.5])
    assert table.names == ["0.weight", "3.weight", "8.weight", "10.weight"]
    conv1 = table.layer("0.weight")
    assert conv1.size == 72 and conv1.macs == 72 * 64  # 8x1x3x3 weights at 8x8 positions
    assert [p.sparsity for p in conv1.points] == [0.0, round(0.1 * 72) / 72, 0.5]
    assert conv1.points[0].drop == 0.0  # ratio 0 is the baseline itself, not evaluated again
    assert table.evaluations == 1 + 4 * 2
    assert table.dense_macs == count_macs(net, torch.zeros(1, 1, 8, 8)).dense_macs
    assert sum(layer.macs for layer in table.layers) == table.dense_macs  # every counted weight is prunable


def test_channel_analysis_respects_max_layer_sparsity_and_round_to():
    net = conv_net()
    data = own_labels(net, 64, 32, (1, 8, 8))
    structure = ChannelStructure(round_to=4, max_layer_sparsity=0.6)
    table = analyze(net, data, ratios=[0.3, 0.5, 0.9], structure=structure, importance="l2")
    assert table.unit == "channels" and table.names == ["0", "3", "8"]
    assert [layer.size for layer in table.layers] == [8, 16, 24]
    for entry in table.layers:
        assert [ratio for ratio, _ in entry.skipped] == [0.9]
        assert "max_layer_sparsity" in entry.skipped[0][1]
        for point in entry.points:  # a multiple of 4 channels is kept
            assert round((1 - point.sparsity) * entry.size) % 4 == 0
    # Pruning group "3" saves its rows of conv 3 and its columns of linear 8.
    assert table.layer("3").macs == 16 * 8 * 9 * 64 + 64 * 24
    assert "Cannot prune 90%" in table.layer("0").skipped[0][1]


def test_a_loss_works_as_the_metric_when_negated():
    net = sensitive_net()
    x, y = own_labels(net, 256, 256)[0]

    def negative_loss(model: nn.Module) -> float:
        return -float(nn.functional.cross_entropy(model(x), y))

    table = analyze(net, evaluate=negative_loss, example_inputs=x[:2], ratios=[0.5, 0.9])
    assert table.metric == "negative_loss"
    assert table.baseline < 0
    assert all(p.drop > 0 for p in table.layer("2.weight").points)  # the loss rises: a positive drop


def test_analysis_works_with_block_and_nm_patterns():
    from lightning_prune.structures.block import BlockStructure
    from lightning_prune.structures.nm import NMStructure

    net = sensitive_net()
    data = own_labels(net)
    nm = analyze(net, data, ratios=[0.25, 0.5, 0.75], structure=NMStructure(2, 4))
    assert [p.ratio for p in nm.layer("0.weight").points] == [0.25, 0.5]
    assert [r for r, _ in nm.layer("0.weight").skipped] == [0.75]  # 2:4 prunes at most half
    blocks = analyze(net, data, ratios=[0.5], structure=BlockStructure((4, 4)))
    assert blocks.layer("2.weight").points[0].sparsity == 0.5


def test_analysis_scores_with_collected_gradient_statistics():
    from lightning_prune import TaylorImportance

    net = sensitive_net()
    data = own_labels(net, 128)
    masks = MaskSet(prunable_parameters(net))
    taylor = TaylorImportance(batches=2)
    taylor.start(net, masks)
    for x, y in data[:2]:
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        taylor.observe(masks)
    taylor.stop()
    before = snapshot(net)
    table = analyze(net, data, ratios=[0.5, 0.9], importance=taylor)
    assert table.importance == repr(taylor) and snapshot(net) == before
    assert allocate(table, target_sparsity=0.5)["2.weight"] < 0.5
    with pytest.raises(ValueError, match="no gradient statistics"):
        analyze(net, data, ratios=[0.5], importance=TaylorImportance())


def test_check_ratios():
    assert check_ratios([0.9, 0.1, 0.5, 0.1]) == (0.1, 0.5, 0.9)
    assert check_ratios(DEFAULT_RATIOS) == DEFAULT_RATIOS
    for bad in ([], [1.0], [-0.1], "0.5", [True], [0.5, None], 0.5):
        with pytest.raises(ValueError, match=r"`ratios` must be a non-empty list of numbers in \[0, 1\)"):
            check_ratios(bad)


def test_analyze_errors():
    net = sensitive_net()
    data = own_labels(net, 64)
    with pytest.raises(ValueError, match="analyze needs validation data: pass `data`"):
        analyze(net)
    with pytest.raises(ValueError, match=r"`ratios` must be a non-empty list.*got \[1.5\]"):
        analyze(net, data, ratios=[1.5])
    with pytest.raises(TypeError, match="`data` must be an iterable of \\(inputs, labels\\) batches"):
        analyze(net, torch.zeros(4, 16))
    with pytest.raises(ValueError, match="`data` must yield \\(inputs, labels\\) batches, got a Tensor"):
        analyze(net, [torch.zeros(4, 16)], example_inputs=torch.zeros(2, 16))
    with pytest.raises(TypeError, match="but a generator can be read only once: pass a DataLoader or a list"):
        analyze(net, (batch for batch in data))
    with pytest.raises(ValueError, match="`data` yielded no batch to take `example_inputs` from"):
        analyze(net, [])
    with pytest.raises(ValueError, match="analyze needs `example_inputs`"):
        analyze(net, evaluate=lambda m: 1.0)
    with pytest.raises(ValueError, match="The metric is nan for the unpruned model; it must be a finite number"):
        analyze(net, evaluate=lambda m: math.nan, example_inputs=torch.zeros(2, 16))
    with pytest.raises(TypeError, match=r"The metric must be a number .* got 'high' for the unpruned model"):
        analyze(net, evaluate=lambda m: "high", example_inputs=torch.zeros(2, 16))
    with pytest.raises(TypeError, match="`evaluate` must be a callable"):
        analyze(net, evaluate=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot run on the `example_inputs` to count MACs"):
        analyze(net, data, example_inputs=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="Unknown structure 'rows'"):
        analyze(net, data, structure="rows")
    with pytest.raises(ValueError, match="`ignore` pattern 'head' matches no module"):
        analyze(net, data, ignore=["head"])

    class Odd(MaskSet):
        pass

    class OddStructure(Unstructured):
        def bind(self, module, ignore=(), example_inputs=None):
            return Odd(prunable_parameters(module, ignore))

    with pytest.raises(TypeError, match="the structure returned a Odd, which it cannot split into layers"):
        analyze(net, data, structure=OddStructure())


# ---------------------------------------------------------------------------------------------- allocate
def test_interpolation_meets_the_target_exactly():
    a = layer("a", 100, (0.5, 0.1), (0.8, 0.3))
    b = layer("b", 300, (0.5, 0.0), (0.8, 0.2))  # no drop up to 0.5: taken at once
    table = table_of(a, b)
    # Between grid points: S(tau) = (100 * 5 tau + 300 * (0.5 + 1.5 tau)) / 400 = 0.6 at tau = 90 / 950.
    allocation = allocate(table, target_sparsity=0.6)
    tau = 90 / 950
    assert allocation["a"] == pytest.approx(5 * tau, abs=1e-12)
    assert allocation["b"] == pytest.approx(0.5 + 1.5 * tau, abs=1e-12)
    prediction = table.predict(allocation)
    assert prediction.sparsity == pytest.approx(0.6, abs=1e-12)
    assert prediction.drop == pytest.approx(tau, abs=1e-12)
    assert prediction.layer_drop["a"] == pytest.approx(prediction.layer_drop["b"], abs=1e-12)
    # Within b's free stretch: only b prunes, exactly as far as needed.
    assert allocate(table, target_sparsity=0.2) == pytest.approx({"a": 0.0, "b": 0.2 * 400 / 300}, abs=1e-12)
    assert allocate(table, target_sparsity=0.0) == {"a": 0.0, "b": 0.0}
    # At the grid's end: everything at its largest ratio.
    assert allocate(table, target_sparsity=0.8) == pytest.approx({"a": 0.8, "b": 0.8}, abs=1e-12)


def test_layers_reaching_the_threshold_together_share_the_remainder():
    a = layer("a", 100, (0.4, 0.1), (0.8, 0.1), (0.9, 0.5))  # flat from 0.4 to 0.8 at a drop of 0.1
    b = layer("b", 100, (0.4, 0.1), (0.8, 0.1), (0.9, 0.5))
    allocation = allocate(table_of(a, b, ratios=(0.4, 0.8, 0.9)), target_sparsity=0.6)
    assert allocation == pytest.approx({"a": 0.6, "b": 0.6}, abs=1e-12)


def test_a_noisy_curve_never_looks_safer_at_a_higher_ratio():
    noisy = layer("a", 100, (0.5, 0.2), (0.8, 0.05), (0.9, 0.3))  # the dip at 0.8 is noise
    assert noisy.envelope() == ([0.0, 0.5, 0.8, 0.9], [0.0, 0.2, 0.2, 0.3])
    steady = layer("b", 100, (0.5, 0.06), (0.8, 0.5), (0.9, 0.6))
    table = table_of(noisy, steady, ratios=(0.5, 0.8, 0.9))
    allocation = allocate(table, target_sparsity=0.3, max_drop=0.06)
    assert allocation["a"] < 0.5  # not 0.8, where the noisy measurement happens to look harmless
    assert table.predict(allocation).drop <= 0.06
    with pytest.raises(ValueError, match=r"within `max_drop`=0.06: at most 0.3250 of the weights can be pruned"):
        allocate(table, target_sparsity=0.5, max_drop=0.06)


def test_max_drop_bounds_every_layer_and_unreachable_targets_say_how_far_they_get():
    a = layer("a", 100, (0.5, 0.01), (0.8, 0.1))
    b = layer("b", 100, (0.5, 0.02), (0.8, 0.3))
    table = table_of(a, b)
    allocation = allocate(table, target_sparsity=0.5, max_drop=0.05)
    assert table.predict(allocation).drop <= 0.05
    for name, value in allocation.items():
        measured = [p.drop for p in table.layer(name).points if p.sparsity <= value]
        assert max(measured, default=0.0) <= 0.05
    message = (
        r"Cannot meet `target_sparsity`=0.7 with every layer's drop within `max_drop`=0.02: at most 0.5167 of the "
        r"weights can be pruned. Meeting it needs a drop of up to 0.1133 in a layer: raise `max_drop`"
    )
    with pytest.raises(ValueError, match=message):
        allocate(table, target_sparsity=0.7, max_drop=0.02)
    with pytest.raises(ValueError, match=r"Cannot meet `target_sparsity`=0.9: at most 0.8000 .* Add larger `ratios`"):
        allocate(table, target_sparsity=0.9)
    with pytest.raises(ValueError, match=r"at most 0.5167 of the weights can be pruned within `max_drop`=0.02"):
        allocate(table, target_sparsity=0.9, max_drop=0.02)


def test_macs_budget_is_met_and_predicts_the_counted_macs():
    net = sensitive_net()
    table = analyze(net, own_labels(net), ratios=[0.3, 0.6, 0.8, 0.9, 0.95])
    allocation = allocate(table, macs_budget=0.25)
    prediction = table.predict(allocation)
    assert prediction.macs_fraction == pytest.approx(0.25, rel=1e-9)
    assert prediction.macs_fraction <= 0.25 + 1e-12
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), allocation, scope="layer")
    counted = count_macs(net, torch.zeros(1, 16))
    assert counted.dense_macs == table.dense_macs
    assert counted.macs == pytest.approx(prediction.macs, abs=2)  # rounding to whole weights per layer
    assert masks.sparsity() == pytest.approx(prediction.sparsity, abs=1e-3)


def test_channel_macs_count_the_overlap_of_two_groups():
    net = conv_net()
    trained_bn_stats(net)
    data = own_labels(net, 64, 32, (1, 8, 8))
    structure = ChannelStructure(max_layer_sparsity=0.9)
    table = analyze(net, data, ratios=[0.25, 0.5, 0.75, 0.875], structure=structure)
    allocation = allocate(table, macs_budget=0.4)
    assert table.predict(allocation).macs_fraction == pytest.approx(0.4, rel=1e-9)
    masks = structure.bind(net, example_inputs=torch.zeros(2, 1, 8, 8))
    structure.prune_(masks, MagnitudeImportance(), allocation, scope="layer")
    # Whole channels are kept, so compare the model with the counted MACs of what was reached.
    reached = masks.group_sparsity()
    predicted = sum(term.after(reached) for term in table.mac_terms)
    assert count_macs(net, torch.zeros(1, 1, 8, 8)).macs == pytest.approx(predicted, rel=1e-9)
    assert predicted / table.dense_macs == pytest.approx(0.4, abs=0.05)


def test_allocation_plugs_into_per_layer_targets():
    net = sensitive_net()
    table = analyze(net, own_labels(net), ratios=[0.5, 0.9])
    allocation = allocate(table, target_sparsity=0.7)
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), allocation, scope="layer")
    assert masks.layer_sparsity() == pytest.approx(allocation, abs=1 / 512)
    assert masks.sparsity() == pytest.approx(0.7, abs=1 / 1536)


def test_allocate_and_predict_errors():
    table = table_of(layer("a", 100, (0.5, 0.1)))
    with pytest.raises(ValueError, match=r"Give exactly one of `target_sparsity`.*got target_sparsity=None and"):
        allocate(table)
    with pytest.raises(ValueError, match=r"Give exactly one of .*target_sparsity=0.5 and macs_budget=0.5"):
        allocate(table, target_sparsity=0.5, macs_budget=0.5)
    for bad in (1.0, -0.1, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match=r"`target_sparsity` must be a number in \[0, 1\)"):
            allocate(table, target_sparsity=bad)  # type: ignore[arg-type]
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match=r"`macs_budget` must be a number in \(0, 1\]"):
            allocate(table, macs_budget=bad)
    with pytest.raises(ValueError, match=r"`max_drop` must be None or a number >= 0 .* got -0.01"):
        allocate(table, target_sparsity=0.5, max_drop=-0.01)
    with pytest.raises(ValueError, match="The sensitivity table has no layers"):
        allocate(table_of(), target_sparsity=0.5)
    with pytest.raises(TypeError, match="`table` must be a SensitivityTable \\(from analyze\\), got dict"):
        allocate({}, target_sparsity=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="counts no MACs, so `macs_budget` cannot be met"):
        allocate(table, macs_budget=0.5)
    with pytest.raises(ValueError, match=r"`sparsities` names layers the table does not have: \['b'\]"):
        table.predict({"b": 0.1})
    with pytest.raises(ValueError, match=r"`sparsities\['a'\]` must be a number in \[0, 0.5\]"):
        table.predict({"a": 0.9})
    with pytest.raises(KeyError, match="No layer 'b' in the sensitivity table"):
        table.layer("b")


# ---------------------------------------------------------------------------------------------- files
def test_report_files_exist_and_parse(tmp_path):
    net = conv_net()
    table = analyze(net, own_labels(net, 64, 32, (1, 8, 8)), ratios=[0.5, 0.9, 0.95], structure="channel")
    allocation = allocate(table, target_sparsity=0.3)
    paths = write_report(table, tmp_path / "out", allocation, target_sparsity=0.3, max_drop=None)
    assert set(paths) == {"csv", "markdown", "plot", "allocation"}
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3 and rows[0]["layer"] == "0"
    skipped = [r for r in rows if r["ratio"] == "0.95"]
    assert all(r["metric"] == "" and "max_layer_sparsity" in r["note"] for r in skipped)
    measured = [r for r in rows if r["metric"]]
    assert all(float(r["drop"]) == pytest.approx(float(r["baseline"]) - float(r["metric"])) for r in measured)
    markdown = paths["markdown"].read_text()
    assert "| layer" in markdown and "allocated" in markdown and "sensitivity.png" in markdown
    for name in table.names:
        assert f"| {name} " in markdown
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = yaml.safe_load(paths["allocation"].read_text())
    assert record["sparsity"] == pytest.approx(allocation)
    assert record["target_sparsity"] == 0.3 and record["unit"] == "channels"
    assert record["predicted"]["sparsity"] == pytest.approx(0.3)
    assert not write_report(table, tmp_path / "bare", plot=False).keys() & {"plot", "allocation"}


def test_plot_legend_explains_the_allocation_crosses():
    table = table_of(layer("a", 100, (0.5, 0.01), (0.8, 0.05)), layer("b", 100, (0.5, 0.1), (0.8, 0.3)))
    ax = sensitivity_figure(table, {"a": 0.8, "b": 0.5}).axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b", "baseline (unpruned)", ALLOCATED_LABEL]
    cross = legend.legend_handles[-1]
    assert (cross.get_marker(), cross.get_linestyle()) == ("x", "None")
    # The crosses drawn: one per layer, at its allocated sparsity on its curve.
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert [(list(c.get_xdata()), list(c.get_ydata())) for c in crosses] == [
        ([0.8], [pytest.approx(85.0)]),
        ([0.5], [pytest.approx(80.0)]),
    ]
    # Without an allocation there are no crosses, and the legend does not mention them.
    legend = sensitivity_figure(table).axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b", "baseline (unpruned)"]


def test_tables_are_written_with_a_digest_beside_them(tmp_path):
    table = table_of(layer("a", 100, (0.5, 0.01), (0.8, 0.05)))
    paths = write_report(table, tmp_path, {"a": 0.5}, target_sparsity=0.5, plot=False)
    for kind, name in (("csv", "sensitivity.csv"), ("markdown", "sensitivity.md")):
        assert paths[kind] == tmp_path / name
        assert (tmp_path / f"{name}.sha256").read_text() == f"{file_digest(paths[kind])}  {name}\n"
        assert verify_sidecar(paths[kind]) is True
    paths["csv"].write_text("layer\n")
    with pytest.raises(ValueError, match=r"sensitivity\.csv' is damaged: its bytes do not match the digest"):
        verify_sidecar(paths["csv"])


def test_a_failing_write_leaves_the_previous_tables(tmp_path, monkeypatch):
    write_report(table_of(layer("a", 100, (0.5, 0.01), (0.8, 0.05))), tmp_path, plot=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["sensitivity.csv", "sensitivity.csv.sha256", "sensitivity.md", "sensitivity.md.sha256"]

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_files, "_os_write", disk_full)
    with pytest.raises(ArtifactWriteError, match=r"sensitivity\.csv'.*the disk is full"):
        write_report(table_of(layer("b", 100, (0.5, 0.2))), tmp_path, plot=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either


def test_plot_without_matplotlib_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"needs matplotlib: `pip install 'lightning-prune\[sweep\]'`"):
        write_report(table_of(layer("a", 100, (0.5, 0.1))), tmp_path)


# ---------------------------------------------------------------------------------------------- callback
class Task(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def task_data(n: int = 128) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return DataLoader(TensorDataset(x, (x[:, :4]).argmax(1)), batch_size=32)


class RecordingPruning(PruningCallback):
    """A PruningCallback with ``set_targets``: records the mapping, when, and what the model looked like."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[dict] = []
        self.module: pl.LightningModule | None = None

    def on_train_start(self, trainer, pl_module):
        self.module = pl_module
        super().on_train_start(trainer, pl_module)

    def set_targets(self, mapping):
        assert self.module is not None
        self.calls.append(
            {
                "mapping": dict(mapping),
                "epoch": self.module.trainer.current_epoch,
                "pruned": 0 if self.masks is None else self.masks.num_pruned(),
                "weights": snapshot(self.module),
            }
        )


def fit(tmp_path, callbacks, max_epochs=2, **kwargs):
    trainer = tiny_trainer(tmp_path, callbacks, max_epochs, **kwargs)
    trainer.fit(Task(), task_data(), task_data(64))
    return trainer


def test_callback_hands_the_allocation_to_the_pruning_callback_before_it_prunes(tmp_path):
    pruning = RecordingPruning(sparsity=0.8, schedule="one_shot", start_epoch=1)
    sensitivity = SensitivityCallback(ratios=[0.5, 0.9], output_dir=tmp_path / "report")
    fit(tmp_path, [sensitivity, pruning])
    [call] = pruning.calls
    assert call["epoch"] == 1 and call["pruned"] == 0  # at the start of epoch 1, before the first pruning
    assert call["mapping"] == sensitivity.targets
    assert set(call["mapping"]) == {"body.0.weight", "head.weight"}  # the names the pruning callback uses
    assert sensitivity.prediction is not None and sensitivity.prediction.sparsity == pytest.approx(0.8)
    table = sensitivity.table
    assert table is not None
    # The analysis ran on the model as dense training left it, and left it so.
    dense = Task()
    dense.load_state_dict(
        {
            k: torch.frombuffer(bytearray(v), dtype=p.dtype).reshape(p.shape)
            for (k, v), p in zip(call["weights"].items(), dense.state_dict().values())
        }
    )
    with torch.no_grad():
        correct = sum(int((dense(x).argmax(1) == y).sum()) for x, y in task_data(64))
    assert table.baseline == correct / 64
    assert (tmp_path / "report" / "allocation.yaml").is_file()
    # A run resumed with the targets in the checkpoint does not analyse again.
    resumed = SensitivityCallback(ratios=[0.5, 0.9])
    resumed.load_state_dict(sensitivity.state_dict())
    again = RecordingPruning(sparsity=0.8, schedule="one_shot", start_epoch=1)
    fit(tmp_path, [resumed, again])
    assert again.calls == [] and resumed.table is None and resumed.targets == sensitivity.targets


def test_callback_misuse_fails_clearly(tmp_path):
    pruning = RecordingPruning(sparsity=0.8, schedule="one_shot", start_epoch=1)
    with pytest.raises(
        MisconfigurationException, match=r"needs one PruningCallback among the Trainer's callbacks, found 2: pass"
    ):
        fit(tmp_path, [SensitivityCallback(), pruning, PruningCallback(sparsity=0.5)])
    with pytest.raises(
        MisconfigurationException, match="needs one PruningCallback among the Trainer's callbacks, found 0"
    ):
        fit(tmp_path, [SensitivityCallback()])
    with pytest.raises(MisconfigurationException, match="its `pruning` callback is not among the Trainer's callbacks"):
        fit(tmp_path, [SensitivityCallback(pruning=pruning)])
    with pytest.raises(MisconfigurationException, match="Give exactly one of `target_sparsity`"):
        SensitivityCallback(target_sparsity=0.5, macs_budget=0.5)
    with pytest.raises(MisconfigurationException, match=r"`ratios` must be a non-empty list"):
        SensitivityCallback(ratios=[])
    with pytest.raises(MisconfigurationException, match="`max_drop` must be None or a number >= 0"):
        SensitivityCallback(max_drop=-1)
    with pytest.raises(MisconfigurationException, match="`pruning` must be a PruningCallback, got str"):
        SensitivityCallback(pruning="magnitude")  # type: ignore[arg-type]


def test_callback_reports_an_unreachable_target_at_the_start_epoch(tmp_path):
    pruning = RecordingPruning(sparsity=0.95, schedule="one_shot", start_epoch=0)
    with pytest.raises(
        MisconfigurationException, match=r"SensitivityCallback at epoch 0: Cannot meet `target_sparsity`=0.95"
    ):
        fit(tmp_path, [SensitivityCallback(ratios=[0.5]), pruning], max_epochs=1)
    assert pruning.calls == []


class RankRecorder(RecordingPruning):
    def set_targets(self, mapping):
        rank = self.module.trainer.global_rank
        (Path(self.module.trainer.default_root_dir) / f"rank{rank}.json").write_text(json.dumps(dict(mapping)))


@pytest.mark.slow
def test_callback_gives_every_ddp_rank_rank_zeros_allocation(tmp_path):
    # Rank 0 analyses (on its shard of the validation loader: there is no datamodule) and broadcasts.
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        callbacks=[
            SensitivityCallback(ratios=[0.3, 0.6, 0.9]),
            RankRecorder(sparsity=0.7, schedule="one_shot", start_epoch=1),
        ],
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Task(), task_data(), task_data(64))
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first == second and set(first) == {"body.0.weight", "head.weight"}


# ---------------------------------------------------------------------------------------------- the job
FAST = [
    "model=mlp",
    "model.hidden=[32]",
    "sensitivity.epochs=1",
    "sensitivity.ratios=[0.5,0.9]",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
]


def compose_job(overrides: list[str]):
    from lightning_prune.app.sensitivity import run_sensitivity  # registers the schemas

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["+sensitivity=default", *overrides]), run_sensitivity


def test_job_trains_analyses_and_writes_the_report(tmp_path, capsys):
    cfg, run_sensitivity = compose_job([*FAST, f"output_dir='{tmp_path}'", "sensitivity.target_sparsity=0.8"])
    run = run_sensitivity(cfg)
    assert run.table.names == ["model.features.1.weight", "model.head.weight"]
    assert run.table.predict(run.allocation).sparsity == pytest.approx(0.8)
    for name in ("sensitivity.csv", "sensitivity.md", "sensitivity.png", "allocation.yaml"):
        assert (tmp_path / name).is_file()
    assert yaml.safe_load((tmp_path / "allocation.yaml").read_text())["sparsity"] == pytest.approx(run.allocation)
    out = capsys.readouterr().out
    assert "| model.head.weight" in out and "1 dense epoch" in out
    # The checkpoint Lightning wrote is analysed as it is, without training.
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    cfg, _ = compose_job(
        [
            *FAST,
            f"output_dir='{tmp_path / 'again'}'",
            f"sensitivity.checkpoint='{checkpoint}'",
            "sensitivity.plot=false",
        ]
    )
    again = run_sensitivity(cfg)
    assert again.table.baseline == run.table.baseline
    assert again.target_sparsity == cfg.pruning.sparsity
    assert f"loaded {checkpoint}" in capsys.readouterr().out


def test_job_rejects_bad_options(tmp_path):
    cases = [
        ("sensitivity.ratios=[0.5,1.0]", r"`ratios` must be a non-empty list"),
        ("+sensitivity.ratio=0.5", r"sensitivity.ratio: unknown key"),
        ("sensitivity.macs_budget=0", r"`macs_budget` must be a number in \(0, 1\]"),
        ("sensitivity.epochs=-1", r"sensitivity.epochs=-1: must be null or an integer >= 0"),
        (f"sensitivity.checkpoint='{tmp_path / 'missing.ckpt'}'", r"sensitivity.checkpoint=.*: no such file"),
    ]
    for override, message in cases:
        cfg, run_sensitivity = compose_job([*FAST, f"output_dir='{tmp_path}'", override])
        with pytest.raises(ConfigError, match=message):
            run_sensitivity(cfg)
    cfg, run_sensitivity = compose_job([*FAST, "pruning=none", f"output_dir='{tmp_path}'", "sensitivity.epochs=0"])
    with pytest.raises(ConfigError, match=r"set it \(or sensitivity.macs_budget\) when pruning=none"):
        run_sensitivity(cfg)


@pytest.mark.slow
def test_script_runs_under_hydra(tmp_path):
    import subprocess

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "sensitivity.py"),
            *FAST,
            "pruning=channel",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = yaml.safe_load((run_dir / "allocation.yaml").read_text())
    assert record["unit"] == "channels" and record["target_sparsity"] == 0.5
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "sensitivity.py"),
            "sensitivity.max_drop=-1",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and "`max_drop` must be None or a number >= 0" in bad.stderr
