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


def _flat(c: int, h: int, w: int) -> int:
    return c * h * w


@needs_native
@pytest.mark.parametrize("name,model,shape", [
    # three convs, the last one not pooled, a two-Linear head (band, middle conv, split-K, head on thread 0)
    ("chain", Chain(), (3, 15, 25)),
    # two pooled convs: the band computes both, then split-K; one input channel and odd pooled widths (tails)
    ("two convs", nn.Sequential(nn.Conv2d(1, 20, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Conv2d(20, 70, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                                nn.Linear(_flat(70, 4, 6), 40)), (1, 17, 27)),
    # one conv straight into the Linears; the Linears after the first are too big for one thread (barriers)
    ("one conv, big head", nn.Sequential(nn.Conv2d(2, 33, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                         nn.Linear(_flat(33, 5, 6), 300), nn.ReLU(), nn.Linear(300, 250),
                                         nn.ReLU(), nn.Linear(250, 7)), (2, 11, 13)),
    # four convs, no pooling: several middle convs, each split between the threads
    ("four convs", nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 48, 3), nn.Conv2d(48, 64, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(64, 5, 1), nn.Flatten(), nn.Linear(_flat(5, 5, 4), 3)),
     (3, 9, 8)),
    # no convs at all: Linears split by output vectors
    ("linears only", nn.Sequential(nn.Flatten(), nn.Linear(60, 90), nn.ReLU(), nn.Linear(90, 17)), (1, 6, 10)),
])
def test_one_sample_split_between_threads_matches_float64(name, model, shape):
    """Batch 1 on 2-4 threads takes the split schedule (bands with halos, split-K, a head on one thread); more
    samples than threads take whole samples per thread. Both against float64, and 1 thread as well."""
    torch.manual_seed(7)
    model = model.eval()
    x = torch.randn(5, *shape)
    want = _reference(model, x)
    for threads in (1, 2, 3, 4):
        native = NativeCNN(model, shape, threads=threads)
        for batch in (1, 3, 5):
            _close(native(x[:batch]), want[:batch])
        _close(native(x[2:3]), want[2:3])                                       # any sample, same buffers


@needs_native
def test_ctypes_and_the_fast_call_path_agree_and_concurrent_callers_are_serialised(monkeypatch):
    import threading

    import netshrink.native.cnn as native_cnn

    torch.manual_seed(5)
    model = Chain().eval()
    x = torch.randn(8, 3, 15, 25)
    want = _reference(model, x)
    fast = NativeCNN(model, (3, 15, 25), threads=2)
    has_fast_call = native_cnn.fast_call() is not None                       # False where Python.h is missing
    monkeypatch.setattr(native_cnn, "fast_call", lambda: None)               # as on a machine without Python.h
    slow = NativeCNN(model, (3, 15, 25), threads=2)
    assert (fast._forward is not slow._forward) == has_fast_call
    assert torch.equal(fast(x[:1]), slow(x[:1])) and torch.equal(fast(x), slow(x))
    assert fast(x[:0]).shape == (0, 21)
    errors: list = []

    def hammer(i: int) -> None:
        for _ in range(200):
            got = fast(x[i: i + 1])
            if not torch.allclose(got.double(), want[i: i + 1], rtol=1e-4, atol=1e-4 * float(want.abs().max())):
                errors.append(i)
                return

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors


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


def test_an_extension_without_python_headers_is_refused_by_name(tmp_path, monkeypatch):
    import sysconfig
    from pathlib import Path

    from netshrink.native import build as native_build

    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    source = Path(native_build.__file__).with_name("call.cpp")
    with pytest.raises(NetshrinkError, match="Python's headers are not installed"):
        native_build.build_extension(source, "_netshrink_native_call", where="test", fallback="ctypes")
