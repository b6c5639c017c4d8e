"""Bad input to quantize_ / prepare_qat, beyond test_api: the layer with a NaN / Inf weight or bias is named before
any calibration (every config), a failed call leaves the input model as it was (also in place), config patterns
that match no layer are errors naming the config field, and a calibration batch with no rows says so."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.quant.api import quant_report, quantize_
from netshrink.quant.configs import BF16, FP8, FP16, Int8Dynamic, Int8Static
from netshrink.quant.modules import CastLayer, Int8Conv2d, Int8Linear
from netshrink.quant.qat import QATConfig, _QATLayer, prepare_qat

from test_api import _mlp  # the same small MLP as the API tests

CONFIGS = [Int8Dynamic(), Int8Static(), BF16(), FP16(backend="eager"), FP8()]
IDS = ["Int8Dynamic", "Int8Static", "BF16", "FP16", "FP8"]


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _named() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(OrderedDict(fc=nn.Linear(8, 8), act=nn.ReLU()))
    return nn.Sequential(OrderedDict(fc1=nn.Linear(8, 8), block=block, head=nn.Linear(8, 2))).eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        torch.allclose(before[k].double(), v.double(), rtol=0, atol=0, equal_nan=True) for k, v in after.items())


def _quantize(model: nn.Module, config, **kwargs) -> nn.Module:
    calibration = [torch.randn(4, 32)] if isinstance(config, Int8Static) else None
    return quantize_(model, config, calibration=calibration, **kwargs)


# ---- NaN / Inf weights and biases: named at their own layer, before calibration, for every config -------------------
def test_static_nan_weight_names_its_own_layer_not_the_next_calibrated_one():
    bad = _mlp()
    bad[0].weight.data[3, 1] = float("nan")
    with pytest.raises(NetshrinkError, match=r"^0: weight contains NaN or Inf \(fix or retrain the layer first\)$"):
        quantize_(bad, Int8Static(), calibration=[torch.randn(4, 32)])


def test_static_nan_conv_weight_is_named_before_calibration():
    bad = _cnn()
    bad[0].weight.data[0, 0, 0, 0] = float("inf")
    with pytest.raises(NetshrinkError, match=r"^0: weight contains NaN or Inf"):
        quantize_(bad, Int8Static(), calibration=[torch.randn(2, 3, 6, 6)])


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_nan_weight_is_an_error_for_every_config(config):
    bad = _mlp()
    bad[2].weight.data[0, 0] = float("nan")
    with pytest.raises(NetshrinkError, match=r"^2: weight contains NaN or Inf"):
        _quantize(bad, config)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_inf_bias_is_an_error_for_every_config(config):
    bad = _mlp()
    bad[2].bias.data[5] = float("-inf")
    with pytest.raises(NetshrinkError, match=r"^2: bias contains NaN or Inf"):
        _quantize(bad, config)


def test_whole_model_cast_checks_every_cast_layer_but_not_skipped_ones():
    bad = _mlp()
    bad[3].weight.data[0] = float("nan")                         # the LayerNorm: cast to BF16 with the rest
    with pytest.raises(NetshrinkError, match=r"^3: weight contains NaN or Inf"):
        quantize_(bad, BF16())
    kept = quantize_(bad, BF16(skip=("3",)))                      # left in FP32: not this call's business
    assert isinstance(kept[3], CastLayer) and kept[3].layer.weight.dtype == torch.float32


def test_bf16_override_layer_is_checked():
    bad = _mlp()
    bad[4].bias.data[0] = float("nan")
    with pytest.raises(NetshrinkError, match=r"^4: bias contains NaN or Inf"):
        quantize_(bad, Int8Dynamic(overrides={"4": BF16()}))
    assert isinstance(quantize_(bad, Int8Dynamic(skip=("4",)))[0], Int8Linear)


def test_prepare_qat_nan_weight_names_its_own_layer():
    bad = _mlp()
    bad[0].weight.data[0, 0] = float("nan")
    with pytest.raises(NetshrinkError, match=r"^0: weight contains NaN or Inf"):
        prepare_qat(bad, QATConfig(), calibration=torch.randn(4, 32))
    bad = _mlp()
    bad[2].bias.data[0] = float("inf")
    with pytest.raises(NetshrinkError, match=r"^2: bias contains NaN or Inf"):
        prepare_qat(bad, QATConfig(), calibration=torch.randn(4, 32))


# ---- a failed call leaves the input model as it was ----------------------------------------------------------------
@pytest.mark.parametrize("inplace", [False, True])
def test_failed_static_calibration_leaves_the_model_unfolded(inplace):
    model = _cnn()
    before = _state(model)
    bn, conv_bias = model[1], model[0].bias
    x = torch.randn(2, 3, 6, 6)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NetshrinkError, match="calibration activations contain NaN"):
        quantize_(model, Int8Static(), calibration=[x], inplace=inplace)
    assert model[1] is bn and model[0].bias is conv_bias and _same(model, before)
    assert quant_report(model) is None and not getattr(model, "_netshrink_record", None)
    q = quantize_(model, Int8Static(), calibration=[torch.randn(2, 3, 6, 6)], inplace=inplace)   # still usable
    assert quant_report(q).folded == ["0"] and isinstance(q[0], Int8Conv2d)


def test_failed_inplace_call_on_a_conv_without_bias_restores_no_bias():
    model = _cnn()
    model[0] = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    model[6].weight.data[0, 0] = float("nan")
    before = _state(model)
    with pytest.raises(NetshrinkError, match=r"^6: weight contains NaN"):
        quantize_(model, Int8Dynamic(), inplace=True)
    assert model[0].bias is None and isinstance(model[1], nn.BatchNorm2d) and _same(model, before)


def test_failed_inplace_nan_weight_leaves_the_model_as_it_was():
    model = _cnn()
    model.train()
    model[6].bias.data[0] = float("nan")
    before = _state(model)
    for config in (Int8Static(), Int8Dynamic(), BF16(), FP16(backend="eager"), FP8()):
        with pytest.raises(NetshrinkError, match=r"^6: bias contains NaN or Inf"):
            quantize_(model, config, calibration=torch.randn(2, 3, 6, 6), inplace=True)
        assert isinstance(model[1], nn.BatchNorm2d) and _same(model, before) and model.training
        assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("inplace", [False, True])
def test_failed_prepare_qat_leaves_the_model_as_it_was(inplace):
    model = _cnn()
    before = _state(model)
    x = torch.randn(2, 3, 6, 6)
    x[1] = float("inf")
    with pytest.raises(NetshrinkError, match="calibration activations contain NaN or Inf"):
        prepare_qat(model, QATConfig(), calibration=x, inplace=inplace)
    assert isinstance(model[1], nn.BatchNorm2d) and _same(model, before)
    assert not any(isinstance(m, _QATLayer) for m in model.modules())


def test_prepare_qat_never_reached_swaps_no_layer_in_place():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x)

    model = Branchy()
    with pytest.raises(NetshrinkError, match=r"^unused: calibration never reached this layer"):
        prepare_qat(model, QATConfig(), calibration=torch.randn(3, 4), inplace=True)
    assert type(model.a) is nn.Linear and type(model.unused) is nn.Linear


# ---- patterns that match no layer ------------------------------------------------------------------------------------
def test_skip_pattern_that_matches_nothing_is_an_error_naming_the_field():
    with pytest.raises(NetshrinkError, match=r"^Int8Dynamic\.skip\[0\]: pattern 'fc\*' matches no layer of this model "
                                             r"\(layers look like: 0, 2, 3, 4, \.\.\.\)$"):
        quantize_(_mlp(), Int8Dynamic(skip=("fc*",)))
    with pytest.raises(NetshrinkError, match=r"^Int8Dynamic\.skip\[1\]: pattern 'fc3' matches no layer of this model "
                                             r"\(did you mean 'fc1'\?\)$"):
        quantize_(_named(), Int8Dynamic(skip=("head", "fc3")))


@pytest.mark.parametrize("config", [Int8Static(skip=("nope",)), BF16(skip=("nope",)), FP16(skip=("nope",)),
                                    FP8(skip=("nope",))], ids=["Int8Static", "BF16", "FP16", "FP8"])
def test_every_config_checks_its_skip_patterns(config):
    with pytest.raises(NetshrinkError, match=rf"^{type(config).__name__}\.skip\[0\]: pattern 'nope' matches no layer"):
        _quantize(_mlp(), config)


def test_override_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(NetshrinkError, match=r"^Int8Dynamic\.overrides\['fc2'\]: pattern 'fc2' matches no layer"
                                             r".*did you mean 'fc1'"):
        quantize_(_named(), Int8Dynamic(overrides={"head": None, "fc2": BF16()}))
    with pytest.raises(NetshrinkError, match=r"^Int8Static\.overrides\['9'\]: pattern '9' matches no layer"):
        quantize_(_mlp(), Int8Static(overrides={"9": None}), calibration=torch.randn(2, 32))


def test_a_pattern_naming_a_container_says_how_to_select_its_layers():
    with pytest.raises(NetshrinkError, match=r"^BF16\.skip\[0\]: pattern 'block' matches no layer of this model "
                                             r"\(did you mean 'block\.\*'\?"):
        quantize_(_named(), BF16(skip=("block",)))


def test_qat_skip_pattern_that_matches_nothing_is_an_error():
    model = _mlp()
    with pytest.raises(NetshrinkError, match=r"^QATConfig\.skip\[0\]: pattern 'lm_head' matches no layer"):
        prepare_qat(model, QATConfig(skip=("lm_head",)), calibration=torch.randn(2, 32), inplace=True)
    assert type(model[0]) is nn.Linear


def test_patterns_that_select_layers_still_work():
    q = quantize_(_named(), Int8Dynamic(skip=("block.*", "*head"), overrides={"fc?": BF16()}))
    assert isinstance(q.fc1, CastLayer) and type(q.block.fc) is nn.Linear and type(q.head) is nn.Linear
    q = quantize_(_mlp(), Int8Static(skip=("[24]",)), calibration=torch.randn(4, 32))
    assert isinstance(q[0], Int8Linear) and type(q[2]) is nn.Linear and type(q[4]) is nn.Linear
    q = quantize_(_cnn(), Int8Dynamic(skip=("1",)))               # the BatchNorm (folded away) is a layer too
    assert isinstance(q[0], Int8Conv2d)
    qat = prepare_qat(_named(), QATConfig(skip=("block.fc",)), calibration=torch.randn(2, 8))
    assert isinstance(qat.fc1, _QATLayer) and type(qat.block.fc) is nn.Linear


# ---- calibration batches with no rows --------------------------------------------------------------------------------
def test_zero_row_calibration_batch_says_it_is_empty():
    with pytest.raises(NetshrinkError, match=r"^quantize_: the calibration set is empty: its one batch has 0 rows"):
        quantize_(_mlp(), Int8Static(), calibration=torch.empty(0, 32))
    with pytest.raises(NetshrinkError, match=r"^quantize_: the calibration set is empty: all 2 batches have 0 rows"):
        quantize_(_mlp(), Int8Static(), calibration=[torch.empty(0, 32), (torch.empty(0, 32),)])
    with pytest.raises(NetshrinkError, match=r"^prepare_qat: the calibration set is empty: its one batch has 0 rows"):
        prepare_qat(_mlp(), QATConfig(), calibration=torch.empty(0, 32))


def test_empty_batches_among_real_ones_are_left_out():
    x = torch.randn(8, 32)
    with_empty = quantize_(_mlp(), Int8Static(), calibration=[torch.empty(0, 32), x, torch.empty(0, 32)])
    plain = quantize_(_mlp(), Int8Static(), calibration=[x])
    assert torch.equal(with_empty(x), plain(x))
    qat = prepare_qat(_mlp(), QATConfig(), calibration=[x, torch.empty(0, 32)])
    assert torch.equal(qat[0].input_step, prepare_qat(_mlp(), QATConfig(), calibration=x)[0].input_step)
