"""Energy per inference: read from a hardware counter when one is readable, otherwise a clearly labelled estimate."""
from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

DEFAULT_CPU_WATTS = float(os.environ.get("NETSHRINK_CPU_WATTS", "0") or 0)


@dataclass
class EnergyReading:
    joules_per_call: float | None
    source: str  # "rapl", "nvml", "estimate (...)" or "not measurable"

    def label(self) -> str:
        if self.joules_per_call is None:
            return "not measurable"
        return f"{self.joules_per_call:.3g} J ({self.source})"


def rapl_counters() -> list[str]:
    """Package-level RAPL energy counters readable by this process (Linux powercap)."""
    paths = sorted(glob.glob("/sys/class/powercap/intel-rapl:*/energy_uj"))
    return [p for p in paths if os.access(p, os.R_OK) and p.count(":") == 1]


def _read_rapl(paths: list[str]) -> float:
    return sum(int(open(p, encoding="ascii").read()) for p in paths) / 1e6


def energy_source() -> str:
    """Which meter this machine offers: 'rapl', 'nvml' or 'none'."""
    if rapl_counters():
        return "rapl"
    if torch.cuda.is_available():
        try:
            import pynvml  # noqa: F401

            return "nvml"
        except ImportError:
            return "none"
    return "none"


def measure_energy(fn: Callable[[], object], calls: int = 10, assumed_watts: float | None = None) -> EnergyReading:
    """Joules per call of `fn`: RAPL if readable; else time x `assumed_watts` labelled as an estimate; else not measurable."""
    counters = rapl_counters()
    start_t = time.perf_counter()
    start_j = _read_rapl(counters) if counters else None
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start_t
    if counters and start_j is not None:
        used = _read_rapl(counters) - start_j
        if used >= 0:  # a wrapped counter gives a negative difference; fall through to the estimate
            return EnergyReading(used / calls, "rapl")
    watts = assumed_watts if assumed_watts is not None else DEFAULT_CPU_WATTS
    if watts and watts > 0:
        return EnergyReading(elapsed * watts / calls, f"estimate: time x {watts:g} W assumed, no power meter readable")
    return EnergyReading(None, "not measurable")


def estimate_from_latency(latency_ms: float, assumed_watts: float | None = None) -> EnergyReading:
    """Estimate (never a measurement) of joules per call from a measured latency and a stated power figure."""
    watts = assumed_watts if assumed_watts is not None else DEFAULT_CPU_WATTS
    if rapl_counters():
        return EnergyReading(None, "measure with measure_energy (RAPL available)")
    if watts and watts > 0:
        return EnergyReading(latency_ms / 1000.0 * watts, f"estimate: time x {watts:g} W assumed, no power meter readable")
    return EnergyReading(None, "not measurable")
