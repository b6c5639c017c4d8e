"""Calibration observers: watch tensors, then choose the clipping range that quantization maps onto the codes.

- `MinMaxObserver`: the running minimum and maximum (no clipping).
- `MovingAverageMinMaxObserver`: exponential moving average of each batch's min and max (as in TF / torch.ao QAT).
- `PercentileObserver`: the p-th and (100-p)-th percentiles, ignoring rare outliers.
- `MSEObserver`: searches clipping ratios of the min-max range and keeps the one with the least squared error
  between the tensor and its quantized copy (Banner et al. 2019, "ACIQ"; Choukroun et al. 2019).
- `EntropyObserver`: TensorRT's calibration (Migacz 2017): a 2048-bin histogram of |x|, and the threshold whose
  128-level quantized distribution has the least KL divergence from the clipped reference distribution.

Every observer works at the granularity of its `QScheme` (per tensor, per channel, per group), so it serves weights
and activations alike. `update(x)` accumulates, `min_max()` gives the range, `qparams()` the scale and zero point.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from netshrink.errors import NetshrinkError
from netshrink.quant.primitives import QScheme, compute_qparams, fake_quantize, resolve_scheme


def _rows(x: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """`x` as a 2-d [ranges, values] matrix: one row per scale the scheme will produce."""
    x = x.detach().float()
    if scheme.granularity == "tensor":
        return x.reshape(1, -1)
    if scheme.granularity == "channel":
        return x.movedim(scheme.axis, 0).reshape(x.shape[scheme.axis], -1)
    axis, g = scheme.axis, scheme.group_size
    grouped = x.reshape(*x.shape[:axis], x.shape[axis] // g, g, *x.shape[axis + 1:])
    # keep the layout of the scale (shape of x with the grouped axis divided): groups become a dimension
    # in place, the group members move last
    grouped = grouped.movedim(axis + 1, -1)
    return grouped.reshape(-1, g)


class Observer(abc.ABC):
    """Base class: validates input, tracks the range layout, turns a range into quantization parameters."""

    def __init__(self, scheme: QScheme | None = None, name: str | None = None) -> None:
        self.scheme = scheme or QScheme()
        self.name = name
        self.batches = 0
        self._layout: tuple[int, ...] | None = None   # shape of the range tensors (scale layout)
        self._resolved: QScheme | None = None

    def update(self, x: torch.Tensor) -> None:
        """Observe one tensor (a batch of activations, or a weight)."""
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise NetshrinkError("NaN or Inf in observed values", where=self.name,
                                 hint="check the model and the calibration data")
        scheme = resolve_scheme(x, self.scheme, self.name)
        if self._resolved is None:
            self._resolved = scheme
            layout = torch.empty(())
            if scheme.granularity == "channel":
                layout = torch.empty(x.shape[scheme.axis])
            elif scheme.granularity == "group":
                shape = list(x.shape)
                shape[scheme.axis] //= scheme.group_size
                layout = torch.empty(shape)
            self._layout = tuple(layout.shape)
        rows = _rows(x, scheme)
        if rows.shape[0] != math.prod(self._layout or ()):
            raise NetshrinkError(f"observed tensor of shape {tuple(x.shape)} does not match earlier ones",
                                 where=self.name)
        self._observe(rows)
        self.batches += 1

    @abc.abstractmethod
    def _observe(self, rows: torch.Tensor) -> None:
        """Accumulate a [ranges, values] matrix."""

    @abc.abstractmethod
    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range per row, from what was accumulated."""

    def min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen clipping range, in the scale layout of the scheme."""
        if self.batches == 0:
            raise NetshrinkError("observer saw no data; the calibration set is empty", where=self.name,
                                 hint="pass at least one calibration batch")
        lo, hi = self._range()
        return lo.reshape(self._layout), hi.reshape(self._layout)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for the observed range."""
        lo, hi = self.min_max()
        return compute_qparams(lo, hi, self._resolved or self.scheme)


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything observed."""

    def __init__(self, scheme: QScheme | None = None, name: str | None = None) -> None:
        super().__init__(scheme, name)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(1), rows.amax(1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    """min <- min + c (batch_min - min), same for max; the first batch initialises both."""

    def __init__(self, scheme: QScheme | None = None, name: str | None = None, averaging_constant: float = 0.01) -> None:
        super().__init__(scheme, name)
        if not 0 < averaging_constant <= 1:
            raise NetshrinkError(f"averaging_constant must be in (0, 1], got {averaging_constant}", where=name)
        self.c = averaging_constant

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(1), rows.amax(1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.c * (lo - self.lo)
            self.hi = self.hi + self.c * (hi - self.hi)


class _SampleObserver(Observer):
    """Keeps (a deterministic subsample of) the observed values per range, for the searching observers."""

    def __init__(self, scheme: QScheme | None = None, name: str | None = None, max_samples: int = 1 << 20) -> None:
        super().__init__(scheme, name)
        self.max_samples = max_samples
        self.min_per_range = 4096
        self.samples: list[torch.Tensor] = []
        self.kept = 0

    def _observe(self, rows: torch.Tensor) -> None:
        budget = max(self.min_per_range, self.max_samples // rows.shape[0])
        if rows.shape[1] > budget:                     # evenly spaced subsample: deterministic, keeps extremes rare
            idx = torch.linspace(0, rows.shape[1] - 1, budget).round().long()
            sorted_rows = rows.sort(dim=1).values      # keep the spread: sample the sorted values' quantiles
            rows = sorted_rows[:, idx]
        self.samples.append(rows)
        self.kept += rows.shape[1]
        if self.kept > 2 * budget:                     # compact: merge and resample to the budget
            merged = torch.cat(self.samples, 1).sort(dim=1).values
            idx = torch.linspace(0, merged.shape[1] - 1, budget).round().long()
            self.samples, self.kept = [merged[:, idx]], budget

    def values(self) -> torch.Tensor:
        return torch.cat(self.samples, 1)


class PercentileObserver(_SampleObserver):
    """Clip to the [100 - p, p] percentiles of the observed values (linear interpolation, as numpy does)."""

    def __init__(self, scheme: QScheme | None = None, name: str | None = None, percentile: float = 99.99,
                 max_samples: int = 1 << 20) -> None:
        super().__init__(scheme, name, max_samples)
        if not 50 < percentile <= 100:
            raise NetshrinkError(f"percentile must be in (50, 100], got {percentile}", where=name)
        self.percentile = percentile

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.values().double()
        p = self.percentile / 100
        return torch.quantile(v, 1 - p, dim=1).float(), torch.quantile(v, p, dim=1).float()


class MSEObserver(_SampleObserver):
    """Search clipping ratios r of the min-max range; keep the r with least ||x - Q_r(x)||^2 per range."""

    def __init__(self, scheme: QScheme | None = None, name: str | None = None, ratios: int = 100,
                 lowest_ratio: float = 0.2, max_samples: int = 1 << 17) -> None:
        super().__init__(scheme, name, max_samples)
        self.ratios = torch.linspace(lowest_ratio, 1.0, ratios)

    def errors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Squared error per (ratio, range) plus the unclipped min and max (for inspection and tests)."""
        v = self.values()
        lo, hi = v.amin(1), v.amax(1)
        flat = QScheme(bits=self.scheme.bits, symmetric=self.scheme.symmetric, signed=self.scheme.signed,
                       granularity="channel", axis=0)
        errs = []
        for r in self.ratios:
            scale, zp = compute_qparams(lo * r, hi * r, flat)
            errs.append(((fake_quantize(v, flat, scale, zp) - v) ** 2).sum(1))
        return torch.stack(errs), lo, hi

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        errs, lo, hi = self.errors()
        best = self.ratios[errs.argmin(0)]
        return lo * best, hi * best


class EntropyObserver(_SampleObserver):
    """TensorRT entropy calibration: the |x| threshold minimising KL(P || Q) over a 2048-bin histogram."""

    def __init__(self, scheme: QScheme | None = None, name: str | None = None, bins: int = 2048,
                 max_samples: int = 1 << 20) -> None:
        super().__init__(scheme, name, max_samples)
        self.bins = bins

    @staticmethod
    def kl_threshold(values: torch.Tensor, bins: int = 2048, levels: int = 128) -> float:
        """The clipping threshold for |values| (Migacz 2017, as MXNet / TensorRT implement it).

        For every candidate i = levels..bins: P is the histogram cut at bin i with the outlier mass added to its
        last bin; Q merges the i bins into `levels` buckets and spreads each bucket evenly over the bins where P is
        non-zero. The threshold is the right edge of bin i with the least KL(P || Q) (both smoothed as MXNet does).
        """
        a = values.detach().abs().double().reshape(-1)
        top = float(a.max()) if a.numel() else 0.0
        if top == 0:
            return 0.0
        hist = torch.histc(a, bins=bins, min=0, max=top)
        width = top / bins
        cand = torch.arange(levels, bins + 1)                                  # i: number of kept bins
        k = torch.arange(bins)
        kept = k[None, :] < cand[:, None]                                      # [n_i, bins]
        sliced = torch.where(kept, hist[None, :], torch.zeros((), dtype=torch.float64))
        tail = hist.flip(0).cumsum(0).flip(0)                                  # tail[i] = sum(hist[i:])
        tail = torch.cat((tail, torch.zeros(1, dtype=torch.float64)))
        p = sliced.clone()
        p[torch.arange(len(cand)), cand - 1] += tail[cand]
        merged = (cand // levels)[:, None]                                     # bins per bucket; rest joins the last
        bucket = torch.clamp(k[None, :] // merged, max=levels - 1)
        bucket = torch.where(kept, bucket, torch.full_like(bucket, levels))    # out-of-range bins to a spare bucket
        nonzero = (p > 0).double()
        mass = torch.zeros(len(cand), levels + 1, dtype=torch.float64).scatter_add_(1, bucket, sliced)
        count = torch.zeros(len(cand), levels + 1, dtype=torch.float64).scatter_add_(1, bucket, nonzero)
        q = torch.where(nonzero > 0, mass.gather(1, bucket) / count.gather(1, bucket).clamp(min=1),
                        torch.zeros((), dtype=torch.float64))
        p, q = _smooth(p, kept), _smooth(q, kept)
        p = p / p.sum(1, keepdim=True)
        q = q / q.sum(1, keepdim=True).clamp(min=1e-300)
        terms = torch.where(kept & (p > 0), p * torch.log(p / q.clamp(min=1e-300)), torch.zeros((), dtype=torch.float64))
        kl = terms.sum(1)
        kl = torch.where(torch.isfinite(kl), kl, torch.full_like(kl, math.inf))
        best = int(cand[int(kl.argmin())])
        return best * width

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.values()
        levels = 1 << (self.scheme.bits - 1)
        thresholds = torch.tensor([self.kl_threshold(row, self.bins, levels) for row in v])
        lo, hi = v.amin(1), v.amax(1)
        return torch.maximum(lo, -thresholds), torch.minimum(hi, thresholds)


def _smooth(p: torch.Tensor, kept: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """MXNet's smoothing: give empty kept bins eps, taken evenly from the non-empty ones, so KL stays finite."""
    zeros = kept & (p == 0)
    nonzeros = kept & (p != 0)
    n_zero = zeros.sum(1, keepdim=True).double()
    n_nonzero = nonzeros.sum(1, keepdim=True).double().clamp(min=1)
    return p + eps * zeros.double() - (eps * n_zero / n_nonzero) * nonzeros.double()


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


@dataclass(frozen=True)
class ObserverSpec:
    """A named observer plus its keyword arguments, as configs carry it (e.g. ObserverSpec("percentile", ...))."""

    kind: str = "minmax"
    percentile: float = 99.99
    averaging_constant: float = 0.01

    def build(self, scheme: QScheme, name: str | None = None) -> Observer:
        """A fresh observer of this kind for `scheme`."""
        if self.kind not in OBSERVERS:
            raise NetshrinkError(f"unknown observer {self.kind!r}", where=name,
                                 hint=f"choose one of {', '.join(OBSERVERS)}")
        if self.kind == "percentile":
            return PercentileObserver(scheme, name, percentile=self.percentile)
        if self.kind == "moving_average":
            return MovingAverageMinMaxObserver(scheme, name, averaging_constant=self.averaging_constant)
        return OBSERVERS[self.kind](scheme, name)


def make_observer(kind: str | ObserverSpec, scheme: QScheme, name: str | None = None) -> Observer:
    """An observer from a name ('minmax', 'moving_average', 'percentile', 'mse', 'entropy') or an ObserverSpec."""
    spec = kind if isinstance(kind, ObserverSpec) else ObserverSpec(kind)
    return spec.build(scheme, name)
