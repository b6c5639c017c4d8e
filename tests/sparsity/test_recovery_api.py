"""Distillation recovery, the demo's `structured_prune`, and `prune_` dispatch."""
from __future__ import annotations

import pytest
import torch

from netshrink.errors import NetshrinkError
from netshrink.sparsity import Distill, Magnitude, Structured, distill, prune_, structured_prune
from netshrink.sparsity.masks import get_mask

from sparsity_helpers import frozen_copy, state_equal


def test_distillation_lowers_the_gap_and_leaves_teacher_alone(digit_cnn, digits_batch):
    x, _ = digits_batch
    before = frozen_copy(digit_cnn)
    student = prune_(digit_cnn, Structured(ratio=0.5), example_inputs=(x[:2],))
    batches = [(x[i:i + 64],) for i in range(0, 256, 64)]
    losses = distill(student, digit_cnn, batches, Distill(steps=40, lr=1e-3))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert state_equal(before, digit_cnn)
    assert all(p.requires_grad for p in digit_cnn.parameters())


def test_distillation_keeps_masks(digit_cnn, digits_batch):
    x, _ = digits_batch
    student = prune_(digit_cnn, Magnitude(sparsity=0.8))
    distill(student, digit_cnn, [(x[:64],)], Distill(steps=5, lr=1e-2))
    conv = student.conv_layers[3]
    assert bool((conv.parametrizations.weight.original[~get_mask(conv)] == 0).all())


def test_structured_prune_for_the_demo(digit_cnn, digits_batch):
    x, y = digits_batch
    plain = structured_prune(digit_cnn, 0.5, example_inputs=(x[:2],))
    recovered = structured_prune(digit_cnn, 0.5, example_inputs=(x[:2],), recovery_batches=[(x[:128],)],
                                 recovery_steps=30, recovery_lr=1e-3)
    assert plain.conv_layers[0].out_channels == recovered.conv_layers[0].out_channels == 16
    with torch.no_grad():
        ref = digit_cnn(x[128:])
        gap_plain = (plain(x[128:]) - ref).pow(2).mean()
        gap_rec = (recovered(x[128:]) - ref).pow(2).mean()
    assert gap_rec < gap_plain
    assert not recovered.training


def test_prune_rejects_unknown_config(digit_cnn):
    with pytest.raises(NetshrinkError, match="unknown pruning config"):
        prune_(digit_cnn, {"sparsity": 0.5})


def test_cached_teacher_gives_the_same_training(digit_cnn, digits_batch):
    x, _ = digits_batch
    student = prune_(digit_cnn, Structured(ratio=0.5), example_inputs=(x[:2],))
    a, b = frozen_copy(student), frozen_copy(student)
    batches = [(x[i:i + 64],) for i in range(0, 192, 64)]
    cached = distill(a, digit_cnn, batches, Distill(steps=7, lr=1e-3, cache_teacher=True))
    fresh = distill(b, digit_cnn, batches, Distill(steps=7, lr=1e-3, cache_teacher=False))
    assert cached == fresh and state_equal(a, b)


def test_distillation_leaves_frozen_parameters_untouched():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    student = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    first = student[0].weight.detach().clone()
    last = student[2].weight.detach().clone()
    batches = [(torch.randn(32, 8),) for _ in range(4)]
    distill(student, teacher, batches, Distill(steps=10, lr=1e-2, frozen=("0.*",)))
    assert torch.equal(student[0].weight, first)             # frozen by pattern
    assert not torch.equal(student[2].weight, last)          # trained
    assert student[0].weight.requires_grad and student[2].weight.requires_grad   # flags restored
    with pytest.raises(NetshrinkError, match="frozen"):
        distill(student, teacher, batches, Distill(steps=1, frozen=("*",)))


def test_learning_rate_schedule_warms_up_then_follows_the_cosine():
    import math

    from netshrink.sparsity.recovery import lr_factor

    plain = Distill(steps=40, lr=1.0)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                                           T_max=40)
    for step in range(40):   # without warm-up: exactly torch's CosineAnnealingLR
        assert math.isclose(lr_factor(step, plain), reference.get_last_lr()[0], rel_tol=1e-12, abs_tol=1e-15)
        reference.optimizer.step(), reference.step()
    warm = Distill(steps=40, lr=1.0, warmup=0.1)
    assert [round(lr_factor(s, warm), 6) for s in range(4)] == [round(f * 0.5 * (1 + math.cos(math.pi * s / 40)), 6)
                                                                 for s, f in enumerate((0.25, 0.5, 0.75, 1.0))]
    with pytest.raises(NetshrinkError, match="Distill.warmup"):
        distill(torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), [torch.randn(8, 3)], Distill(steps=4, warmup=1.0))
