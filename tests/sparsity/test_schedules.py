"""Schedules: one-shot, iterative and Zhu & Gupta's cubic ramp; recovery keeps the masks."""
from __future__ import annotations

import pytest
import torch

from netshrink.errors import NetshrinkError
from netshrink.sparsity import (FineTune, Gradual, GradualPruner, Iterative, Magnitude, OneShot, builtin_train_fn,
                                cubic_sparsity, prune_, sparsity_of)
from netshrink.sparsity.masks import masked_modules
from netshrink.sparsity.schedules import iterative_targets

from sparsity_helpers import frozen_copy


def test_cubic_schedule_formula():
    sched = Gradual(start_step=10, end_step=110, frequency=10, initial_sparsity=0.1)
    final = 0.9
    for t in (10, 35, 60, 85, 110, 500):
        progress = min(max((t - 10) / 100, 0.0), 1.0)
        expect = final + (0.1 - final) * (1 - progress) ** 3
        assert abs(cubic_sparsity(t, final, sched) - expect) < 1e-12
    values = [cubic_sparsity(t, final, sched) for t in range(10, 111)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert cubic_sparsity(5, final, sched) == 0.0


def test_iterative_targets_remove_same_share_each_round():
    targets = iterative_targets(0.9, 4)
    assert abs(targets[-1] - 0.9) < 1e-12
    left = [1 - t for t in [0.0] + targets]
    ratios = [b / a for a, b in zip(left, left[1:])]
    assert max(ratios) - min(ratios) < 1e-12


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_iterative_with_builtin_finetune_recovers_and_keeps_zeros(digit_cnn):
    from netshrink.data import digits

    xtr, ytr = digits("train", n=512)
    xte, yte = digits("test", n=300)
    batches = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 512, 64)]
    config = Magnitude(sparsity=0.93, scope="global")
    oneshot = prune_(digit_cnn, config)
    model = prune_(digit_cnn, config, schedule=Iterative(rounds=3, finetune_steps=25),
                   train_fn=builtin_train_fn(batches, FineTune(lr=5e-4)))
    assert abs(sparsity_of(model)["total"] - 0.93) < 1e-4
    for m in masked_modules(model).values():
        assert bool((m.parametrizations.weight.original[~m.parametrizations.weight[0].mask] == 0).all())
    assert _accuracy(model, xte, yte) > _accuracy(oneshot, xte, yte) + 0.02


def test_gradual_follows_cubic_points_with_users_own_loop(digit_cnn, digits_batch):
    x, y = digits_batch
    model = frozen_copy(digit_cnn)
    sched = Gradual(start_step=0, end_step=20, frequency=5)
    pruner = GradualPruner(model, Magnitude(sparsity=0.8), sched)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for t in range(0, 25):  # the user's own loop
        if t:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
            opt.step()
        pruner.step(t)
        if t in (5, 10, 15, 20):
            assert abs(sparsity_of(model)["total"] - cubic_sparsity(t, 0.8, sched)) < 1e-4
    assert [t for t, _ in pruner.history] == [5, 10, 15, 20]
    assert abs(pruner.history[-1][1] - 0.8) < 1e-12


def test_gradual_with_builtin_loop_reaches_target(digit_cnn, digits_batch):
    x, y = digits_batch
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    model = prune_(digit_cnn, Magnitude(sparsity=0.75), schedule=Gradual(start_step=0, end_step=12, frequency=4),
                   train_fn=builtin_train_fn(batches))
    assert abs(sparsity_of(model)["total"] - 0.75) < 1e-4


def test_schedules_needing_training_refuse_without_train_fn(digit_cnn):
    with pytest.raises(NetshrinkError, match="train_fn"):
        prune_(digit_cnn, Magnitude(sparsity=0.5), schedule=Iterative(rounds=2))
    model = prune_(digit_cnn, Magnitude(sparsity=0.5), schedule=OneShot())
    assert abs(sparsity_of(model)["total"] - 0.5) < 1e-4
