"""Honest measurement: latency, throughput, decode speed, peak memory, size, FLOPs and energy."""
from netshrink.bench.compare import ComparisonRow, compare, markdown_table
from netshrink.bench.energy import EnergyReading, energy_source, estimate_from_latency, measure_energy
from netshrink.bench.flops import count_flops
from netshrink.bench.latency import LatencyStats, decode_tokens_per_second, latency, threads
from netshrink.bench.memory import peak_rss_during
from netshrink.bench.size import model_size, saved_size, size_on_disk

__all__ = ["ComparisonRow", "compare", "markdown_table", "EnergyReading", "energy_source", "estimate_from_latency",
           "measure_energy", "count_flops", "LatencyStats", "decode_tokens_per_second", "latency", "threads",
           "peak_rss_during", "model_size", "saved_size", "size_on_disk"]
