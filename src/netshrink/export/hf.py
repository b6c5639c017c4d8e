"""Hugging Face export: a folder `from_pretrained` loads (config.json, model.safetensors, tokenizer files).

Dense, pruned or fake-quantized models are written as plain float tensors (pruning masks baked in). Quantized
Linear layers are written in the `compressed-tensors` layouts that vLLM and transformers read, with a
`quantization_config` in config.json:

- netshrink.llm's packed low-bit Linear (GPTQ, AWQ, RTN): "pack-quantized", per layer `weight_packed` (int32,
  codes packed little-endian, 32/bits a word), `weight_scale` [out, groups], `weight_zero_point` (asymmetric
  grids, packed along the output dimension) and `weight_shape`;
- netshrink.quant's Int8Linear: "int-quantized" (W8A8), `weight` int8 and `weight_scale` [out, 1], activations
  per token at run time (dynamic) or with the calibrated `input_scale` / `input_zero_point` (static).
Other quantized layers (FP8, BF16 casts, int8 convolutions) are written with their dequantized float weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from netshrink.atomic import atomic_dir
from netshrink.errors import NetshrinkError
from netshrink.export.lowering import float_twin
from netshrink.llm.packing import QuantizedWeight


@dataclass
class HFExport:
    """The folder written, its layout, the packed layers and the total size on disk."""

    path: Path
    layout: str
    quantized: list[str] = field(default_factory=list)
    size_bytes: int = 0


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned codes packed 32/bits to an int32 along `dim`, code i of a word at bits [i*bits, (i+1)*bits)."""
    if 32 % bits:
        raise NetshrinkError(f"{bits}-bit codes do not divide a 32-bit word", where="compressed-tensors packing",
                             hint="the pack-quantized export here writes 2-, 4- or 8-bit grids")
    per = 32 // bits
    c = codes.to(torch.int64).transpose(0, 1) if dim == 0 else codes.to(torch.int64)
    c = torch.nn.functional.pad(c, (0, (-c.shape[1]) % per)).reshape(c.shape[0], -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return (words.transpose(0, 1) if dim == 0 else words).contiguous()


def transformers_model(model: Any) -> tuple[nn.Module, Any]:
    """(the transformers PreTrainedModel inside, tokenizer) of a ZooModel, SentenceEncoder or bare model."""
    tokenizer = getattr(model, "tokenizer", None)
    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    if module is not None and not hasattr(module, "config") and hasattr(module, "backbone"):
        module = module.backbone
    if not isinstance(module, nn.Module) or not hasattr(module, "config") or not hasattr(module.config, "to_dict"):
        raise NetshrinkError(f"{type(module).__name__} is not a transformers model, so it cannot be expressed in the "
                             f"Hugging Face format", where="hf", hint="use --format netshrink, onnx or torchscript")
    return module, tokenizer


def _scheme(qw: QuantizedWeight) -> dict[str, Any]:
    symmetric = bool((qw.zeros == (1 << (qw.bits - 1))).all())
    in_features = qw.codes.shape[1]
    per_channel = qw.group_size >= in_features
    return {"num_bits": qw.bits, "type": "int", "symmetric": symmetric,
            "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else qw.group_size,
            "dynamic": False, "observer": "minmax"}


def compressed_layer(qw: QuantizedWeight, scale_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The pack-quantized tensors of one layer and its weight scheme."""
    scheme = _scheme(qw)
    tensors = {"weight_packed": pack_int32(qw.codes, qw.bits),
               "weight_scale": qw.scales.to(scale_dtype).contiguous(),
               "weight_shape": torch.tensor(list(qw.codes.shape), dtype=torch.int64)}
    if not scheme["symmetric"]:
        tensors["weight_zero_point"] = pack_int32(qw.zeros, qw.bits, dim=0)
    return tensors, scheme


def int8_layer(layer: nn.Module, scale_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The int-quantized (W8A8) tensors of a netshrink Int8Linear and its weight + activation schemes."""
    tensors = {"weight": layer.weight_int8.detach().contiguous(),
               "weight_scale": layer.weight_scale.detach().to(scale_dtype).reshape(-1, 1).contiguous()}
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
               "dynamic": False, "observer": "minmax"}
    if layer.mode == "dynamic":  # one symmetric scale per token, chosen at run time
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
                "observer": None}
    else:
        zero = int(layer.input_zero_point)
        acts = {"num_bits": 8, "type": "int", "symmetric": zero == 0, "strategy": "tensor", "dynamic": False,
                "observer": "minmax"}
        tensors["input_scale"] = layer.input_scale.detach().to(scale_dtype).reshape(1)
        if zero:
            tensors["input_zero_point"] = torch.tensor([zero], dtype=torch.int8)
    return tensors, {"weights": weights, "input_activations": acts, "format": "int-quantized"}


def save_hf(model: Any, out: str | os.PathLike, tokenizer: Any = None) -> HFExport:
    """Write a transformers model (nn.Module or ZooModel) as a Hugging Face folder at `out` (which must not exist)."""
    from netshrink.llm.packed_linear import PackedLinear
    from netshrink.quant.modules import Int8Linear

    out = Path(out)
    module, zoo_tokenizer = transformers_model(model)
    tokenizer = tokenizer if tokenizer is not None else zoo_tokenizer
    packed = {n: m for n, m in module.named_modules() if isinstance(m, (PackedLinear, Int8Linear))}
    twin, _ = float_twin(module, what="the Hugging Face format")
    state = twin.state_dict()
    config = module.config.to_dict()
    dtype = next((p.dtype for p in twin.parameters() if p.is_floating_point()), torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}
    for name, layer in packed.items():
        if isinstance(layer, PackedLinear):
            parts, weights = compressed_layer(layer.quantized_weight(), dtype)
            scheme = {"weights": weights, "input_activations": None, "format": "pack-quantized"}
        else:
            parts, scheme = int8_layer(layer, dtype)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {"targets": [], "output_activations": None, **scheme})
        groups[key]["targets"].append(name)
        for k, v in parts.items():
            tensors[f"{name}.{k}"] = v
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().to(dtype).contiguous()
    if config.get("tie_word_embeddings") and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    for key, value in state.items():
        owner = key.rpartition(".")[0]
        if owner in packed:
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue
        tensors[key] = value.detach().clone().contiguous()
    layout = "dense"
    if packed:
        formats = sorted({g["format"] for g in groups.values()})
        layout = "compressed-tensors/" + (formats[0] if len(formats) == 1 else "mixed-precision")
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": layout.split("/")[1], "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
            "ignore": [n for n, m in module.named_modules() if isinstance(m, nn.Linear)],
            "kv_cache_scheme": None,
        }
    config.pop("_name_or_path", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    try:
        with atomic_dir(out) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str), encoding="utf-8")
            generation = getattr(module, "generation_config", None)
            if generation is not None:
                generation.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except OSError as exc:
        raise NetshrinkError(f"could not write the Hugging Face folder ({exc.strerror or exc}); nothing was left at "
                             f"the path", where=str(out)) from None
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return HFExport(out, layout, sorted(packed), size)
