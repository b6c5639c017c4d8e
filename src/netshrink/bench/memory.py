"""Peak resident memory (RSS) of this process while a piece of work runs."""
from __future__ import annotations

import threading
import time
from functools import lru_cache
from typing import Callable, TypeVar

import psutil

T = TypeVar("T")


def _read_status(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process; Linux >= 4.0 supports writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Hand the pages glibc holds free back to the OS (`malloc_trim`; a no-op elsewhere).

    After freeing a large block glibc raises its mmap threshold to that size, so the next temporaries up to it come
    from the heap, and freed heap pages stay resident: a loop that frees and reallocates a few MiB at a time keeps
    its high-water mark in RSS. Trimming between phases keeps RSS at what is live."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def _glibc():
    """glibc with `malloc_trim` declared, or None (another C library)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Collect garbage and hand glibc's freed pages back to the OS, so growth is measured from a settled baseline
    (otherwise memory freed by earlier work is reused silently and a later peak looks like zero growth)."""
    import gc

    gc.collect()
    trim_heap()


def peak_rss_during(fn: Callable[[], T], poll_s: float = 0.005) -> tuple[T, dict[str, float]]:
    """Run `fn` and return its result with RSS before, peak during, and the growth, in MiB."""
    release_free_memory()
    process = psutil.Process()
    before = process.memory_info().rss
    kernel_peak = _reset_peak()
    sampled = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            sampled.append(process.memory_info().rss)
            time.sleep(poll_s)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        result = fn()
    finally:
        stop.set()
        watcher.join()
    peak = max(sampled + [process.memory_info().rss])
    if kernel_peak:
        peak = max(peak, _read_status("VmHWM") or 0)
    mib = 1024.0 * 1024.0
    return result, {"rss_before_mib": before / mib, "peak_rss_mib": peak / mib, "growth_mib": (peak - before) / mib,
                    "method": "VmHWM" if kernel_peak else "sampled"}
