"""Quality and speed of one model variant, measured the same way for compress reports and tuning trials."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Measurement:
    """Headline quality (higher is better after sign), batch-1 median latency and weight size of a variant."""

    quality: float
    metric: str
    scores: dict[str, float]
    latency_ms: float
    weight_mib: float
    sparsity: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quality_of(entry: Any, task: str, n: int | None) -> tuple[float, str, dict[str, float]]:
    """The task's primary metric, signed so that higher is better (perplexity is negated)."""
    from netshrink import eval as evaluation

    metric, higher = evaluation.primary_metric(task)
    if task == "digits":  # the recipes train on the 'train' split; judge on the held-out 'test' split
        scores = evaluation.evaluate_digits(entry.model, n=n, split="test")
    else:
        scores = evaluation.evaluate(entry, task=task, n=n)
    value = float(scores[metric])
    return (value if higher else -value), metric, scores


def measure(entry: Any, task: str, n: int | None = None, runs: int = 20, threads: int = 1) -> Measurement:
    """Evaluate and time `entry` (batch 1, `threads` intra-op threads) and size its weights."""
    from netshrink import bench

    quality, metric, scores = quality_of(entry, task, n)
    inputs = entry.example_inputs(batch=1, seq_len=64)
    model = entry.model
    with torch.inference_mode():
        stats = bench.latency(lambda *x: model(*x), inputs, warmup=3, runs=runs, num_threads=threads)
    size = bench.model_size(model)
    return Measurement(quality, metric, scores, stats.median_ms, size["weight_mib"], size["sparsity"])
