"""Observers against hand-computed ranges on known distributions, and against float64 brute force."""
from __future__ import annotations

import pytest
import torch

from netshrink.errors import NetshrinkError
from netshrink.quant.observers import (
    EntropyObserver, MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, PercentileObserver, make_observer,
)
from netshrink.quant.primitives import QScheme


def test_minmax_over_batches_and_channels():
    obs = MinMaxObserver(QScheme(granularity="channel", axis=1))
    obs.update(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    obs.update(torch.tensor([[-4.0, 1.0], [0.0, 7.0]]))
    lo, hi = obs.min_max()
    assert lo.tolist() == [-4.0, -2.0] and hi.tolist() == [3.0, 7.0]
    scale, zp = obs.qparams()
    assert torch.allclose(scale, torch.tensor([4 / 127, 7 / 127])) and zp.tolist() == [0, 0]


def test_minmax_group_layout():
    w = torch.arange(16, dtype=torch.float32).reshape(2, 8)
    obs = MinMaxObserver(QScheme(granularity="group", axis=1, group_size=4))
    obs.update(w)
    lo, hi = obs.min_max()
    assert lo.tolist() == [[0, 4], [8, 12]] and hi.tolist() == [[3, 7], [11, 15]]


def test_moving_average_by_hand():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs.update(torch.tensor([-1.0, 1.0]))      # initialise: [-1, 1]
    obs.update(torch.tensor([-3.0, 5.0]))      # -1 + 0.5(-3 + 1) = -2 ; 1 + 0.5(5 - 1) = 3
    obs.update(torch.tensor([0.0, 1.0]))       # -2 + 0.5(0 + 2) = -1 ; 3 + 0.5(1 - 3) = 2
    lo, hi = obs.min_max()
    assert lo.item() == -1.0 and hi.item() == 2.0


def test_percentile_on_a_known_grid():
    obs = PercentileObserver(percentile=99.0)
    x = torch.arange(10001, dtype=torch.float32) / 10000          # 0, 0.0001, ..., 1
    obs.update(x[:5000])
    obs.update(x[5000:])
    lo, hi = obs.min_max()
    assert lo.item() == pytest.approx(0.01, abs=1e-6) and hi.item() == pytest.approx(0.99, abs=1e-6)


def test_percentile_ignores_a_rare_outlier():
    x = torch.linspace(-1, 1, 100001)
    x[0] = -1000.0
    obs = PercentileObserver(percentile=99.9)
    obs.update(x)
    lo, hi = obs.min_max()
    assert -1.0 < lo.item() < -0.99 and 0.99 < hi.item() < 1.0


def _mse_reference(v: torch.Tensor, ratios: torch.Tensor, bits: int) -> torch.Tensor:
    """float64 brute force: symmetric signed quantization error for each clipping ratio."""
    v = v.double()
    amax = v.abs().max()
    half = 2 ** (bits - 1) - 1
    out = []
    for r in ratios.double():
        s = amax * r / half
        q = torch.clamp(torch.round(v / s), -half - 1, half)
        out.append(((q * s - v) ** 2).sum())
    return torch.stack(out)


def test_mse_matches_float64_brute_force_and_gaussian_theory():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g)
    obs = MSEObserver(QScheme(bits=4))
    obs.update(x)
    errs, lo, hi = obs.errors()
    ref = _mse_reference(obs.values()[0], obs.ratios, bits=4)
    assert int(errs[:, 0].argmin()) == int(ref.argmin())
    assert torch.allclose(errs[:, 0].double(), ref, rtol=1e-3)
    clip = obs.min_max()[1].item()
    # a 4-bit uniform quantizer of a unit Gaussian is best clipped near 2.5-2.9 sigma (Max 1960; Banner 2019),
    # far inside the ~4.2 sigma maximum of 50k samples
    assert 2.3 < clip < 3.0 and hi.item() > 3.8


def test_mse_keeps_the_full_range_of_8bit_uniform_data():
    obs = MSEObserver(QScheme(bits=8))
    obs.update(torch.linspace(-1, 1, 50001))
    assert obs.min_max()[1].item() > 0.97


def test_entropy_threshold_by_hand():
    # 100k values filling [0, 1) plus one outlier at 16: 2048 bins of width 1/128 over [0, 16]; the data occupy
    # exactly the first 128 bins, so the KL-optimal cut keeps 128 bins: threshold 128 / 128 = 1.0
    x = torch.cat((torch.linspace(0, 0.999, 100_000), torch.tensor([16.0])))
    assert EntropyObserver.kl_threshold(x) == pytest.approx(1.0)
    obs = EntropyObserver()
    obs.update(x)
    lo, hi = obs.min_max()
    assert hi.item() == pytest.approx(1.0) and lo.item() == 0.0


def test_entropy_keeps_everything_when_the_histogram_is_flat():
    x = torch.linspace(-3, 3, 204_801)
    assert EntropyObserver.kl_threshold(x) == pytest.approx(3.0)


def test_entropy_cuts_off_a_far_outlier_cluster():
    g = torch.Generator().manual_seed(1)
    body = torch.randn(200_000, generator=g)
    outliers = 50 + torch.randn(200, generator=g)          # 0.1 % of the mass, far away
    t = EntropyObserver.kl_threshold(torch.cat((body, outliers)))
    assert 3.0 < t < 10.0


def test_empty_calibration_and_nan_are_errors():
    obs = make_observer("mse", QScheme(), name="encoder.layer.2.output")
    with pytest.raises(NetshrinkError, match="empty"):
        obs.min_max()
    with pytest.raises(NetshrinkError, match="encoder.layer.2.output"):
        obs.update(torch.tensor([1.0, float("inf")]))
    with pytest.raises(NetshrinkError, match="unknown observer"):
        make_observer("median", QScheme())


@pytest.mark.parametrize("kind", ["minmax", "moving_average", "percentile", "mse", "entropy"])
def test_every_observer_serves_per_channel_weights(kind):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 300, generator=g) * torch.tensor([[0.1], [1.0], [3.0], [10.0]])
    obs = make_observer(kind, QScheme(granularity="channel", axis=0))
    obs.update(w)
    lo, hi = obs.min_max()
    assert lo.shape == (4,) and torch.all(lo < 0) and torch.all(hi > 0)
    assert torch.all(hi <= w.amax(1) + 1e-6)
    assert hi[3] > hi[2] > hi[1] > hi[0]
