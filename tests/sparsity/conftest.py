"""Real models and data for the sparsity tests, loaded once per test module."""
from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def digit_cnn() -> nn.Module:
    from netshrink import zoo

    return zoo.load("digit-cnn").model.eval()


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    from netshrink.data import digits

    return digits("test", n=256)


@pytest.fixture(autouse=True)
def one_thread():
    """Small models train far faster on one thread than on two contended ones; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
