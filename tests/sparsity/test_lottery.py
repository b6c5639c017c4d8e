"""Lottery ticket mechanics (rewinding is exact, masks nest, sparsity is met) and a small Fashion-MNIST run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity import LotteryTicket, Magnitude, find_ticket, magnitude_prune
from netshrink.sparsity.lottery import _rewind
from netshrink.sparsity.masks import get_mask


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))


def test_rewind_restores_early_weights_under_the_mask():
    torch.manual_seed(0)
    model = _mlp()
    early = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    magnitude_prune(model, Magnitude(sparsity=0.7))
    masks = {n: get_mask(m).clone() for n, m in model.named_modules() if get_mask(m) is not None}
    _rewind(model, early)
    for name, mask in masks.items():
        m = model.get_submodule(name)
        assert torch.equal(get_mask(m), mask)
        assert torch.equal(m.weight, early[f"{name}.weight"] * mask)
        assert torch.equal(m.bias, early[f"{name}.bias"])


@pytest.fixture(scope="module")
def fashion():
    from netshrink.data import fashion_mnist

    x, y = fashion_mnist("train", n=4000)
    xt, yt = fashion_mnist("test", n=2000)
    return (x, y), (xt, yt)


def test_small_ticket_on_fashion_mnist(fashion):
    train, test = fashion
    config = LotteryTicket(target_sparsity=0.8, rounds=2, rewind_step=30, train_steps=300, batch_size=64)
    result = find_ticket(_mlp, train, test, config)
    assert result.dense_accuracy > 0.75
    assert [round(s, 6) for s, _ in result.rounds] == [round(1 - 0.2 ** 0.5, 6), 0.8]
    total = sum(m.numel() for m in result.masks.values())
    pruned = sum(int((~m).sum()) for m in result.masks.values())
    assert pruned == round(0.8 * total)
    assert result.ticket_accuracy > result.dense_accuracy - 0.03
    assert result.random_reinit_accuracy == result.random_reinit_accuracy  # measured (not NaN)
    assert "random re-init" in result.markdown()


def test_bad_lottery_settings_are_refused():
    with pytest.raises(NetshrinkError, match="rewind_step"):
        find_ticket(_mlp, (None, None), (None, None), LotteryTicket(rewind_step=10, train_steps=10))
    with pytest.raises(NetshrinkError, match="outside"):
        find_ticket(_mlp, (None, None), (None, None), LotteryTicket(target_sparsity=1.0))
