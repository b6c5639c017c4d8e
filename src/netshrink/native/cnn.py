"""NativeCNN: a small float32 CNN's whole forward in one native call (cnn.cpp), for batch-1 latency.

Structured pruning makes a CNN's layers smaller, but at batch 1 a framework spends a fixed few microseconds per
operator and per thread hand-off, which a pruned model no longer hides behind arithmetic: the digit CNN with half
its filters removed (3.89x fewer FLOPs) ran only 1.9-2.5x faster than the original on 2 threads in eager PyTorch,
onnxruntime, OpenVINO and torch.compile. `NativeCNN(model, input_shape)` reads a chain of Conv2d (stride 1, square
kernel, zero padding) / ReLU / MaxPool2d(2) / flatten / Linear / Dropout (eval) from the model's graph and runs it
natively; anything else is refused by name. The model is read, never changed.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.native import tracing
from netshrink.native.build import available, build, build_extension

SOURCE = Path(__file__).with_name("cnn.cpp")


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """Build (if needed) and load the CNN library, with its C signatures declared."""
    lib = build(SOURCE, where="native CNN", fallback="the model itself (eager PyTorch) or onnxruntime",
                extra_flags=("-fopenmp",))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.nsc_create.restype = p
    lib.nsc_create.argtypes = [i]
    lib.nsc_add_conv.restype = None
    lib.nsc_add_conv.argtypes = [p, i, i, i, i, i, i, i, i, p, p]
    lib.nsc_add_linear.restype = None
    lib.nsc_add_linear.argtypes = [p, i, i, i, p, p]
    lib.nsc_finish.restype = None
    lib.nsc_finish.argtypes = [p]
    lib.nsc_forward.restype = None
    lib.nsc_forward.argtypes = [p, p, i, p]
    lib.nsc_destroy.restype = None
    lib.nsc_destroy.argtypes = [p]
    return lib


@lru_cache(maxsize=1)
def fast_call():
    """`forward(fn, handle, x, batch, y)` from the small extension in call.cpp (0.15 us a call against ctypes'
    0.45), or None where it cannot be built (no Python headers): then calls go through ctypes."""
    try:
        return build_extension(SOURCE.with_name("call.cpp"), "_netshrink_native_call", where="native call",
                               fallback="ctypes").forward
    except (NetshrinkError, ImportError, OSError):   # no headers, no compiler, or a library this Python rejects
        return None


def native_available() -> bool:
    """True when this CPU has AVX-512 and the library builds."""
    return available(load_library)


def _pad16(t: torch.Tensor, dim: int) -> torch.Tensor:
    pad = [0, 0] * (t.ndim - 1 - dim) + [0, (-t.shape[dim]) % 16]
    return F.pad(t, pad)


def _chain(model: nn.Module) -> list[tuple[str, object]]:
    """The model's graph as a list of (name, module or op) in execution order; refuses anything but a chain."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001  (any tracing failure: name it)
        raise NetshrinkError(f"cannot trace the model: {type(exc).__name__}: {exc}", where="NativeCNN") from None
    steps, previous = [], None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            previous = node if node.op == "placeholder" else previous
            continue
        if len(node.all_input_nodes) != 1 or node.all_input_nodes[0] is not previous:
            raise NetshrinkError("the graph is not a single chain of layers", where=node.name,
                                 hint="NativeCNN runs Conv2d / ReLU / MaxPool2d / flatten / Linear chains")
        if node.op == "call_module":
            steps.append((node.target, model.get_submodule(node.target)))
        elif node.op == "call_method" and node.target in ("flatten", "view", "reshape", "relu"):
            steps.append((node.name, node.target))
        elif node.op == "call_function" and node.target in (torch.flatten, F.relu, torch.relu):
            steps.append((node.name, "relu" if node.target in (F.relu, torch.relu) else "flatten"))
        else:
            raise NetshrinkError(f"unsupported operation {node.target}", where=node.name,
                                 hint="NativeCNN runs Conv2d / ReLU / MaxPool2d / flatten / Linear chains")
        previous = node
    return steps


class NativeCNN:
    """A Conv2d / ReLU / MaxPool2d(2) / flatten / Linear chain run natively (float32, NHWC inside).

    `input_shape` is one sample's (channels, height, width). Call it with [batch, *input_shape]; it returns the last
    Linear's output. It holds its own copy of the weights.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], threads: int | None = None) -> None:
        self.input_shape = tuple(int(d) for d in input_shape)
        self.threads = threads or torch.get_num_threads()
        self.lib = load_library()
        self.keep: list[torch.Tensor] = []
        self.layers: list[dict] = []
        c, h, w = self.input_shape
        flat: int | None = None      # features after flatten
        nhwc = None                  # (c, h, w) of the conv output that was flattened
        for name, step in _chain(model):
            last = self.layers[-1] if self.layers else None
            if isinstance(step, nn.Conv2d):
                if flat is not None:
                    raise NetshrinkError("a convolution after flatten", where=name)
                k, pad = step.kernel_size, step.padding
                if not (step.stride == (1, 1) and step.dilation == (1, 1) and step.groups == 1 and k[0] == k[1]
                        and isinstance(pad, tuple) and pad[0] == pad[1] and step.padding_mode == "zeros"):
                    raise NetshrinkError("only stride-1, square, ungrouped, zero-padded convolutions run natively",
                                         where=name)
                if step.in_channels != c:
                    raise NetshrinkError(f"expects {step.in_channels} channels, gets {c}", where=name)
                self.layers.append({"kind": "conv", "name": name, "module": step, "cin": c, "h": h, "w": w,
                                    "k": k[0], "pad": pad[0], "pool": 0, "relu": 0})
                c, h, w = step.out_channels, h + 2 * pad[0] - k[0] + 1, w + 2 * pad[0] - k[0] + 1
            elif isinstance(step, (nn.ReLU,)) or step == "relu":
                if last is None or last["relu"]:
                    raise NetshrinkError("a ReLU with no layer before it to fuse into", where=name)
                last["relu"] = 1
            elif isinstance(step, nn.MaxPool2d):
                if not (last is not None and last["kind"] == "conv" and not last["pool"] and
                        step.kernel_size in (2, (2, 2)) and step.stride in (2, (2, 2)) and step.padding in (0, (0, 0))
                        and step.dilation in (1, (1, 1)) and not step.ceil_mode):
                    raise NetshrinkError("only MaxPool2d(2, 2) right after a convolution runs natively", where=name)
                last["pool"] = 1
                h, w = h // 2, w // 2
            elif isinstance(step, nn.Flatten) or step in ("flatten", "view", "reshape"):
                if flat is None:
                    nhwc, flat = (c, h, w), c * h * w
            elif isinstance(step, nn.Dropout):
                continue
            elif isinstance(step, nn.Linear):
                features = flat if flat is not None else None
                if features is None or step.in_features != features:
                    raise NetshrinkError(f"a Linear of {step.in_features} inputs where the chain gives "
                                         f"{features if features is not None else 'an unflattened image'}", where=name)
                self.layers.append({"kind": "linear", "name": name, "module": step, "nhwc": nhwc, "relu": 0})
                flat, nhwc = step.out_features, None
            else:
                raise NetshrinkError(f"{type(step).__name__ if isinstance(step, nn.Module) else step} does not run "
                                     "natively", where=name, hint="NativeCNN runs Conv2d / ReLU / MaxPool2d / "
                                     "flatten / Linear chains")
        if not self.layers or self.layers[-1]["kind"] != "linear":
            raise NetshrinkError("the chain must end with a Linear", where="NativeCNN")
        self.out_features = flat
        self._handle = self._build()
        call = fast_call()
        self._forward = (self.lib.nsc_forward if call is None else
                         partial(call, ctypes.cast(self.lib.nsc_forward, ctypes.c_void_p).value))

    def _build(self) -> int:
        handle = self.lib.nsc_create(self.threads)
        for layer in self.layers:
            m = layer["module"]
            with torch.no_grad():
                bias = m.bias.detach().float() if m.bias is not None else torch.zeros(m.weight.shape[0])
                bias = _pad16(bias, 0).contiguous()
                if layer["kind"] == "conv":
                    w = m.weight.detach().float().permute(2, 3, 1, 0)              # [k, k, cin, cout]
                    w = _pad16(w, 3).contiguous()
                    self.lib.nsc_add_conv(handle, layer["cin"], m.out_channels, layer["k"], layer["pad"],
                                          layer["h"], layer["w"], layer["pool"], layer["relu"], w.data_ptr(),
                                          bias.data_ptr())
                else:
                    w = m.weight.detach().float()                                   # [out, in]
                    if layer["nhwc"] is not None:                                   # NCHW flatten order -> NHWC
                        c, h, ww = layer["nhwc"]
                        w = w.view(-1, c, h, ww).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
                    w = _pad16(w.t(), 1).contiguous()                               # [in, out padded]
                    self.lib.nsc_add_linear(handle, m.in_features, m.out_features, layer["relu"], w.data_ptr(),
                                            bias.data_ptr())
            self.keep += [w, bias]
        self.lib.nsc_finish(handle)
        return handle

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # At batch 1 the pruned digit CNN's forward is ~12 us, so this path is kept to a few cheap checks (~1.2 us):
        # a 4-d shape is the only one whose [1:] equals the 3-tuple; calls from several threads are serialised in
        # the native code (it owns the activation buffers), which runs without the GIL.
        if x.shape[1:] != self.input_shape:
            raise NetshrinkError(f"expected input [batch, {', '.join(map(str, self.input_shape))}], got "
                                 f"{list(x.shape)}", where="NativeCNN")
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.detach().float().contiguous()
        batch = x.shape[0]
        y = torch.empty(batch, self.out_features)
        if batch:
            self._forward(self._handle, x.data_ptr(), batch, y.data_ptr())
        return y

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            self.lib.nsc_destroy(handle)
            self._handle = None


class NativeCNNModule(nn.Module):
    """`model` as an nn.Module whose forward runs through NativeCNN (one per thread count, built on first use) when
    it can: no autograd, no tracing or export, inputs of `input_shape`. Anything else runs `model` itself, so the
    module saves, evaluates, exports and trains like `model` (its state dict is `model.*`)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model
        self.input_shape = tuple(int(d) for d in input_shape)
        # built now so that what cannot run natively is refused here, by name; kept for 1-thread calls
        self._natives: dict[int, NativeCNN] = {1: NativeCNN(model, self.input_shape, threads=1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grads = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.model.parameters()))
        if tracing() or grads or x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            return self.model(x)
        threads = torch.get_num_threads()
        if threads not in self._natives:
            self._natives[threads] = NativeCNN(self.model, self.input_shape, threads=threads)
        return self._natives[threads](x)

    def __getstate__(self) -> dict:  # a copy (or pickle) builds its own native handles on first use
        state = self.__dict__.copy()
        state["_natives"] = {}
        return state
