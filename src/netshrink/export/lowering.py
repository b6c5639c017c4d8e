"""What every exporter needs first: a traceable module with example inputs, and a plain float "twin" of a
compressed model (masks baked in, netshrink's quantized layers as float layers holding their dequantized weights)
plus the exact integer grids those layers held, so an exporter writes the very same grid instead of re-quantizing.
New compressed module types plug in with `register_lowering`."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from netshrink.errors import NetshrinkError
from netshrink.llm.packing import QuantizedWeight


def weight_key(w: Any) -> bytes:
    """A lookup key for a float32 weight in torch layout (to find which layer an exported tensor came from)."""
    arr = w.detach().float().numpy() if isinstance(w, torch.Tensor) else w
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return str(arr.shape).encode() + arr.tobytes()


class LogitsOnly(nn.Module):
    """A causal LM seen as input_ids -> logits (no cache), the shape ONNX and TorchScript want."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def unwrap(model: Any, batch: int = 2, seq_len: int = 16) -> tuple[nn.Module, tuple | None, list[str] | None, str | None]:
    """(traceable module, example inputs, input names, kind) for a ZooModel or a bare module."""
    if isinstance(model, nn.Module):
        return model, None, None, None
    module = getattr(model, "model", None)
    if not isinstance(module, nn.Module):
        raise NetshrinkError(f"cannot export a {type(model).__name__}; pass an nn.Module or a ZooModel", where="export")
    kind = getattr(model, "kind", None)
    inputs = tuple(model.example_inputs(batch=batch, seq_len=seq_len))
    if kind == "decoder":
        return LogitsOnly(module).eval(), inputs, ["input_ids"], kind
    if kind == "encoder":
        return module, inputs, ["input_ids", "attention_mask"], kind
    return module, inputs, None, kind


@dataclass
class LayerGrid:
    """The exact integer forms a compressed layer already holds, for exporters to write instead of re-quantizing:
    `int8` (codes [out, ...] int8, scales [out]) symmetric per channel, `int4` a group-wise grid of up to 4 bits,
    `act` a static input (scale, zero point) of signed int8 activation codes."""

    int8: tuple[np.ndarray, np.ndarray] | None = None
    int4: QuantizedWeight | None = None
    act: tuple[float, int] | None = None


Lowering = Callable[[nn.Module], tuple[nn.Module, LayerGrid]]
_LOWERINGS: dict[type, Lowering] = {}


def register_lowering(cls: type, fn: Lowering) -> None:
    """Teach exporters a compressed module type: `fn(module) -> (float module computing the same, its grids)`."""
    _LOWERINGS[cls] = fn


def _linear_like(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        if bias is not None:
            layer.bias.copy_(bias.float())
    return layer


def _lower_packed(module: nn.Module) -> tuple[nn.Module, LayerGrid]:
    qw = module.quantized_weight()
    grid = LayerGrid(int4=qw if qw.bits <= 4 else None)
    if qw.bits == 8 and qw.scales.shape[1] == 1 and bool((qw.zeros == 128).all()):
        grid.int8 = ((qw.codes.to(torch.int16) - 128).to(torch.int8).numpy(), qw.scales[:, 0].float().numpy())
    return _linear_like(module, qw.dequantize(), module.bias), grid


def _lower_int8(module: nn.Module) -> tuple[nn.Module, LayerGrid]:
    from netshrink.quant.modules import Int8Conv2d

    grid = LayerGrid(int8=(module.weight_int8.numpy().copy(), module.weight_scale.float().numpy().copy()))
    if module.mode == "static":
        if (getattr(module, "act_qmin", -128), getattr(module, "act_qmax", 127)) != (-128, 127):
            raise NetshrinkError(f"activation codes limited to [{module.act_qmin}, {module.act_qmax}] cannot be "
                                 f"expressed by int8 QuantizeLinear", where=getattr(module, "where", "int8 layer"))
        grid.act = (float(module.input_scale), int(module.input_zero_point))
    w = module.dequantized_weight()
    if isinstance(module, Int8Conv2d):
        conv = nn.Conv2d(w.shape[1], w.shape[0], module.kernel_size, stride=module.stride, padding=module.padding,
                         dilation=module.dilation, bias=module.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(w)
            if module.bias is not None:
                conv.bias.copy_(module.bias)
        return conv, grid
    return _linear_like(module, w, module.bias), grid


def _lower_fp8(module: nn.Module) -> tuple[nn.Module, LayerGrid]:
    return _linear_like(module, module.dequantized_weight(), module.bias), LayerGrid()


def _lower_cast(module: nn.Module) -> tuple[nn.Module, LayerGrid]:
    return copy.deepcopy(module.layer), LayerGrid()


def _builtin_lowerings() -> None:
    if _LOWERINGS:
        return
    from netshrink.llm.packed_linear import PackedLinear
    from netshrink.quant.modules import CastLayer, FP8Linear, Int8Conv2d, Int8Linear

    for cls, fn in ((PackedLinear, _lower_packed), (Int8Linear, _lower_int8), (Int8Conv2d, _lower_int8),
                    (FP8Linear, _lower_fp8), (CastLayer, _lower_cast)):
        register_lowering(cls, fn)


def bake_parametrizations(module: nn.Module) -> None:
    """Replace a parametrized tensor (e.g. weight = original * mask) by a plain parameter holding its value.

    torch's `remove_parametrizations` deletes the property from the parametrized class, which a deep copy shares
    with the original module; this changes only the given instance.
    """
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations.keys()}
    module.__class__ = type(module).__bases__[0]
    del module._modules["parametrizations"]
    for name, value in values.items():
        module._parameters[name] = nn.Parameter(value, requires_grad=False)


def float_twin(model: nn.Module, what: str = "ONNX") -> tuple[nn.Module, dict[bytes, LayerGrid]]:
    """A deep copy with masks baked in and compressed layers replaced by float layers computing the same, plus the
    exact grids those layers held, keyed by the float weight the exported file will hold (`weight_key`)."""
    _builtin_lowerings()
    twin = copy.deepcopy(model)
    grids: dict[bytes, LayerGrid] = {}
    replaced: list[str] = []
    for module in list(twin.modules()):  # bake pruning masks (and any parametrization) into plain tensors
        if parametrize.is_parametrized(module):
            bake_parametrizations(module)
    for name, module in list(twin.named_modules()):
        if any(name.startswith(r + ".") for r in replaced):
            continue
        lower = _LOWERINGS.get(type(module))
        if lower is not None:
            new, grid = lower(module)
            weight = getattr(new, "weight", None)
            if weight is not None:
                grids[weight_key(weight)] = grid
            parent, _, child = name.rpartition(".")
            if not name:
                twin = new
            else:
                setattr(twin.get_submodule(parent) if parent else twin, child, new)
            replaced.append(name)
        elif type(module).__module__.startswith(("netshrink.quant", "netshrink.sparsity", "netshrink.llm")) and \
                not list(module.children()):
            raise NetshrinkError(f"layer of type {type(module).__name__} cannot be expressed in {what}", where=name,
                                 hint="register a lowering with netshrink.export.lowering.register_lowering")
    for module in twin.modules():  # a float twin takes FP32 as it is: drop netshrink's cast hooks and compilation
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__module__", "").startswith("netshrink.quant")]:
                hooks.pop(key)
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    if getattr(twin, "_compiled_call_impl", None) is not None:
        twin._compiled_call_impl = None
    from netshrink.quant.native_encoder import unuse_native_encoders

    unuse_native_encoders(twin)  # the native int8 encoder forward would bypass the float layers just put in
    # nn.Module._apply directly: transformers forbids .float() on models it loaded from quantized (GGUF) files
    twin._apply(lambda t: t.float() if t.is_floating_point() else t)
    return twin.eval(), grids
