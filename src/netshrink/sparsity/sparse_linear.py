"""Sparse execution on CPU where it pays: a CSR Linear, chosen per layer only if it measures faster than dense.

At prepare time each Linear's real input (captured from example inputs) is timed through the dense and the
CSR kernel, interleaved in one process; a layer switches only when CSR wins by `min_speedup`. Otherwise it stays
dense and the report says plainly that sparsity brings no speedup there.
"""
from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.record import note
from netshrink.sparsity.masks import make_permanent


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored as a CSR tensor (computed as (W_csr @ x^T)^T)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.weight_csr = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight_csr, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight_csr.values().numel()
        return f"in={self.in_features}, out={self.out_features}, density={nnz / (self.in_features * self.out_features):.3f}"


@dataclass
class LayerTiming:
    name: str
    shape: tuple[int, int]
    rows: int
    sparsity: float
    dense_ms: float
    sparse_ms: float
    chosen: str

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else 0.0


@dataclass
class SparseExecutionReport:
    """Per-layer timings and the choice made; `statement` says whether sparsity bought any speed."""

    layers: list[LayerTiming] = field(default_factory=list)

    @property
    def statement(self) -> str:
        chosen = [t for t in self.layers if t.chosen == "csr"]
        if not chosen:
            return ("sparsity brings no speedup here: no layer ran faster through the CSR kernel than dense on this "
                    "CPU for its shape and sparsity, so every layer stays dense")
        return (f"CSR kernel used for {len(chosen)} of {len(self.layers)} Linear layers, where it measured faster "
                f"(median speedup {statistics.median(t.speedup for t in chosen):.2f}x); the rest stay dense")

    def markdown(self) -> str:
        rows = ["| layer | shape | input rows | sparsity | dense ms | CSR ms | speedup | used |",
                "|---|---|---|---|---|---|---|---|"]
        rows += [f"| {t.name} | {t.shape[0]}x{t.shape[1]} | {t.rows} | {t.sparsity:.0%} | {t.dense_ms:.3f} | "
                 f"{t.sparse_ms:.3f} | {t.speedup:.2f}x | {t.chosen} |" for t in self.layers]
        return "\n".join(rows)


def time_pair(dense: Any, sparse: Any, rounds: int = 15, inner: int = 3) -> tuple[float, float]:
    """Median milliseconds of two callables, interleaved so background load hits both alike."""
    for fn in (dense, sparse):
        fn()
    d, s = [], []
    for _ in range(rounds):
        for fn, out in ((dense, d), (sparse, s)):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(d), statistics.median(s)


@torch.no_grad()
def prepare_sparse_execution(model: nn.Module, example_inputs: tuple, min_speedup: float = 1.1,
                             min_sparsity: float = 0.5, rounds: int = 15) -> SparseExecutionReport:
    """Swap (in place) each sparse Linear for a SparseLinear where CSR measures at least `min_speedup` faster on
    the layer's real input; masks are made permanent first. Returns the per-layer report."""
    make_permanent(model)
    model.eval()
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, m in linears.items():
        def grab(_m: nn.Module, args: tuple, name: str = name) -> None:
            inputs.setdefault(name, args[0].detach())
        handles.append(m.register_forward_pre_hook(grab))
    try:
        model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    report = SparseExecutionReport()
    for name, lin in linears.items():
        if name not in inputs:
            continue
        w = lin.weight
        sparsity = float((w == 0).float().mean())
        x = inputs[name].reshape(-1, lin.in_features)
        if sparsity < min_sparsity:
            report.layers.append(LayerTiming(name, tuple(w.shape), x.shape[0], sparsity, 0.0, 0.0, "dense (not sparse)"))
            continue
        sparse = SparseLinear(lin)
        dense_ms, sparse_ms = time_pair(lambda: F.linear(x, w, lin.bias), lambda: sparse(x), rounds)
        faster = sparse_ms * min_speedup <= dense_ms
        report.layers.append(LayerTiming(name, tuple(w.shape), x.shape[0], sparsity, dense_ms, sparse_ms,
                                         "csr" if faster else "dense"))
        if faster:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, sparse)
            note(model, name, kernel="csr", sparsity=round(sparsity, 6))
    return report
