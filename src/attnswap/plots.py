"""Matplotlib figures for benchmarks and reports, drawn without pyplot so no global backend is touched.

``Figure`` objects are rendered by the Agg canvas directly: importing this module never opens a window
and never changes the backend of a notebook that imports attnswap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#7f7f7f", "#bcbd22"]


@dataclass
class Series:
    """One line: ``ys[i]`` at ``xs[i]``; None values (OOM, missing) are left out. Same ``group``, same colour."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    group: str | None = None
    dashed: bool = False


@dataclass
class Panel:
    """One set of axes of a figure."""

    title: str
    series: list[Series]
    xlabel: str = ""
    ylabel: str = ""
    logx: bool = False
    logy: bool = False


def line_plot(panels: "Panel | list[Panel]", path: str | Path, title: str = "", ncols: int = 2) -> Path:
    """Lines with markers, one set of axes per panel; log axes use base 2 on x (sequence lengths) and 10 on y."""
    panels = [panels] if isinstance(panels, Panel) else panels
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(6.4 * ncols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    groups: dict[str, str] = {}
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for s in panel.series:
            points = [(x, y) for x, y in zip(s.xs, s.ys) if y is not None and np.isfinite(y)]
            if not points:
                continue
            color = groups.setdefault(s.group or s.label, _PALETTE[len(groups) % len(_PALETTE)])
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=4, linestyle="--" if s.dashed else "-", color=color, label=s.label)
        xs_all = sorted({float(x) for s in panel.series for x in s.xs})
        if panel.logx:
            ax.set_xscale("log", base=2)
            if 0 < len(xs_all) <= 16:  # label the measured lengths themselves, not powers of two around them
                ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all], rotation=45 if len(xs_all) > 8 else 0)
                ax.xaxis.set_minor_locator(NullLocator())
        elif all(x.is_integer() for x in xs_all):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers, steps: no 0.25 ticks
        if panel.logy:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def frontier_plot(points: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Perplexity ratio (swapped / teacher) against attention cost, one line per ``group`` (a variant's routing
    budgets, a window sweep) or a lone marker per label; dotted at 1, the teacher. ``points`` are frontier
    records (``attn_cost``, ``ppl``, ``teacher_ppl``, ``label``, optional ``group``). Where a group has several runs at
    one cost (recipes tried one after another), only its best is drawn: the line is what the group can reach."""
    best: dict[str, dict[float, float]] = {}
    for p in points:
        costs_of_group = best.setdefault(p.get("group") or p["label"], {})
        ratio = p["ppl"] / p["teacher_ppl"]
        costs_of_group[p["attn_cost"]] = min(ratio, costs_of_group.get(p["attn_cost"], ratio))
    groups = {name: sorted(by_cost.items()) for name, by_cost in best.items()}
    series = [Series(name, [x for x, _ in xy], [y for _, y in xy]) for name, xy in groups.items()]
    costs = [x for xy in groups.values() for x, _ in xy]
    ratios = [y for xy in groups.values() for _, y in xy]
    series.append(Series("teacher", [min(costs + [0.0]), max(costs + [1.0])], [1.0, 1.0], dashed=True))
    panel = Panel("quality against cost", series, xlabel="attention cost (fraction of full attention)",
                  ylabel="perplexity / teacher's", logy=max(ratios) / min(ratios + [1.0]) > 5)
    return line_plot(panel, path, title)


def bar_plot(labels: Sequence[str], values: Sequence[float], path: str | Path, ylabel: str, title: str) -> Path:
    """Vertical bars with their values written on top."""
    fig = Figure(figsize=(max(5.0, 0.9 * len(labels) + 2), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(labels)), values, color=[_PALETTE[i % len(_PALETTE)] for i in range(len(labels))])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def heatmaps(maps: Sequence[tuple[str, np.ndarray]], path: str | Path, title: str = "",
             tokens: Sequence[str] | None = None) -> Path:
    """(T, S) matrices side by side on one colour scale per matrix; token strings label the axes if given."""
    fig = Figure(figsize=(4.6 * len(maps), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, matrix) in enumerate(maps):
        ax = fig.add_subplot(1, len(maps), i + 1)
        image = ax.imshow(np.asarray(matrix, dtype=float), cmap="viridis", interpolation="nearest", aspect="auto")
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        if tokens is not None and len(tokens) == matrix.shape[-1] <= 40:
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(matrix.shape[0]), tokens[-matrix.shape[0]:], fontsize=6)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def marked_grid(values: np.ndarray, marked: np.ndarray, row_labels: Sequence[str], column_labels: Sequence[str],
                path: str | Path, title: str = "", colour_label: str = "") -> Path:
    """A (rows, columns) table of values in [0, 1] as coloured cells, with an × on each ``marked`` cell.

    Sized for tables of many rows (layer·head): at most 40 row labels are written, evenly spaced.
    """
    n_rows, n_columns = values.shape
    fig = Figure(figsize=(2.5 + 0.55 * n_columns, min(24.0, 2.0 + 0.16 * n_rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label=colour_label)
    rows, columns = np.nonzero(marked)
    ax.scatter(columns, rows, marker="x", color="#d62728", s=max(4.0, min(30.0, 3000.0 / n_rows)), linewidths=1)
    every = -(-n_rows // 40)
    ax.set_yticks(range(0, n_rows, every), list(row_labels)[::every], fontsize=7)
    ax.set_xticks(range(n_columns), column_labels, rotation=45, ha="right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=11)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    """Under a temporary name, then renamed into place: a reader never finds half a figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(temporary, dpi=110, format=path.suffix.lstrip(".") or "png")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def score_grids(grids: Sequence[tuple[str, np.ndarray]], row_labels: Sequence[str], column_labels: Sequence[str],
                path: str | Path, title: str = "", xlabel: str = "", ylabel: str = "") -> Path:
    """(rows, columns) tables of scores in [0, 1] side by side on one colour scale, each cell's value written in."""
    fig = Figure(figsize=(1.2 + (1.0 + 0.6 * len(column_labels)) * len(grids), 1.6 + 0.45 * len(row_labels)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(grids), i + 1) for i in range(len(grids))]
    for ax, (name, grid) in zip(axes, grids):
        image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        for (row, column), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(column_labels)), column_labels, fontsize=8)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(ylabel)
    fig.colorbar(image, ax=axes, shrink=0.8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
