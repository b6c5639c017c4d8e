"""Layer-adaptive sparsity: measure each layer's quality-vs-sparsity curve alone, then spend a global budget
where it hurts least. LAMP (Lee et al. 2021) is the data-free layer-wise rule to compare against.

Nothing here assumes which layers tolerate pruning (e.g. 'early CNN layers'); the scan measures it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity.importance import lamp_scores
from netshrink.sparsity.layers import prunable_layers
from netshrink.sparsity.magnitude import check_sparsity, lowest_k_mask
from netshrink.sparsity.masks import make_permanent

DEFAULT_GRID = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass
class SensitivityCurves:
    """quality[layer][i] is the score with only `layer` pruned to sparsities[i] (magnitude, per layer)."""

    baseline: float
    sparsities: list[float]
    quality: dict[str, list[float]]
    sizes: dict[str, int]
    metric: str = "quality"
    higher_is_better: bool = True

    def drop(self, layer: str) -> list[float]:
        """Quality lost at each grid sparsity, made monotone (a curve cannot improve by pruning more)."""
        sign = 1.0 if self.higher_is_better else -1.0
        out, worst = [], 0.0
        for q in self.quality[layer]:
            worst = max(worst, sign * (self.baseline - q))
            out.append(worst)
        return out


@torch.no_grad()
def sensitivity_scan(model: nn.Module, evaluate: Callable[[nn.Module], float],
                     sparsities: Iterable[float] = DEFAULT_GRID, include: Iterable[str] | None = None,
                     exclude: Iterable[str] = (), metric: str = "quality", higher_is_better: bool = True
                     ) -> SensitivityCurves:
    """Prune one layer at a time by magnitude to each sparsity and score the model with `evaluate`."""
    grid = sorted(float(s) for s in sparsities)
    for s in grid:
        check_sparsity(s, "sensitivity_scan.sparsities")
    work = make_permanent(copy.deepcopy(model)).eval()
    layers = prunable_layers(work, include, exclude, where="sensitivity_scan.exclude")
    baseline = float(evaluate(work))
    quality: dict[str, list[float]] = {}
    for name, module in layers.items():
        original = module.weight.detach().clone()
        scores = original.abs()
        row = []
        for s in grid:
            module.weight.copy_(original * lowest_k_mask(scores, int(round(s * original.numel()))))
            row.append(float(evaluate(work)))
        module.weight.copy_(original)
        quality[name] = row
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    return SensitivityCurves(baseline, grid, quality, sizes, metric, higher_is_better)


def _sparsity_at_tolerance(curves: SensitivityCurves, layer: str, tolerance: float) -> float:
    """Largest sparsity (linear between grid points) whose measured drop stays within `tolerance`."""
    xs, ys = [0.0] + curves.sparsities, [0.0] + curves.drop(layer)
    best = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 <= tolerance:
            best = x1
            continue
        if y0 <= tolerance < y1:
            best = x0 + (x1 - x0) * (tolerance - y0) / (y1 - y0)
        break
    return best


def _drop_at(curves: SensitivityCurves, layer: str, s: torch.Tensor) -> torch.Tensor:
    """Measured drop of `layer` at sparsities `s`, linear between grid points (0 at sparsity 0)."""
    xs = torch.tensor([0.0] + curves.sparsities, dtype=torch.float64)
    ys = torch.tensor([0.0] + curves.drop(layer), dtype=torch.float64)
    idx = torch.clamp(torch.searchsorted(xs, s, right=True) - 1, 0, len(xs) - 2)
    x0, x1, y0, y1 = xs[idx], xs[idx + 1], ys[idx], ys[idx + 1]
    return y0 + (y1 - y0) * (s - x0) / (x1 - x0)


def allocate_from_sensitivity(curves: SensitivityCurves, target: float, method: str = "lagrangian",
                              iterations: int = 60) -> dict[str, float]:
    """Per-layer sparsities reaching `target` overall (parameter-weighted) from the measured curves.

    'lagrangian': minimise the sum of measured per-layer drops under the budget (each layer picks
    argmin drop_l(s) - lambda * n_l * s; bisection on lambda). 'equal_drop': every layer pruned up to one common
    tolerated drop. Both treat per-layer drops as additive, which the scan cannot verify.
    """
    check_sparsity(target, "target sparsity")
    if method not in ("lagrangian", "equal_drop"):
        raise NetshrinkError(f"unknown allocation method {method!r}", where="allocate_from_sensitivity",
                             hint="'lagrangian' or 'equal_drop'")
    total = sum(curves.sizes.values())
    reachable = sum(curves.sizes[n] * curves.sparsities[-1] for n in curves.quality) / total
    if target > reachable + 1e-9:
        raise NetshrinkError(f"target {target:.2f} exceeds what the scanned grid reaches ({reachable:.2f})",
                             where="allocate_from_sensitivity", hint="scan up to a higher sparsity")
    names = list(curves.quality)
    if method == "lagrangian":
        grid = torch.linspace(0.0, curves.sparsities[-1], 400, dtype=torch.float64)
        drops = torch.stack([_drop_at(curves, n, grid) for n in names])  # [layers, grid]
        sizes = torch.tensor([curves.sizes[n] for n in names], dtype=torch.float64)[:, None] / total

        def choose(lam: float) -> dict[str, float]:
            pick = torch.argmin(drops - lam * sizes * grid[None, :], dim=1)
            return {n: float(grid[i]) for n, i in zip(names, pick)}
    else:
        def choose(tol: float) -> dict[str, float]:
            return {n: _sparsity_at_tolerance(curves, n, tol) for n in names}

    def overall(alloc: dict[str, float]) -> float:
        return sum(curves.sizes[n] * s for n, s in alloc.items()) / total

    lo, hi = 0.0, 1.0
    while overall(choose(hi)) < target and hi < 1e12:
        hi *= 2.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if overall(choose(mid)) >= target:
            hi = mid
        else:
            lo = mid
    alloc = choose(hi)
    return _trim_to_target(alloc, curves.sizes, target, overall(alloc))


def _trim_to_target(alloc: dict[str, float], sizes: dict[str, int], target: float, reached: float) -> dict[str, float]:
    """Scale down the overshoot of the bisection so the budget is met exactly (never below it)."""
    total = sum(sizes.values())
    excess = (reached - target) * total
    weight = sum(sizes[n] * s for n, s in alloc.items())
    if excess <= 0 or weight <= 0:
        return alloc
    factor = 1.0 - excess / weight
    return {n: s * factor for n, s in alloc.items()}


def lamp_allocation(model: nn.Module, target: float, include: Iterable[str] | None = None,
                    exclude: Iterable[str] = ()) -> dict[str, float]:
    """Per-layer sparsities implied by pruning the globally lowest LAMP scores to `target`."""
    check_sparsity(target, "target sparsity")
    layers = prunable_layers(model, include, exclude, where="lamp_allocation.exclude")
    scores = {n: lamp_scores(m.weight).flatten() for n, m in layers.items()}
    flat = torch.cat(list(scores.values()))
    keep = lowest_k_mask(flat, int(round(target * flat.numel())))
    out, offset = {}, 0
    for n, s in scores.items():
        out[n] = 1.0 - float(keep[offset: offset + s.numel()].float().mean())
        offset += s.numel()
    return out


def plot_sensitivity(curves: SensitivityCurves, path: str | Path | None = None, title: str | None = None):
    """Quality versus sparsity per layer (one line each) as a matplotlib Figure; saved as PNG when `path` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in curves.quality.items():
        ax.plot([0.0] + curves.sparsities, [curves.baseline] + row, marker="o", ms=3, label=name)
    ax.set_xlabel("sparsity of this layer alone")
    ax.set_ylabel(curves.metric)
    ax.set_title(title or "per-layer sensitivity (one layer pruned at a time)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves.quality) > 8 else 1)
    fig.tight_layout()
    if path is not None:
        from netshrink.atomic import atomic_file

        with atomic_file(path, overwrite=True) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    return fig
