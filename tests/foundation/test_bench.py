"""The measurement harness, on models whose cost is known."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from netshrink import bench
from netshrink.bench.latency import percentile


class Sleeper(nn.Module):
    """Costs at least `ms` milliseconds per call."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms = ms

    def forward(self, x):
        time.sleep(self.ms / 1000.0)
        return x


def test_latency_stats_bound_a_known_cost():
    stats = bench.latency(Sleeper(15), (torch.zeros(1),), warmup=1, runs=8, num_threads=1, batch=4)
    assert stats.runs == 8 and stats.threads == 1
    assert 15.0 <= stats.min_ms <= stats.median_ms <= stats.p90_ms <= stats.p99_ms
    assert math.isclose(stats.throughput, 4 * 1000.0 / stats.median_ms)


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 90) == 90


def test_compare_reports_ratio_of_known_costs_and_restores_threads():
    before = torch.get_num_threads()
    rows = bench.compare({"slow": lambda: time.sleep(0.02), "fast": lambda: time.sleep(0.005)}, rounds=3, num_threads=1)
    assert torch.get_num_threads() == before
    by_name = {r.name: r for r in rows}
    assert by_name["slow"].speedup == 1.0
    assert by_name["fast"].speedup > 1.5  # 20 ms vs 5 ms of sleep; scheduling noise only adds to both
    assert "| fast |" in bench.markdown_table(rows)


def test_flops_of_a_linear_layer():
    layer = nn.Linear(256, 128)
    flops = bench.count_flops(layer, (torch.randn(10, 256),))
    assert flops["flops"] == 2 * 10 * 256 * 128 and flops["macs"] == 10 * 256 * 128


def test_model_size_counts_params_nonzeros_and_int_buffers(tmp_path):
    layer = nn.Linear(100, 10)
    with torch.no_grad():
        layer.weight[:5] = 0
    layer.register_buffer("packed", torch.zeros(64, dtype=torch.uint8))
    size = bench.model_size(layer)
    assert size["parameters"] == 1010
    assert size["nonzero_parameters"] == 1010 - 500
    assert size["weight_bytes"] == 1010 * 4 + 64
    assert bench.saved_size(layer, tmp_path) >= 1010 * 4 + 64


def test_peak_rss_sees_a_large_allocation():
    def allocate():
        block = torch.ones(40_000_000)  # 160 MB touched
        return float(block[-1])

    result, mem = bench.peak_rss_during(allocate)
    assert result == 1.0
    assert mem["growth_mib"] >= 140


def test_energy_is_labelled_never_dressed_as_measurement():
    reading = bench.estimate_from_latency(10.0, assumed_watts=20.0)
    if bench.energy_source() == "none":
        assert math.isclose(reading.joules_per_call, 0.2) and reading.source.startswith("estimate")
        assert bench.estimate_from_latency(10.0, assumed_watts=0).label() == "not measurable"
