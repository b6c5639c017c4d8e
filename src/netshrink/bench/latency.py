"""Latency and throughput: warm-up, then median/p90/p99 over N timed runs at a fixed, reported thread count."""
from __future__ import annotations

import contextlib
import statistics
import time
import warnings
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

    `runtime`: "native" decodes with netshrink's `NativeDecoder` (packed models, AVX-512 VNNI CPUs), "lean" with
    its `LeanDecoder` (Llama-family models), "transformers" with the model's own `generate`; "auto" takes the
    first of those that applies to the model and this machine. The result's "native" and "lean" say which ran."""
    if runtime not in ("auto", "native", "lean", "transformers"):
        raise NetshrinkError(f"unknown decode runtime {runtime!r}", where="decode_tokens_per_second",
                             hint="choose auto, native, lean or transformers")
    decoder, native = None, False
    max_len = input_ids.shape[-1] + new_tokens + 1
    with threads(num_threads):
        if runtime in ("auto", "native"):
            from netshrink.llm.native import NativeDecoder, native_available

            supported = getattr(getattr(model, "config", None), "model_type", None) in _llm_supported()
            if runtime == "native":
                decoder, native = NativeDecoder(model, max_len=max_len), True
            elif supported and native_available() and _all_packed(model):
                try:
                    decoder, native = NativeDecoder(model, max_len=max_len), True
                except NetshrinkError as error:   # e.g. no C++ compiler: torch's kernels still work
                    warnings.warn(f"native decoding unavailable ({error}); decoding with LeanDecoder")
        if decoder is None and runtime in ("auto", "lean"):
            from netshrink.llm.decode import LeanDecoder

            if runtime == "lean" or getattr(getattr(model, "config", None), "model_type", None) in _llm_supported():
                decoder = LeanDecoder(model, max_len=max_len)

    def run(n: int) -> object:
        if decoder is not None:
            return decoder.generate(input_ids, n)
        return model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with threads(num_threads) as used:
        run(2)  # warm-up
        prefill = time_call(lambda: run(1))
        total = time_call(lambda: run(new_tokens))
    decode_ms = max(total - prefill, 1e-6)
    return {"tokens_per_s": (new_tokens - 1) * 1000.0 / decode_ms, "prefill_ms": prefill, "threads": float(used),
            "native": float(native), "lean": float(decoder is not None and not native)}


def _llm_supported() -> tuple[str, ...]:
    from netshrink.llm.arch import SUPPORTED

    return tuple(SUPPORTED)


def _all_packed(model: torch.nn.Module) -> bool:
    """Whether every decoder-block projection and the LM head are packed in a layout the native kernel reads."""
    from netshrink.llm.arch import arch_of
    from netshrink.llm.fuse import FusedSlice
    from netshrink.llm.native.layout import check_native
    from netshrink.llm.packed_linear import PackedLinear

    try:
        arch = arch_of(model)
        head = model.get_submodule(arch.lm_head)
        layers = [m for m in model.get_submodule(arch.layers).modules()
                  if isinstance(m, (torch.nn.Linear, PackedLinear)) and not isinstance(m, FusedSlice)]
        for layer in layers + [head]:
            if not isinstance(layer, PackedLinear):
                return False
            check_native(layer.in_features, layer.bits, layer.group_size, "layer")   # no unpacking
    except NetshrinkError:
        return False
    return True
