"""Structured pruning of CNNs/MLPs: the physically smaller model equals its masked twin on real inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity import Structured, apply_plan, plan_structured, prune_, structured_report
from netshrink.sparsity.masks import masked_modules
from netshrink.sparsity.structured.graph import channel_groups

from sparsity_helpers import frozen_copy, state_equal


def _twins(model, config, inputs, **kw):
    plan = plan_structured(model, config, inputs, **kw)
    cut, masked = frozen_copy(model), frozen_copy(model)
    apply_plan(cut, plan, physical=True)
    apply_plan(masked, plan, physical=False)
    return plan, cut.eval(), masked.eval()


@pytest.mark.parametrize("importance", ["l1", "l2", "group_l2", "bn_scale", "taylor", "activation"])
def test_digit_cnn_cut_equals_masked_on_real_digits(digit_cnn, digits_batch, importance):
    x, y = digits_batch
    calibration = [(x[:64],)] if importance == "activation" else [(x[:64], y[:64])]  # inputs vs (inputs, labels)
    plan, cut, masked = _twins(digit_cnn, Structured(ratio=0.5, importance=importance), (x[:2],),
                               calibration=calibration)
    with torch.no_grad():
        a, b, ref = cut(x), masked(x), digit_cnn(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, ref, atol=1e-3), "pruning changed nothing"
    assert [m.out_channels for m in cut.conv_layers if isinstance(m, nn.Conv2d)] == [16, 32, 64]
    assert cut.fc_layers[0].in_features == 64 * 9 and cut.fc_layers[0].out_features == 128
    report = structured_report(cut)
    assert report.mode == "physical" and report.params_after < 0.3 * report.params_before
    assert report.blocked == {"fc_layers.2": "reaches the model output"}
    assert cut._netshrink_record["conv_layers.0"]["kept_units"] == 16


def test_importance_choice_matters(digit_cnn, digits_batch):
    x, y = digits_batch
    acc = {}
    for imp in ("l1", "random", "activation"):
        model = prune_(digit_cnn, Structured(ratio=0.5, importance=imp), example_inputs=(x[:2],),
                       calibration=[(x[:128],)])
        with torch.no_grad():
            acc[imp] = float((model(x[128:]).argmax(1) == y[128:]).float().mean())
    assert acc["l1"] > acc["random"] + 0.1
    assert acc["activation"] > acc["random"] + 0.1


def test_activation_importance_matches_definition(digit_cnn, digits_batch):
    """Unit score = sum over its consumer positions of E[x_p^2] * ||W[:, p]||^2, checked in float64."""
    from netshrink.sparsity.structured.importance import activation_importance

    x, _ = digits_batch
    analysis = channel_groups(digit_cnn, (x[:2],))
    got = activation_importance(digit_cnn, analysis.groups, [(x[:100],), (x[100:200],)])
    feats = {}
    hook = digit_cnn.fc_layers[0].register_forward_pre_hook(lambda m, a: feats.setdefault("fc", []).append(a[0]))
    with torch.no_grad():
        digit_cnn(x[:100]), digit_cnn(x[100:200])
    hook.remove()
    flat = torch.cat(feats["fc"]).double()  # [200, 128 * 9]
    w = digit_cnn.fc_layers[0].weight.double()
    per_pos = flat.pow(2).mean(0) * w.pow(2).sum(0)
    expect = per_pos.view(128, 9).sum(1)
    torch.testing.assert_close(got["conv_layers.6"].double(), expect, rtol=1e-4, atol=1e-8)


class ResCat(nn.Module):
    """Residual add, BatchNorm, concatenation, depthwise conv and flatten: every coupling kind at once."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.dw, self.b3 = nn.Conv2d(14, 14, 3, padding=1, groups=14), nn.BatchNorm2d(14)
        self.fc1, self.fc2 = nn.Linear(14 * 4 * 4, 20), nn.Linear(20, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = self.b2(self.c2(y)) + y
        z = torch.cat([z, self.c3(z)], 1)
        z = nn.functional.adaptive_avg_pool2d(torch.relu(self.b3(self.dw(z))), 4)
        return self.fc2(torch.relu(self.fc1(torch.flatten(z, 1))))


def _res_cat() -> nn.Module:
    torch.manual_seed(0)
    model = ResCat()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.1, 1.0)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_residual_concat_depthwise_batchnorm_stay_consistent(digits_batch):
    model = _res_cat()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    analysis = channel_groups(model, (x,))
    names = {g.name: {s.module for s in g.slices} for g in analysis.groups}
    residual = next(v for v in names.values() if {"c1", "c2"} <= v)
    assert {"b1", "b2", "dw", "b3", "fc1"} <= residual
    for importance in ("l1", "bn_scale"):
        plan, cut, masked = _twins(model, Structured(ratio=0.5, importance=importance), (x,))
        with torch.no_grad():
            torch.testing.assert_close(cut(x), masked(x), rtol=1e-5, atol=1e-5)
        assert cut.c1.out_channels == cut.c2.out_channels == cut.b1.num_features == 4
        assert cut.dw.groups == cut.dw.out_channels == 4 + 3 and cut.fc1.in_features == 7 * 16
    assert plan.importance_used == {"c1+c2": "bn_scale", "c3": "bn_scale", "fc1": "l2 (no BatchNorm on this group)"}
    assert set(plan.blocked) == {"fc2"}


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 2
        return self.b(h)


def test_untraceable_model_names_the_op_and_falls_back_to_masks():
    torch.manual_seed(0)
    model = Untraceable()
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"not traceable at Untraceable.*fell back to masks"):
        pruned = prune_(model, Structured(ratio=0.5), example_inputs=(x,))
    report = structured_report(pruned)
    assert report.mode == "masks" and "not traceable" in report.reason and "Untraceable" in report.reason
    assert "forward" in report.reason or "sum" in report.reason or "control flow" in report.reason
    assert pruned.a.weight.shape == (8, 4) and int((pruned.a.weight.abs().sum(1) == 0).sum()) == 4
    assert list(masked_modules(pruned)) == ["a"]


class HardCoded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(-1, 64))


def test_forward_with_hard_coded_sizes_falls_back_to_masks():
    torch.manual_seed(0)
    model = HardCoded()
    x = torch.randn(2, 1, 4, 4)
    with pytest.warns(UserWarning, match=r"the cut model failed to run .*fell back to masks"):
        pruned = prune_(model, Structured(ratio=0.5), example_inputs=(x,))
    report = structured_report(pruned)
    assert report.mode == "masks", report.lines()
    assert pruned.conv.weight.shape == (4, 1, 3, 3)
    with torch.no_grad():
        pruned(x)


def test_zero_channels_is_refused_naming_the_layer(digit_cnn, digits_batch):
    before = frozen_copy(digit_cnn)
    with pytest.raises(NetshrinkError) as info:
        prune_(digit_cnn, Structured(ratio=0.5, per_group={"conv_layers.3": 1.0}),
               example_inputs=(digits_batch[0][:2],), inplace=True)
    assert info.value.where == "conv_layers.3" and "zero channels" in info.value.what
    with pytest.raises(NetshrinkError, match="outside"):
        prune_(digit_cnn, Structured(ratio=1.0), example_inputs=(digits_batch[0][:2],), inplace=True)
    with pytest.raises(NetshrinkError, match="example inputs"):
        prune_(digit_cnn, Structured(ratio=0.5))
    assert state_equal(before, digit_cnn)
    assert digit_cnn.conv_layers[0].out_channels == 32


def test_round_to_keeps_multiples(digit_cnn, digits_batch):
    model = prune_(digit_cnn, Structured(ratio=0.6, round_to=8), example_inputs=(digits_batch[0][:2],))
    assert [m.out_channels % 8 for m in model.conv_layers if isinstance(m, nn.Conv2d)] == [0, 0, 0]
    assert model.conv_layers[0].out_channels == 16  # 32 - floor(0.6 * 32) = 13 -> 16


def test_bias_compensation_keeps_twins_equal(digit_cnn, digits_batch):
    x, _ = digits_batch
    calibration = [(x[:128],)]
    for compensate in (False, True):
        config = Structured(ratio=0.5, importance="l1", compensate=compensate)
        plan, cut, masked = _twins(digit_cnn, config, (x[:2],), calibration=calibration)
        with torch.no_grad():
            a, b = cut(x[128:]), masked(x[128:])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert set(plan.bias_delta) == ({"fc_layers.0", "fc_layers.2"} if compensate else set())
    # the delta is the removed inputs' mean contribution: W[:, removed] @ E[x_removed], checked in float64
    feats = []
    hook = digit_cnn.fc_layers[2].register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    with torch.no_grad():
        digit_cnn(x[:128])
    hook.remove()
    gone = plan.removed["fc_layers.0"]
    w = digit_cnn.fc_layers[2].weight.double()
    expect = w[:, gone] @ feats[0].double()[:, gone].mean(0)
    torch.testing.assert_close(plan.bias_delta["fc_layers.2"].double(), expect, rtol=1e-4, atol=1e-6)
    assert torch.equal(digit_cnn.fc_layers[2].bias, frozen_copy(digit_cnn).fc_layers[2].bias)
