"""Sensitivity scans: compress one layer at a time to each level and measure the quality that remains.

Each (layer, level) point is an independent task, so the scan spreads over any executor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Point:
    """One scan task: prune `layer` of zoo model `model` to `sparsity` and evaluate on `task` with `n` samples."""

    model: str
    layer: str
    sparsity: float
    task: str
    n: int | None = None
    seed: int = 0


def _quality_with_one_layer_changed(model: str, layer: str, kind: str, stage: dict[str, Any], task: str,
                                    n: int | None, seed: int) -> tuple[float, str]:
    """Apply one recipe stage (`kind`: prune | quantize) to `layer` alone of a freshly loaded zoo model, then
    measure it; every other Linear/Conv2d is excluded, so the score isolates that layer's sensitivity."""
    from netshrink import zoo
    from netshrink.recipes.measure import quality_of
    from netshrink.recipes.runner import compress

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    entry = zoo.load(model)
    stage = dict(stage)
    others = [name for name, m in entry.model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name != layer]
    if others:
        stage["exclude"] = others
    result = compress(entry, {"name": "scan", "stages": [{kind: stage}]})
    quality, metric, _ = quality_of(result.entry, task, n)
    return quality, metric


def run_point(point: Point) -> dict[str, Any]:
    """Measure one point (top level, so process pools and Ray can pickle it); seeded from the point itself."""
    stage = {"method": "magnitude", "scope": "layer", "sparsity": point.sparsity}
    quality, metric = _quality_with_one_layer_changed(point.model, point.layer, "prune", stage, point.task,
                                                      point.n, point.seed)
    return {"layer": point.layer, "sparsity": point.sparsity, "metric": metric, "quality": quality}


def sensitivity_scan(model: str, layers: list[str], levels: list[float], task: str, executor: Any,
                     n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Quality for every (layer, sparsity) pair, in layer-major order."""
    points = [Point(model, layer, level, task, n, seed) for layer in layers for level in levels]
    return executor.map(run_point, points)


@dataclass(frozen=True)
class QuantPoint:
    """One quantization-scan task: quantize only `layer` of zoo model `model` with `method` and evaluate."""

    model: str
    layer: str
    method: str  # "int8-static" | "int8-dynamic"
    task: str
    n: int | None = None
    seed: int = 0


def run_quant_point(point: QuantPoint) -> dict[str, Any]:
    """Quality with only `point.layer` quantized (eager kernels; every other layer stays float)."""
    stage = {"method": point.method, "backend": "eager"}
    quality, metric = _quality_with_one_layer_changed(point.model, point.layer, "quantize", stage, point.task,
                                                      point.n, point.seed)
    return {"layer": point.layer, "method": point.method, "metric": metric, "quality": quality}


def quant_sensitivity_scan(model: str, layers: list[str], method: str, task: str, executor: Any,
                           n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Quality with each layer alone quantized, in `layers` order (the most harmful ones are kept in float)."""
    return executor.map(run_quant_point, [QuantPoint(model, layer, method, task, n, seed) for layer in layers])
