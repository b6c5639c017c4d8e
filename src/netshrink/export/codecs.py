"""The built-in layer codecs: dense Linear/Conv layers (possibly pruned, N:M sparse or fake-quantized, possibly
with changed shapes after structured pruning) and netshrink's packed low-bit Linear."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.export.registry import Codec, Tensors, codec_for, register_codec
from netshrink.export.weight_layout import decode_weight, encode_weight

_CONV = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}
_LAYOUTS = ("dense", "nm", "int")


def _split(tensors: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _weight_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    w = meta.get("weight")
    if not isinstance(w, dict) or w.get("layout") not in _LAYOUTS:
        raise NetshrinkError("manifest describes an unknown weight layout", where=where)
    return w


def encode_dense(module: nn.Module, record: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
    """A Linear or Conv layer: its constructor arguments, its (effective, masked) weight in the most compact exact
    layout, and its bias."""
    wt, wmeta = encode_weight(module.weight, record)
    tensors = {f"weight.{k}": v for k, v in wt.items()}
    meta: dict[str, Any] = {"weight": wmeta, "bias": module.bias is not None}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().contiguous()
    if isinstance(module, nn.Linear):
        meta.update(kind="Linear", in_features=module.in_features, out_features=module.out_features)
    else:
        meta.update(kind=type(module).__name__ if type(module).__name__ in _CONV else
                    [k for k, c in _CONV.items() if isinstance(module, c)][0],
                    in_channels=module.in_channels, out_channels=module.out_channels,
                    kernel_size=list(module.kernel_size), stride=list(module.stride),
                    padding=module.padding if isinstance(module.padding, str) else list(module.padding),
                    dilation=list(module.dilation), groups=module.groups, padding_mode=module.padding_mode)
    return tensors, meta


def decode_dense(tensors: Tensors, meta: dict[str, Any]) -> nn.Module:
    """Rebuild the layer on the meta device and assign the stored tensors (keeping their dtype)."""
    kind = meta.get("kind")
    if kind == "Linear":
        module = nn.Linear(meta["in_features"], meta["out_features"], bias=meta["bias"], device="meta")
    elif kind in _CONV:
        module = _CONV[kind](meta["in_channels"], meta["out_channels"], meta["kernel_size"], stride=meta["stride"],
                             padding=meta["padding"] if isinstance(meta["padding"], str) else tuple(meta["padding"]),
                             dilation=meta["dilation"], groups=meta["groups"], bias=meta["bias"],
                             padding_mode=meta["padding_mode"], device="meta")
    else:
        raise NetshrinkError(f"unknown dense layer kind {kind!r}", where="manifest")
    state = {"weight": decode_weight(_split(tensors, "weight."), _weight_meta(meta, kind))}
    if meta["bias"]:
        state["bias"] = tensors["bias"]
    module.load_state_dict(state, assign=True)
    return module


register_codec(Codec("dense", (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d), encode_dense, decode_dense))


def _register_packed_linear() -> None:
    """netshrink.llm's PackedLinear: its packed codes, scales and zeros are stored as they are."""
    from netshrink.llm.packed_linear import PackedLinear

    def encode(module: PackedLinear, record: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        meta = {"in_features": module.in_features, "out_features": module.out_features, "bits": module.bits,
                "group_size": module.group_size, "bias": module.bias is not None}
        return tensors, meta

    def decode(tensors: Tensors, meta: dict[str, Any]) -> nn.Module:
        module = PackedLinear(meta["in_features"], meta["out_features"], meta["bits"], meta["group_size"],
                              bias=meta["bias"])
        module.load_state_dict(tensors, strict=True, assign=True)
        return module

    register_codec(Codec("llm.packed_linear", (PackedLinear,), encode, decode))


_register_packed_linear()


def _zeroed(layer: nn.Module) -> nn.Module:
    """A stand-in float layer of the right shape (zeros: cheap to quantize; its values are overwritten)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    return layer


def _register_quant_modules() -> None:
    """netshrink.quant's int8 / FP8 / cast layers: their integer (or FP8) buffers are stored as they are; a layer
    is rebuilt around a zero float stand-in of the right shape, then its buffers are loaded over it."""
    from netshrink.quant.modules import CastLayer, FP8Linear, Int8Conv2d, Int8Linear

    def encode_int8(module: nn.Module, record: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        meta: dict[str, Any] = {"mode": module.mode, "bias": module.bias is not None, "where": module.where,
                                "shape": list(module.weight_int8.shape)}
        if hasattr(module, "act_qmin"):
            meta["act_range"] = [int(module.act_qmin), int(module.act_qmax)]
        if isinstance(module, Int8Conv2d):
            meta.update(kind="conv2d", kernel_size=list(module.kernel_size), stride=list(module.stride),
                        padding=list(module.padding), dilation=list(module.dilation))
        else:
            meta["kind"] = "linear"
        return tensors, meta

    def decode_int8(tensors: Tensors, meta: dict[str, Any]) -> nn.Module:
        shape = meta["shape"]
        stand_in_range = (torch.tensor(0.0), torch.tensor(1.0)) if meta["mode"] == "static" else None
        if meta["kind"] == "conv2d":
            conv = nn.Conv2d(shape[1], shape[0], meta["kernel_size"], stride=meta["stride"],
                             padding=tuple(meta["padding"]), dilation=meta["dilation"], bias=meta["bias"],
                             device="meta").to_empty(device="cpu")
            module = Int8Conv2d(_zeroed(conv), mode=meta["mode"], input_range=stand_in_range, where=meta["where"])
        else:
            linear = nn.Linear(shape[1], shape[0], bias=meta["bias"], device="meta").to_empty(device="cpu")
            module = Int8Linear(_zeroed(linear), mode=meta["mode"], input_range=stand_in_range, where=meta["where"])
        module.load_state_dict(tensors, strict=True)
        if "act_range" in meta:
            module.act_qmin, module.act_qmax = meta["act_range"]
        return module

    def encode_fp8(module: nn.Module, record: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        return tensors, {"fmt": module.fmt, "compute_dtype": str(module.compute_dtype).removeprefix("torch."),
                         "in_features": module.in_features, "out_features": module.out_features,
                         "bias": module.bias is not None}

    def decode_fp8(tensors: Tensors, meta: dict[str, Any]) -> nn.Module:
        linear = nn.Linear(meta["in_features"], meta["out_features"], bias=meta["bias"], device="meta")
        linear = _zeroed(linear.to_empty(device="cpu"))
        module = FP8Linear(linear, fmt=meta["fmt"], compute_dtype=getattr(torch, meta["compute_dtype"]))
        module.load_state_dict(tensors, strict=True, assign=True)
        return module

    def encode_cast(module: nn.Module, record: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        inner = module.layer
        if codec_for(inner) is None or codec_for(inner).name != "dense":
            raise NetshrinkError(f"a {type(inner).__name__} inside a cast layer cannot be expressed in the netshrink "
                                 f"checkpoint format", where="CastLayer")
        tensors, meta = encode_dense(inner, record)
        return tensors, {"dtype": str(module.dtype).removeprefix("torch."), "layer": meta}

    def decode_cast(tensors: Tensors, meta: dict[str, Any]) -> nn.Module:
        return CastLayer(decode_dense(tensors, meta["layer"]), getattr(torch, meta["dtype"]))

    register_codec(Codec("quant.int8", (Int8Linear, Int8Conv2d), encode_int8, decode_int8))
    register_codec(Codec("quant.fp8_linear", (FP8Linear,), encode_fp8, decode_fp8))
    register_codec(Codec("quant.cast", (CastLayer,), encode_cast, decode_cast))


_register_quant_modules()
