"""NativeCNN (`netshrink.native.cnn`): small CNN chains run natively, against a float64 forward of the same model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.native.cnn import NativeCNN, native_available

needs_native = pytest.mark.skipif(not native_available(), reason="needs AVX-512 and a C++ compiler")


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


class Chain(nn.Module):
    """Odd sizes on purpose: channels not multiples of 16, odd widths before pooling, a Linear output of 21."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(20, 37, 5, padding=2), nn.MaxPool2d(2, 2), nn.ReLU(),
                                      nn.Conv2d(37, 8, 3, padding=0), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(8 * 1 * 4, 33), nn.ReLU(), nn.Linear(33, 21))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


@needs_native
def test_digit_cnn_and_its_cut_match_float64_at_every_batch_and_thread_count(digit_cnn):
    from netshrink.data import digits
    from netshrink.sparsity import structured_prune

    x, _ = digits("test")
    cut = structured_prune(digit_cnn, 0.5, example_inputs=(x[:2],))             # 16 / 32 / 64 filters, 128 neurons
    for model in (digit_cnn, cut):
        want = _reference(model, x[:33])
        for threads in (1, 2, 3):
            native = NativeCNN(model, (1, 28, 28), threads=threads)
            for batch in (1, 2, 33):                                          # split samples, and whole samples
                _close(native(x[:batch]), want[:batch])


@needs_native
def test_odd_shapes_padding_and_the_nchw_flatten_order():
    torch.manual_seed(0)
    model = Chain().eval()
    x = torch.randn(5, 3, 15, 25)                                           # conv3 output 1 x 4 after two pools
    want = _reference(model, x)
    for threads in (1, 2):
        _close(NativeCNN(model, (3, 15, 25), threads=threads)(x), want)


@needs_native
def test_the_model_is_left_unchanged_and_bad_input_is_named():
    torch.manual_seed(1)
    model = Chain().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    native = NativeCNN(model, (3, 15, 25))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(NetshrinkError, match=r"expected input \[batch, 3, 15, 25\]"):
        native(torch.randn(2, 3, 16, 25))


@needs_native
@pytest.mark.parametrize("model,match", [
    (nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 13 * 13, 2)), "stride-1"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 2)), "BatchNorm2d"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 13 * 13, 2)), "AvgPool2d"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), "must end with a Linear"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(26, 2)), "unflattened image"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(7, 2)), "a Linear of 7 inputs"),
])
def test_what_cannot_run_natively_is_refused_by_name(model, match):
    with pytest.raises(NetshrinkError, match=match):
        NativeCNN(model.eval(), (1, 28, 28))


def test_a_missing_kernel_source_is_named(tmp_path):
    from pathlib import Path

    from netshrink.native.build import build

    with pytest.raises(NetshrinkError, match="missing.cpp is missing"):
        build(Path(tmp_path) / "missing.cpp", where="test", fallback="nothing")


@needs_native
def test_the_module_wrapper_copies_and_follows_the_thread_count():
    import copy

    from netshrink.native.cnn import NativeCNNModule

    torch.manual_seed(3)
    model = Chain().eval()
    wrapped = NativeCNNModule(model, (3, 15, 25))
    x = torch.randn(2, 3, 15, 25)
    want = _reference(model, x)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            for threads in (1, 2):
                torch.set_num_threads(threads)
                _close(wrapped(x), want)
            assert sorted(wrapped._natives) == [1, 2]                         # one native runtime per count
            twin = copy.deepcopy(wrapped)
            assert twin._natives == {}                                          # the copy builds its own
            del wrapped
            _close(twin(x), want)
            assert sorted(twin._natives) == [2]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(NetshrinkError, match="stride-1"):
        NativeCNNModule(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 7 * 12, 2)), (3, 15, 25))
