"""Run several variants of a model in one process, interleaved round by round, and report ratios to a baseline.

Interleaving spreads machine noise (another process, a starved core, thermal drift) evenly over the variants,
so the ratios stay meaningful even when absolute times drift."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from netshrink.bench.latency import LatencyStats, summarize, threads, time_call
from netshrink.errors import NetshrinkError


@dataclass
class ComparisonRow:
    name: str
    stats: LatencyStats
    speedup: float  # baseline median / this median

    def to_dict(self) -> dict[str, float | str]:
        return {"name": self.name, **self.stats.to_dict(), "speedup": self.speedup}


@torch.inference_mode()
def compare(variants: dict[str, Callable[[], object]], baseline: str | None = None, rounds: int = 10,
            calls_per_round: int = 2, warmup: int = 2, num_threads: int | None = None, batch: int = 1) -> list[ComparisonRow]:
    """Time each zero-argument callable `rounds` times, rotating the order every round; speedups are vs `baseline`."""
    if not variants:
        raise NetshrinkError("nothing to compare", where="compare")
    names = list(variants)
    baseline = baseline or names[0]
    if baseline not in variants:
        raise NetshrinkError(f"baseline '{baseline}' is not one of the variants ({', '.join(names)})", where="compare")
    times: dict[str, list[float]] = {name: [] for name in names}
    with threads(num_threads) as used:
        for name in names:
            for _ in range(warmup):
                variants[name]()
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                for _ in range(calls_per_round):
                    times[name].append(time_call(variants[name]))
    stats = {name: summarize(ts, used, batch) for name, ts in times.items()}
    base = stats[baseline].median_ms
    return [ComparisonRow(name, stats[name], base / stats[name].median_ms) for name in names]


def markdown_table(rows: list[ComparisonRow], extra: dict[str, dict[str, str]] | None = None) -> str:
    """Rows as a markdown table: median, p90, throughput and speedup (plus any extra columns per variant)."""
    extra = extra or {}
    extra_cols = sorted({key for cols in extra.values() for key in cols})
    head = ["variant", "median ms", "p90 ms", "items/s", "speedup"] + extra_cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.name, f"{row.stats.median_ms:.2f}", f"{row.stats.p90_ms:.2f}", f"{row.stats.throughput:.1f}",
                 f"{row.speedup:.2f}x"] + [extra.get(row.name, {}).get(c, "") for c in extra_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
