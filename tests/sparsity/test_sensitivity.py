"""Layer-adaptive sparsity: the scan measures, the allocation spends the budget where it hurts least, LAMP."""
from __future__ import annotations

import matplotlib
import pytest
import torch

from netshrink.errors import NetshrinkError
from netshrink.sparsity import (Magnitude, allocate_from_sensitivity, lamp_allocation, plot_sensitivity, prune_,
                                sensitivity_scan, sparsity_of)
from netshrink.sparsity.sensitivity import SensitivityCurves

from sparsity_helpers import frozen_copy, state_equal


def _acc(x, y):
    def evaluate(model):
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())
    return evaluate


def test_scan_on_real_cnn_measures_each_layer_alone(digit_cnn, digits_batch):
    x, y = digits_batch
    before = frozen_copy(digit_cnn)
    curves = sensitivity_scan(digit_cnn, _acc(x, y), sparsities=(0.5, 0.9, 0.99), metric="accuracy")
    assert state_equal(before, digit_cnn)
    assert list(curves.quality) == ["conv_layers.0", "conv_layers.3", "conv_layers.6", "fc_layers.0", "fc_layers.2"]
    assert curves.baseline == _acc(x, y)(digit_cnn)
    # the 99% point of the first conv, checked by hand
    manual = frozen_copy(digit_cnn)
    w = manual.conv_layers[0].weight.data
    k = int(round(0.99 * w.numel()))
    w.view(-1)[torch.argsort(w.abs().flatten(), stable=True)[:k]] = 0
    assert curves.quality["conv_layers.0"][2] == _acc(x, y)(manual)
    assert len({tuple(v) for v in curves.quality.values()}) > 1, "layers do not differ"
    fig = plot_sensitivity(curves)
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes[0].lines) == 5


@pytest.mark.parametrize("method", ["lagrangian", "equal_drop"])
def test_allocation_spends_budget_on_insensitive_layers_and_meets_it(method):
    curves = SensitivityCurves(baseline=1.0, sparsities=[0.5, 0.9, 0.95],
                               quality={"robust": [1.0, 0.99, 0.97], "fragile": [0.9, 0.5, 0.3]},
                               sizes={"robust": 1000, "fragile": 3000})
    alloc = allocate_from_sensitivity(curves, target=0.6, method=method)
    assert alloc["robust"] > alloc["fragile"]
    overall = (alloc["robust"] * 1000 + alloc["fragile"] * 3000) / 4000
    assert abs(overall - 0.6) < 1e-6
    # swap the layers' curves: the allocation follows the measurement, not the position
    swapped = SensitivityCurves(1.0, curves.sparsities, {"robust": curves.quality["fragile"],
                                                         "fragile": curves.quality["robust"]}, curves.sizes)
    alloc2 = allocate_from_sensitivity(swapped, target=0.6, method=method)
    assert alloc2["robust"] < alloc2["fragile"]
    with pytest.raises(NetshrinkError, match="exceeds"):
        allocate_from_sensitivity(curves, target=0.97, method=method)


def test_lagrangian_minimises_the_summed_measured_drop():
    from netshrink.sparsity.sensitivity import _drop_at

    curves = SensitivityCurves(baseline=1.0, sparsities=[0.3, 0.6, 0.9],
                               quality={"a": [0.99, 0.95, 0.6], "b": [0.9, 0.85, 0.8], "c": [1.0, 0.97, 0.9]},
                               sizes={"a": 500, "b": 2000, "c": 1500})

    def summed(alloc):
        return sum(float(_drop_at(curves, n, torch.tensor([s], dtype=torch.float64))) for n, s in alloc.items())

    best = summed(allocate_from_sensitivity(curves, 0.7, method="lagrangian"))
    assert best <= summed(allocate_from_sensitivity(curves, 0.7, method="equal_drop")) + 1e-9
    # brute force over a grid of feasible allocations (within rounding of the 400-point grid)
    grid = [i / 100 for i in range(0, 91)]
    brute = min(summed({"a": a, "b": b, "c": (0.7 * 4000 - 500 * a - 2000 * b) / 1500})
                for a in grid for b in grid if 0 <= (0.7 * 4000 - 500 * a - 2000 * b) / 1500 <= 0.9)
    assert best <= brute + 0.01


def test_allocation_applied_to_real_cnn(digit_cnn, digits_batch, tmp_path):
    x, y = digits_batch
    curves = sensitivity_scan(digit_cnn, _acc(x, y), sparsities=(0.5, 0.8, 0.9, 0.95, 0.98))
    alloc = allocate_from_sensitivity(curves, target=0.9)
    model = prune_(digit_cnn, Magnitude(per_layer=alloc))
    assert abs(sparsity_of(model)["total"] - 0.9) < 1e-3
    plot_sensitivity(curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_lamp_allocation_meets_target_and_matches_global_lamp(digit_cnn):
    alloc = lamp_allocation(digit_cnn, 0.8)
    sizes = {n: digit_cnn.get_submodule(n).weight.numel() for n in alloc}
    overall = sum(alloc[n] * sizes[n] for n in alloc) / sum(sizes.values())
    assert abs(overall - 0.8) < 1e-6
    lamp_model = prune_(digit_cnn, Magnitude(sparsity=0.8, importance="lamp"))
    got = sparsity_of(lamp_model)
    assert all(abs(got[n] - alloc[n]) < 1e-6 for n in alloc)
    # LAMP never empties a layer: its largest weight has score 1
    assert max(alloc.values()) < 1.0
