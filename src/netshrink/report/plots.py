"""Report figures: quality-vs-latency Pareto frontier, per-layer sensitivity, quality vs sparsity/bits, size and memory.

Every function returns a fresh `matplotlib.figure.Figure` (no pyplot global state), ready for `Report.figures`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def pareto_front(latency: Sequence[float], quality: Sequence[float]) -> list[int]:
    """Indices of the trials no other trial beats (lower-or-equal latency and higher-or-equal quality, one strictly).

    Trials with a missing (NaN or infinite) latency or quality are never on the frontier.
    """
    lat = np.asarray(latency, dtype=float)
    qual = np.asarray(quality, dtype=float)
    if lat.shape != qual.shape:
        raise ValueError("latency and quality need one value per trial")
    finite = np.isfinite(lat) & np.isfinite(qual)
    lat, qual = np.where(finite, lat, np.inf), np.where(finite, qual, -np.inf)
    front = []
    for i in np.flatnonzero(finite):
        dominated = np.any((lat <= lat[i]) & (qual >= qual[i]) & ((lat < lat[i]) | (qual > qual[i])))
        if not dominated:
            front.append(int(i))
    return sorted(front, key=lambda i: (lat[i], -qual[i]))


def pareto_figure(
    latency_ms: Sequence[float],
    quality: Sequence[float],
    labels: Sequence[str] | None = None,
    quality_name: str = "quality",
    quality_floor: float | None = None,
    title: str = "Quality vs latency",
) -> Figure:
    """Scatter of every trial, the Pareto frontier as a step line, and the budget's quality floor if given."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.scatter(latency_ms, quality, color="#8aa4c8", zorder=2, label="trial")
    front = pareto_front(latency_ms, quality)
    fx = [latency_ms[i] for i in front]
    fy = [quality[i] for i in front]
    ax.plot(fx, fy, drawstyle="steps-post", color="#c0392b", marker="o", zorder=3, label="Pareto frontier")
    if quality_floor is not None:
        ax.axhline(quality_floor, color="#555555", linestyle="--", linewidth=1, label="quality floor (budget)")
    if labels is not None:
        for x, y, text in zip(latency_ms, quality, labels):
            ax.annotate(str(text), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("latency (ms, lower is better)")
    ax.set_ylabel(f"{quality_name} (higher is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def sensitivity_curves_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    x_label: str = "sparsity",
    y_label: str = "quality",
    title: str = "Per-layer sensitivity",
) -> Figure:
    """One line per layer: quality when only that layer is compressed to each level on the x axis."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker=".", linewidth=1, label=name)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if 0 < len(curves) <= 12:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def sensitivity_heatmap_figure(
    layers: Sequence[str],
    levels: Sequence[float | int | str],
    values: Sequence[Sequence[float]],
    level_name: str = "sparsity",
    value_name: str = "quality drop",
    title: str = "Per-layer sensitivity",
) -> Figure:
    """Heatmap with one row per layer and one column per level; `values[i][j]` is layer i at level j."""
    grid = np.asarray(values, dtype=float)
    if grid.shape != (len(layers), len(levels)):
        raise ValueError(f"values must be {len(layers)} layers x {len(levels)} levels, got {grid.shape}")
    height = min(2.0 + 0.22 * len(layers), 14.0)
    fig = Figure(figsize=(6.4, height))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(levels)), [str(level) for level in levels])
    ax.set_yticks(range(len(layers)), list(layers), fontsize=7 if len(layers) > 20 else 8)
    ax.set_xlabel(level_name)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=value_name)
    fig.tight_layout()
    return fig


def quality_vs_level_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    x_label: str = "sparsity",
    quality_name: str = "quality",
    baseline: float | None = None,
    title: str | None = None,
) -> Figure:
    """Quality against sparsity or bits, one line per method, with the uncompressed baseline as a dashed line."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if baseline is not None:
        ax.axhline(baseline, color="#555555", linestyle="--", linewidth=1, label="baseline")
    ax.set_xlabel(x_label)
    ax.set_ylabel(quality_name)
    ax.set_title(title or f"{quality_name} vs {x_label}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def size_memory_figure(
    names: Sequence[str],
    size_mb: Sequence[float],
    memory_mb: Sequence[float] | None = None,
    title: str = "Size and memory",
) -> Figure:
    """Grouped bars per variant: weight size on disk and, if given, peak memory, with the values printed on top."""
    fig = Figure(figsize=(max(6.4, 0.9 * len(names) + 2), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(names))
    groups = [("size (MB)", size_mb, "#2b6cb0")]
    if memory_mb is not None:
        groups.append(("peak memory (MB)", memory_mb, "#dd8452"))
    width = 0.8 / len(groups)
    for k, (label, values, color) in enumerate(groups):
        bars = ax.bar(x + (k - (len(groups) - 1) / 2) * width, values, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(x, list(names), rotation=20, ha="right")
    ax.set_ylabel("MB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
