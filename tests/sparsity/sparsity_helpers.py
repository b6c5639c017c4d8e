"""Small models and state comparisons shared by the sparsity tests."""
from __future__ import annotations

import copy

import torch
from torch import nn


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
