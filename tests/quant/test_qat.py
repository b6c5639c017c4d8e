"""QAT: STE / LSQ gradients, convert to exact integer layers, and the digit-CNN claims (small epochs)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.quant.api import quantize_
from netshrink.quant.configs import Int8Static
from netshrink.quant.modules import Int8Conv2d, Int8Linear, reference_mode
from netshrink.quant.qat import QATConfig, convert, lsq_quantize, prepare_qat, round_ste, train_qat


def test_straight_through_and_lsq_gradients():
    v = torch.tensor([0.2, 1.7, -2.6], requires_grad=True)
    round_ste(v).sum().backward()
    assert v.grad.tolist() == [1.0, 1.0, 1.0]
    x = torch.tensor([0.26, 5.0, -0.74], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = lsq_quantize(x, s, -2, 1)
    assert y.tolist() == [0.5, 0.5, -0.5]                  # codes 1 (0.52 -> 1), clamp at 1, -1.48 -> -1
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0]              # clamped element gets no gradient (STE inside range)
    # LSQ: d/ds of round(v/s)*s is round(v/s) - v/s inside the range, qmax (or qmin) outside; scaled by g
    g = 1 / (3 * 1) ** 0.5
    expected = ((1 - 0.52) + 1 + (-1 + 1.48)) * g
    assert s.grad.item() == pytest.approx(expected, rel=1e-5)


def test_convert_holds_the_learned_codes_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(16, 2, 6, 6)
    qat = prepare_qat(model, QATConfig(weight_bits=4, act_bits=4), calibration=x)
    train_qat(qat, (x, torch.randint(0, 3, (16,))), epochs=2, lr=1e-2, batch_size=8)
    fake = qat(x)
    real = convert(qat)
    assert isinstance(real[0], Int8Conv2d) and isinstance(real[3], Int8Linear)
    assert int(real[0].weight_int8.abs().max()) <= 7                # 4-bit codes held in int8
    assert real[3].act_qmin == 0 and real[3].act_qmax == 15         # ReLU output: unsigned 4-bit codes
    assert torch.allclose(real(x), fake, atol=1e-4)
    with reference_mode(real):
        assert torch.allclose(real(x), fake, atol=1e-4)


def test_user_training_step_hook_and_errors():
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    qat = prepare_qat(model, calibration=x)
    calls = []

    def step(m, batch, optimizer):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        calls.append(1)
        return loss

    train_qat(qat, [(x, y), (x, y)], epochs=1, train_step=step)
    assert len(calls) == 2
    with pytest.raises(NetshrinkError, match="out of range"):
        QATConfig(weight_bits=1)
    with pytest.raises(NetshrinkError, match="needs calibration"):
        prepare_qat(model)
    with pytest.raises(NetshrinkError, match="no QAT layers"):
        convert(model)


@pytest.fixture(scope="module")
def finetuned_digits():
    """The zoo digit CNN fine-tuned on the sklearn-digits training split (FP32), plus the splits."""
    from netshrink import data, zoo

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = zoo.load("digit-cnn").model
    x_train, y_train = data.digits("train")
    x_test, y_test = data.digits("test")
    train_qat(model, (x_train, y_train), epochs=2, lr=1e-3)
    return model, (x_train, y_train), (x_test, y_test)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_qat_int8_at_least_as_accurate_as_ptq_int8(finetuned_digits):
    model, train, test = finetuned_digits
    calibration = train[0][:256]
    ptq = _accuracy(quantize_(model, Int8Static(), calibration=calibration), *test)
    qat = prepare_qat(model, QATConfig(weight_bits=8, act_bits=8), calibration=calibration)
    train_qat(qat, train, epochs=1, lr=1e-4)
    assert _accuracy(convert(qat), *test) >= ptq


@pytest.mark.slow
def test_low_bit_qat_recovers_what_ptq_loses(finetuned_digits):
    model, train, test = finetuned_digits
    fp32 = _accuracy(model, *test)
    calibration = train[0][:256]
    results = {}
    for bits in ((4, 4), (3, 3), (2, 8)):
        granularity = "tensor" if bits == (4, 4) else "channel"
        config = QATConfig(weight_bits=bits[0], act_bits=bits[1], weight_granularity=granularity)
        prepared = prepare_qat(model, config, calibration=calibration)
        ptq = _accuracy(convert(prepared), *test)                # min-max grid, no training: PTQ at these bits
        train_qat(prepared, train, epochs=2, lr=1e-3)
        results[bits] = (ptq, _accuracy(convert(prepared), *test))
    # INT4 (weights per tensor, activations 4-bit): this easy task loses little even without training; QAT holds it
    assert results[(4, 4)][1] >= fp32 - 0.01
    # below 4 bits PTQ loses accuracy and QAT wins it back
    assert results[(3, 3)][1] > results[(3, 3)][0] and results[(3, 3)][1] >= fp32 - 0.01
    assert results[(2, 8)][0] < fp32 - 0.2 and results[(2, 8)][1] >= fp32 - 0.08, results
