"""Sensitivity analysis: how much each layer can be pruned on its own, and per-layer sparsities from it.

:func:`analyze` prunes every prunable layer alone at a grid of ratios, evaluates a metric on validation data
after each, and restores the layer bitwise; the result is a :class:`SensitivityTable` (the baseline metric,
each layer's size and MACs, and the metric and its drop per layer and ratio). :func:`allocate` turns a table
into per-layer sparsities that meet a global target sparsity or a MACs budget with one common bound on the
layers' drops. Both follow Han et al. (2015, "Learning both Weights and Connections for Efficient Neural
Networks"), Li et al. (2017, "Pruning Filters for Efficient ConvNets") and Distiller's sensitivity analysis
(Zmora et al., 2019). The mapping's keys are the exact layer names, so it plugs into
``PruningCallback(sparsity=...)`` and ``Structure.prune_(..., sparsity=..., scope="layer")``.
:meth:`SensitivityTable.predict` says what any mapping is predicted to give; :func:`write_report` writes
the table as CSV and markdown, a plot, and the allocation as YAML;
:class:`~lightning_prune.callbacks.SensitivityCallback` runs it all inside a ``Trainer`` when pruning starts.
``scripts/sensitivity.py`` is the Hydra job (:func:`lightning_prune.app.sensitivity.run_sensitivity`).

Modules: ``table`` (the result types), ``analysis``, ``allocation``, ``report`` (files).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    >>> data = [(x, net(x).argmax(1))]  # the labels the model predicts: baseline accuracy 1.0
    >>> table = analyze(net, data, ratios=[0.25, 0.5, 0.75])
    >>> table.names, table.baseline, table.evaluations
    (['0.weight', '2.weight'], 1.0, 7)
    >>> sparsities = allocate(table, target_sparsity=0.5)
    >>> round(table.predict(sparsities).sparsity, 12)
    0.5
"""

from lightning_prune.sensitivity.allocation import allocate, check_constraints
from lightning_prune.sensitivity.analysis import DEFAULT_RATIOS, analyze, check_ratios
from lightning_prune.sensitivity.report import (
    plot_sensitivity,
    sensitivity_figure,
    sensitivity_markdown,
    write_allocation,
    write_csv,
    write_report,
)
from lightning_prune.sensitivity.table import (
    LayerSensitivity,
    MacTerm,
    Prediction,
    SensitivityPoint,
    SensitivityTable,
)

__all__ = [
    "DEFAULT_RATIOS",
    "LayerSensitivity",
    "MacTerm",
    "Prediction",
    "SensitivityPoint",
    "SensitivityTable",
    "allocate",
    "analyze",
    "check_constraints",
    "check_ratios",
    "plot_sensitivity",
    "sensitivity_figure",
    "sensitivity_markdown",
    "write_allocation",
    "write_csv",
    "write_report",
]
