"""Latency and throughput: warm-up, then median/p90/p99 over N timed runs at a fixed, reported thread count."""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from netshrink.errors import NetshrinkError


@dataclass
class LatencyStats:
    """Wall-clock statistics of one callable, in milliseconds."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    threads: int
    batch: int = 1

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "throughput_per_s": self.throughput}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    if not ordered:
        raise NetshrinkError("no timings to summarise", where="bench")
    pos = (len(ordered) - 1) * q / 100.0
    low, high = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(times_ms: list[float], threads: int, batch: int = 1) -> LatencyStats:
    return LatencyStats(
        median_ms=statistics.median(times_ms), p90_ms=percentile(times_ms, 90), p99_ms=percentile(times_ms, 99),
        mean_ms=statistics.fmean(times_ms), min_ms=min(times_ms), runs=len(times_ms), threads=threads, batch=batch,
    )


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[int]:
    """Run the block with torch using exactly `count` intra-op threads (restored afterwards)."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def time_call(fn: Callable[[], object]) -> float:
    """One call's wall-clock time in milliseconds."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


@torch.inference_mode()
def latency(fn: Callable[..., object], inputs: tuple = (), warmup: int = 3, runs: int = 20,
            num_threads: int | None = None, batch: int = 1, max_seconds: float | None = None) -> LatencyStats:
    """Median/p90/p99 latency of `fn(*inputs)` after `warmup` untimed calls; stops early after `max_seconds`."""
    if runs < 1:
        raise NetshrinkError(f"runs must be at least 1, got {runs}", where="bench")
    with threads(num_threads) as used:
        for _ in range(warmup):
            fn(*inputs)
        times: list[float] = []
        started = time.perf_counter()
        for _ in range(runs):
            times.append(time_call(lambda: fn(*inputs)))
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                break
    return summarize(times, used, batch)


@torch.inference_mode()
def decode_tokens_per_second(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int = 32,
                             num_threads: int | None = None, runtime: str = "auto") -> dict[str, float]:
    """Greedy decoding speed at batch 1 with a KV cache: tokens generated per second after the prompt.

    `runtime`: "lean" decodes with netshrink's `LeanDecoder` (Llama-family models), "transformers" with the model's
    own `generate`, "auto" with the lean loop where the architecture is supported. The result's "lean" is 1.0 when
    the lean loop ran."""
    if runtime not in ("auto", "lean", "transformers"):
        raise NetshrinkError(f"unknown decode runtime {runtime!r}", where="decode_tokens_per_second",
                             hint="choose auto, lean or transformers")
    lean = None
    if runtime != "transformers":
        from netshrink.llm.arch import SUPPORTED
        from netshrink.llm.decode import LeanDecoder

        if runtime == "lean" or getattr(getattr(model, "config", None), "model_type", None) in SUPPORTED:
            lean = LeanDecoder(model, max_len=input_ids.shape[-1] + new_tokens + 1)

    def run(n: int) -> object:
        if lean is not None:
            return lean.generate(input_ids, n)
        return model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with threads(num_threads) as used:
        run(2)  # warm-up
        prefill = time_call(lambda: run(1))
        total = time_call(lambda: run(new_tokens))
    decode_ms = max(total - prefill, 1e-6)
    return {"tokens_per_s": (new_tokens - 1) * 1000.0 / decode_ms, "prefill_ms": prefill, "threads": float(used),
            "lean": float(lean is not None)}
