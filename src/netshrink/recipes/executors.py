"""Where sweeps and tuning trials run: a local process pool by default, or Ray when one machine is not enough.

Both run a picklable `fn(item)` on every item and return the results in item order; each trial seeds itself from
its own description, so the same sweep gives the same results with either executor.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from typing import Any, Callable, Sequence

from netshrink.errors import NetshrinkError


class LocalExecutor:
    """A pool of `workers` spawned processes (1 runs in this process, which keeps debugging simple)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or max(1, min(2, os.cpu_count() or 1))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if self.workers == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
        with cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=context) as pool:
            return list(pool.map(fn, items))

    def close(self) -> None:
        pass


class RayExecutor:
    """Run each item as a Ray task: on a cluster at `address`, or on a local Ray instance started here."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_task: float = 1.0) -> None:
        try:
            import ray
        except ImportError:
            raise NetshrinkError("the Ray executor needs the 'ray' package", where="--executor ray",
                                 hint="pip install ray") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = num_cpus or max(1, min(2, os.cpu_count() or 1))
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise NetshrinkError(f"cannot reach Ray: {exc}", where=address or "local Ray") from None
            self._started = True
        self.cpus_per_task = cpus_per_task

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        remote = self._ray.remote(num_cpus=self.cpus_per_task)(fn)
        return self._ray.get([remote.remote(item) for item in items])

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_executor(kind: str = "local", address: str | None = None, workers: int | None = None) -> LocalExecutor | RayExecutor:
    """'local' (process pool) or 'ray' (`address` of a cluster, or a local instance)."""
    if kind == "local":
        if address:
            raise NetshrinkError("--address is for the Ray executor", where="--address", hint="add --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address, workers)
    raise NetshrinkError(f"unknown executor '{kind}'", where="--executor", hint="local or ray")
