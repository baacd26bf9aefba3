"""Writing a sensitivity table: CSV, markdown, a plot of the metric against each layer's sparsity, and the
allocation as YAML.

:func:`write_report` writes all four into a directory (``sensitivity.csv``, ``sensitivity.md``,
``sensitivity.png``, ``allocation.yaml``); the plot needs matplotlib (``pip install 'lightning-prune[sweep]'``).
Every file is written atomically; the two tables get a ``<name>.sha256`` file beside them holding the SHA-256 of
their bytes, as exports have.

Example:
    >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint, SensitivityTable
    >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),))
    >>> table = SensitivityTable("accuracy", 0.9, "weights", "Unstructured()", "MagnitudeImportance()", (0.5,),
    ...                          (layer,))
    >>> print(sensitivity_markdown(table).splitlines()[-1])
    | fc.weight | 10   | 40   | +10.00 |
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_prune._files import atomic_write, atomic_write_text, write_sidecar
from lightning_prune._helpers import markdown_table
from lightning_prune.sensitivity.table import SensitivityTable

__all__ = [
    "ALLOCATED_LABEL",
    "ALLOCATION_FILE",
    "CSV_COLUMNS",
    "CSV_FILE",
    "MARKDOWN_FILE",
    "PLOT_FILE",
    "allocation_record",
    "plot_sensitivity",
    "sensitivity_figure",
    "sensitivity_markdown",
    "table_rows",
    "write_allocation",
    "write_csv",
    "write_report",
]

CSV_FILE = "sensitivity.csv"
MARKDOWN_FILE = "sensitivity.md"
PLOT_FILE = "sensitivity.png"
ALLOCATION_FILE = "allocation.yaml"
#: One row per layer and ratio in ``sensitivity.csv``, in this order. ``metric`` and ``drop`` are empty and
#: ``note`` says why for a ratio the structure cannot reach on that layer.
CSV_COLUMNS = ("layer", "size", "macs", "ratio", "sparsity", "metric", "baseline", "drop", "note")


def table_rows(table: SensitivityTable) -> list[dict[str, Any]]:
    """The table as rows of :data:`CSV_COLUMNS`: per layer, one per ratio (measured or skipped), by ratio.

    Example:
        >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint
        >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),), ((0.9, "cap"),))
        >>> [(r["ratio"], r["drop"], r["note"]) for r in table_rows(SensitivityTable("accuracy", 0.9, "weights",
        ...                                                          "", "", (0.5, 0.9), (layer,)))]
        [(0.5, 0.1, ''), (0.9, None, 'cap')]
    """
    rows = []
    for layer in table.layers:
        entries: list[tuple[float, dict[str, Any]]] = []
        for p in layer.points:
            entries.append((p.ratio, {"sparsity": p.sparsity, "metric": p.metric, "drop": p.drop, "note": ""}))
        for ratio, reason in layer.skipped:
            entries.append((ratio, {"sparsity": None, "metric": None, "drop": None, "note": reason}))
        for ratio, values in sorted(entries, key=lambda e: e[0]):
            row = {"layer": layer.name, "size": layer.size, "macs": layer.macs, "ratio": ratio}
            row.update(values, baseline=table.baseline)
            rows.append({key: row[key] for key in CSV_COLUMNS})
    return rows


def write_csv(table: SensitivityTable, path: str | Path) -> Path:
    """Write :func:`table_rows` to ``path`` as CSV (empty cells for missing values), atomically, with its digest
    in ``<path>.sha256``; returns the path.

    Example:
        >>> import tempfile
        >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint
        >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),))
        >>> table = SensitivityTable("accuracy", 0.9, "weights", "", "", (0.5,), (layer,))
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     write_csv(table, Path(directory) / "s.csv").read_text().splitlines()[0]
        'layer,size,macs,ratio,sparsity,metric,baseline,drop,note'
    """
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in table_rows(table):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_write_text(path, text.getvalue())
    write_sidecar(path)
    return Path(path)


def _drop_text(table: SensitivityTable, drop: float) -> str:
    """Accuracy drops in percentage points, other metrics as they are."""
    return f"{100 * drop:+.2f}" if table.metric == "accuracy" else f"{drop:+.4g}"


def _value_text(table: SensitivityTable, value: float) -> str:
    return f"{100 * value:.2f}%" if table.metric == "accuracy" else f"{value:.6g}"


def sensitivity_markdown(table: SensitivityTable, allocation: Mapping[str, float] | None = None) -> str:
    """The table in markdown: a short header, then one row per layer with its drop at every ratio.

    Drops are ``baseline - metric`` (in percentage points for accuracy); ``-`` marks a ratio the structure
    cannot reach on that layer. With ``allocation`` (from :func:`~lightning_prune.sensitivity.allocate`), a
    last column gives each layer's allocated sparsity and the header what it predicts.

    Example:
        >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint
        >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),))
        >>> text = sensitivity_markdown(SensitivityTable("accuracy", 0.9, "weights", "", "", (0.5,), (layer,)),
        ...                             {"fc.weight": 0.25})
        >>> print(text.splitlines()[-1])
        | fc.weight | 10   | 40   | +10.00 | 0.2500    |
    """
    unit = "pp" if table.metric == "accuracy" else table.metric
    lines = [
        "# Sensitivity analysis",
        "",
        f"Each layer pruned alone ({table.structure}, {table.importance}), the others left dense: the drop of "
        f"{table.metric} (in {unit}) from the baseline {_value_text(table, table.baseline)} at each ratio; "
        f"`-`: a ratio the structure cannot reach on that layer. Size in {table.unit}; MACs per sample.",
        f"Cost: {table.evaluations} evaluations in {table.seconds:.1f} s.",
    ]
    if allocation is not None:
        prediction = table.predict(allocation)
        lines.append(
            f"Allocation: {prediction.sparsity:.4f} of the {table.unit} pruned, "
            f"{prediction.macs_fraction:.4f} of the dense {table.dense_macs:,} MACs left; every layer's drop at "
            f"its sparsity at most {_drop_text(table, prediction.drop)} {unit} (the sum over layers: "
            f"{_drop_text(table, prediction.total_drop)})."
        )
    header = ["layer", "size", "MACs", *[f"{r:g}" for r in table.ratios]]
    if allocation is not None:
        header.append("allocated")
    rows = []
    for layer in table.layers:
        by_ratio = {p.ratio: _drop_text(table, p.drop) for p in layer.points}
        row = [layer.name, str(layer.size), f"{layer.macs:,}", *[by_ratio.get(r, "-") for r in table.ratios]]
        if allocation is not None:
            row.append(f"{allocation.get(layer.name, 0.0):.4f}")
        rows.append(row)
    return "\n".join([*lines, "", markdown_table(header, rows)])


#: The legend entry of the crosses :func:`sensitivity_figure` draws at the allocated sparsities.
ALLOCATED_LABEL = "allocated sparsity (x on each layer's curve)"


def sensitivity_figure(table: SensitivityTable, allocation: Mapping[str, float] | None = None) -> Any:
    """The sensitivity plot as a matplotlib ``Figure``: the metric against the ratio each layer is pruned to, one
    line per layer (a dot per measured ratio, the first at ratio 0 the baseline), the baseline dashed; with
    ``allocation``, a cross on each line at the layer's allocated sparsity, explained in the legend
    (:data:`ALLOCATED_LABEL`).

    Needs matplotlib (the ``sweep`` extra). No global matplotlib state is touched (no pyplot).

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint
        >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),))
        >>> table = SensitivityTable("accuracy", 0.9, "weights", "", "", (0.5,), (layer,))
        >>> legend = sensitivity_figure(table, {"fc.weight": 0.25}).axes[0].get_legend()
        >>> [text.get_text() for text in legend.get_texts()]
        ['fc.weight', 'baseline (unpruned)', "allocated sparsity (x on each layer's curve)"]
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as err:
        raise ImportError(
            "The sensitivity plot needs matplotlib: `pip install 'lightning-prune[sweep]'` (or write the table "
            "without it: `write_report(..., plot=False)`)."
        ) from err

    scale = 100.0 if table.metric == "accuracy" else 1.0
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    crosses = False
    for layer in table.layers:
        points = sorted([(0.0, table.baseline)] + [(p.ratio, p.metric) for p in layer.points if p.ratio > 0])
        xs, ys = zip(*points)
        (line,) = ax.plot(xs, [scale * y for y in ys], marker="o", markersize=3, linewidth=1.2, label=layer.name)
        if allocation is not None and layer.name in allocation:
            x = allocation[layer.name]
            ax.plot([x], [scale * _metric_at(xs, ys, x)], marker="x", markersize=8, color=line.get_color())
            crosses = True
    ax.axhline(scale * table.baseline, color="black", linestyle="--", linewidth=1, label="baseline (unpruned)")
    handles, _ = ax.get_legend_handles_labels()
    if crosses:  # one entry for all the crosses, drawn in each layer's colour
        handles.append(Line2D([], [], color="black", marker="x", markersize=8, linestyle="none", label=ALLOCATED_LABEL))
    ax.set_title(f"Each layer pruned alone: {table.structure}, {table.importance}", fontsize=10)
    ax.set_xlabel(f"ratio the layer is pruned to (fraction of its {table.unit})")
    ax.set_ylabel(f"{table.metric} (%)" if scale == 100.0 else table.metric)
    ax.grid(True, alpha=0.3)
    many = len(table.layers) > 12
    ax.legend(
        handles=handles,
        loc="upper left" if many else "lower left",
        bbox_to_anchor=(1.01, 1.0) if many else None,
        fontsize="x-small" if many else "small",
        ncol=max(1, math.ceil(len(handles) / 30)),
    )
    return fig


def plot_sensitivity(table: SensitivityTable, path: str | Path, allocation: Mapping[str, float] | None = None) -> Path:
    """Write :func:`sensitivity_figure` to ``path`` as a PNG, atomically. Returns the path.

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> import tempfile
        >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint
        >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),))
        >>> table = SensitivityTable("accuracy", 0.9, "weights", "", "", (0.5,), (layer,))
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     plot_sensitivity(table, Path(directory) / "s.png", {"fc.weight": 0.25}).stat().st_size > 0
        True
    """
    image = io.BytesIO()
    sensitivity_figure(table, allocation).savefig(image, dpi=120, format="png")
    return atomic_write(path, image.getbuffer())


def _metric_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """The measured metric at ratio ``x``, linear between points."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return ys[-1]


def allocation_record(
    table: SensitivityTable,
    allocation: Mapping[str, float],
    *,
    target_sparsity: float | None = None,
    macs_budget: float | None = None,
    max_drop: float | None = None,
) -> dict[str, Any]:
    """What ``allocation.yaml`` holds: the mapping (``sparsity``), the constraints it was computed for, and
    :meth:`~lightning_prune.sensitivity.SensitivityTable.predict`'s figures.

    Example:
        >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint
        >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),))
        >>> record = allocation_record(SensitivityTable("accuracy", 0.9, "weights", "", "", (0.5,), (layer,)),
        ...                            {"fc.weight": 0.5}, target_sparsity=0.5)
        >>> record["sparsity"], record["predicted"]["drop"]
        ({'fc.weight': 0.5}, 0.1)
    """
    prediction = table.predict(allocation)
    return {
        "sparsity": {name: float(value) for name, value in allocation.items()},
        "target_sparsity": target_sparsity,
        "macs_budget": macs_budget,
        "max_drop": max_drop,
        "unit": table.unit,
        "metric": table.metric,
        "baseline": table.baseline,
        "predicted": {
            "sparsity": prediction.sparsity,
            "macs": prediction.macs,
            "macs_fraction": prediction.macs_fraction,
            "drop": prediction.drop,
            "total_drop": prediction.total_drop,
            "layer_drop": prediction.layer_drop,
        },
    }


_ALLOCATION_HEADER = """\
# Per-layer sparsities from a sensitivity analysis (lightning_prune.sensitivity.allocate): each layer pruned to
# the largest sparsity whose measured drop stays within one threshold shared by all layers, searched to meet
# the target. `sparsity` plugs into PruningCallback(sparsity=...); `predicted.drop` is that threshold (the
# largest single layer's drop), `predicted.total_drop` the sum of the layers' drops (layers interact: a guide).
"""


def write_allocation(
    path: str | Path,
    table: SensitivityTable,
    allocation: Mapping[str, float],
    *,
    target_sparsity: float | None = None,
    macs_budget: float | None = None,
    max_drop: float | None = None,
) -> Path:
    """Write :func:`allocation_record` to ``path`` as YAML; returns the path.

    Example:
        >>> import tempfile
        >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint
        >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),))
        >>> table = SensitivityTable("accuracy", 0.9, "weights", "", "", (0.5,), (layer,))
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     path = write_allocation(Path(directory) / "a.yaml", table, {"fc.weight": 0.25}, target_sparsity=0.25)
        ...     yaml.safe_load(path.read_text())["sparsity"]
        {'fc.weight': 0.25}
    """
    path = Path(path)
    record = allocation_record(
        table, allocation, target_sparsity=target_sparsity, macs_budget=macs_budget, max_drop=max_drop
    )
    atomic_write_text(path, _ALLOCATION_HEADER + yaml.safe_dump(record, sort_keys=False))
    return path


def write_report(
    table: SensitivityTable,
    directory: str | Path,
    allocation: Mapping[str, float] | None = None,
    *,
    target_sparsity: float | None = None,
    macs_budget: float | None = None,
    max_drop: float | None = None,
    plot: bool = True,
) -> dict[str, Path]:
    """Write ``sensitivity.csv``, ``sensitivity.md``, ``sensitivity.png`` (unless ``plot=False``) and, with an
    ``allocation``, ``allocation.yaml`` into ``directory`` (created if needed), each atomically; the two tables
    with their digests (``sensitivity.csv.sha256``, ``sensitivity.md.sha256``).

    Returns:
        The paths written, by kind: ``csv``, ``markdown``, ``plot``, ``allocation``.

    Example:
        >>> import tempfile
        >>> from lightning_prune.sensitivity.table import LayerSensitivity, SensitivityPoint
        >>> layer = LayerSensitivity("fc.weight", 10, 40, (SensitivityPoint(0.5, 0.5, 0.8, 0.1),))
        >>> table = SensitivityTable("accuracy", 0.9, "weights", "", "", (0.5,), (layer,))
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     sorted(write_report(table, directory, {"fc.weight": 0.25}, target_sparsity=0.25, plot=False))
        ['allocation', 'csv', 'markdown']
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(table, directory / CSV_FILE)}
    markdown = sensitivity_markdown(table, allocation)
    if plot:
        paths["plot"] = plot_sensitivity(table, directory / PLOT_FILE, allocation)
        markdown += f"\n\n![metric against sparsity, per layer]({PLOT_FILE})"
    paths["markdown"] = directory / MARKDOWN_FILE
    atomic_write_text(paths["markdown"], markdown + "\n")
    write_sidecar(paths["markdown"])
    if allocation is not None:
        paths["allocation"] = write_allocation(
            directory / ALLOCATION_FILE,
            table,
            allocation,
            target_sparsity=target_sparsity,
            macs_budget=macs_budget,
            max_drop=max_drop,
        )
    return paths
