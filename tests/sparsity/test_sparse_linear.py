"""CPU sparse execution: the CSR Linear is exact and used only where it measured faster."""
from __future__ import annotations

import torch
from torch import nn

from netshrink.sparsity import Magnitude, SparseLinear, make_permanent, prepare_sparse_execution, prune_


def test_sparse_linear_matches_float64_reference():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.9] = 0
    x = torch.randn(5, 7, 64)
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    torch.testing.assert_close(SparseLinear(lin)(x).double(), ref, rtol=1e-5, atol=1e-5)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 8))
    return make_permanent(prune_(model, Magnitude(sparsity=0.95, scope="layer", exclude=("4",))))


def test_choice_follows_measurement_and_outputs_stay_equal():
    x = torch.randn(16, 256)
    model = _model()
    with torch.no_grad():
        ref = model(x)
    always = prepare_sparse_execution(model, (x,), min_speedup=0.0, rounds=2)
    assert [t.chosen for t in always.layers] == ["csr", "csr", "dense (not sparse)"]
    assert isinstance(model[0], SparseLinear) and isinstance(model[4], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert "CSR kernel used for 2 of 3" in always.statement

    never = prepare_sparse_execution(_model(), (x,), min_speedup=1e9, rounds=2)
    assert all(t.chosen != "csr" for t in never.layers)
    assert never.statement.startswith("sparsity brings no speedup")
    assert "| 0 | 512x256 | 16 | 95% |" in never.markdown()
