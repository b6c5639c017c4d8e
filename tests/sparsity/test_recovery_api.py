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


def test_mean_pool_ignores_padding_like_a_float64_loop():
    from netshrink.sparsity.recovery import _attention_mask, mean_pool

    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    want = torch.stack([hidden[b, :int(mask[b].sum())].double().mean(0) for b in range(3)])
    assert torch.allclose(mean_pool(hidden, mask).double(), want, atol=1e-6)
    ids = torch.zeros(3, 5, dtype=torch.long)
    assert _attention_mask((ids, mask)) is mask and _attention_mask({"input_ids": ids, "attention_mask": mask}) is mask
    assert _attention_mask((ids,)) is None and _attention_mask(torch.randn(3, 5)) is None


class _TokenEncoder(torch.nn.Module):
    """A toy encoder with the (input_ids, attention_mask) -> [batch, tokens, hidden] signature of a sentence encoder."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(50, 16)
        self.mix = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return h + self.mix(h)


def test_relation_term_trains_the_pairwise_similarities_toward_the_teacher():
    from netshrink.sparsity.recovery import _pooled_terms, mean_pool

    teacher = _TokenEncoder(0)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 50, (16, 7), generator=gen)
        mask = (torch.arange(7) < torch.randint(2, 8, (16, 1), generator=gen)).long()
        batches.append((ids, mask))

    def relation_error(student: torch.nn.Module) -> float:
        with torch.no_grad():
            return sum(float(_pooled_terms(student(*b), teacher(*b), b, Distill(relation_weight=1.0))) for b in batches)

    assert relation_error(teacher) == 0.0                     # the term vanishes when student == teacher
    errors = {}
    for weight in (0.0, 10.0):
        student = _TokenEncoder(2)
        start = relation_error(student)
        distill(student, teacher, batches, Distill(steps=60, lr=1e-2, relation_weight=weight, pooled_weight=weight / 10,
                                                   block_weight=0.0, cosine_weight=0.0))
        errors[weight] = relation_error(student)
    assert errors[10.0] < 0.5 * start and errors[10.0] < errors[0.0]
    with torch.no_grad():    # and the pooled vectors themselves moved toward the teacher's
        b = batches[0]
        assert mean_pool(student(*b), b[1]).shape == (16, 16)


def test_relation_term_also_acts_on_already_pooled_sentence_vectors():
    """A sentence encoder (like the zoo's MiniLM wrapper) returns [batch, hidden]: the terms must use it as is."""
    from netshrink.sparsity.recovery import _pooled_terms

    class Pooled(torch.nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.inner = _TokenEncoder(seed)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.inner(ids, mask).mean(dim=1)

    teacher, gen = Pooled(0), torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 50, (16, 7), generator=gen), torch.ones(16, 7, dtype=torch.long)) for _ in range(4)]
    config = Distill(relation_weight=1.0)
    b = batches[0]
    with torch.no_grad():
        s, t = Pooled(2)(*b), teacher(*b)
        assert s.dim() == 2 and float(_pooled_terms(s, t, b, config)) > 0
    errors = {}
    for weight in (0.0, 10.0):
        student = Pooled(2)
        distill(student, teacher, batches, Distill(steps=60, lr=1e-2, relation_weight=weight, block_weight=0.0,
                                                   cosine_weight=0.0))
        with torch.no_grad():
            errors[weight] = sum(float(_pooled_terms(student(*x), teacher(*x), x, config)) for x in batches)
    assert errors[10.0] < errors[0.0]
