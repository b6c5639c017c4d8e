"""One registry from (stage, method name) to its parameters, the model kinds it suits and its handler."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from netshrink.recipes import params as p

STAGES = ("prune", "finetune", "quantize", "export")
ALL_KINDS = ("cnn", "encoder", "decoder", "module")
TORCH_KINDS = ALL_KINDS
LLM = ("decoder",)


@dataclass(frozen=True)
class MethodSpec:
    """A recipe method: `params` validates its keys; `handler` ("module:function") does the work."""

    stage: str
    name: str
    params: type[p.Params]
    handler: str
    kinds: tuple[str, ...] = TORCH_KINDS
    overridable: tuple[str, ...] = ()  # parameters a per-layer override may change (besides `skip`)
    summary: str = ""

    def resolve(self) -> Callable[..., Any]:
        """The handler function (imported on first use, so validating a recipe stays cheap)."""
        module, _, attr = self.handler.partition(":")
        return getattr(importlib.import_module(module), attr)


_H = "netshrink.recipes.handlers"
_REGISTRY: dict[tuple[str, str], MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method (a later registration of the same stage and name replaces the earlier one)."""
    _REGISTRY[(spec.stage, spec.name)] = spec
    return spec


def method(stage: str, name: str) -> MethodSpec | None:
    return _REGISTRY.get((stage, name))


def methods_of(stage: str) -> list[str]:
    return sorted(name for (s, name) in _REGISTRY if s == stage)


for _spec in (
    MethodSpec("prune", "magnitude", p.MagnitudeParams, f"{_H}:prune_magnitude", overridable=("sparsity",),
               summary="unstructured magnitude (or LAMP / Taylor) pruning; layer or global threshold"),
    MethodSpec("prune", "structured", p.StructuredParams, f"{_H}:prune_structured",
               summary="remove whole channels (smaller dense layers, real speedup)"),
    MethodSpec("prune", "nm", p.NMParams, f"{_H}:prune_nm",
               summary="N:M semi-structured sparsity (2:4 runs on sparse tensor cores, capability >= 8.0)"),
    MethodSpec("prune", "sparsegpt", p.LLMPruneParams, f"{_H}:llm_method", kinds=LLM,
               summary="SparseGPT: one-shot pruning with second-order weight updates"),
    MethodSpec("prune", "wanda", p.LLMPruneParams, f"{_H}:llm_method", kinds=LLM,
               summary="Wanda: prune by |weight| x input activation norm"),
    MethodSpec("prune", "llm-magnitude", p.LLMMagnitudeParams, f"{_H}:llm_method", kinds=LLM,
               summary="per-output-row magnitude pruning of an LLM"),
    MethodSpec("finetune", "finetune", p.FinetuneParams, f"{_H}:finetune", kinds=("cnn", "encoder", "module"),
               summary="recover accuracy with a short training run that keeps pruned weights at zero"),
    MethodSpec("quantize", "int8-dynamic", p.Int8DynamicParams, f"{_H}:quant_int8_dynamic",
               summary="INT8 weights, activations quantized on the fly; no calibration"),
    MethodSpec("quantize", "int8-static", p.Int8StaticParams, f"{_H}:quant_int8_static",
               summary="INT8 PTQ with activation ranges calibrated on real data"),
    MethodSpec("quantize", "qat", p.QATParams, f"{_H}:quant_qat", kinds=("cnn", "encoder", "module"),
               summary="INT8 quantization-aware training (fake-quant during fine-tuning)"),
    MethodSpec("quantize", "bf16", p.CastParams, f"{_H}:quant_bf16", summary="bfloat16 weights and activations"),
    MethodSpec("quantize", "fp16", p.CastParams, f"{_H}:quant_fp16", summary="float16 weights and activations"),
    MethodSpec("quantize", "rtn", p.WeightOnlyParams, f"{_H}:llm_method", kinds=LLM, overridable=("bits", "group_size"),
               summary="round-to-nearest weight-only quantization (the baseline)"),
    MethodSpec("quantize", "gptq", p.GPTQParams, f"{_H}:llm_method", kinds=LLM, overridable=("bits", "group_size"),
               summary="GPTQ: weight-only quantization with second-order error compensation"),
    MethodSpec("quantize", "awq", p.AWQParams, f"{_H}:llm_method", kinds=LLM, overridable=("bits", "group_size"),
               summary="AWQ: activation-aware per-channel scaling before weight-only quantization"),
    MethodSpec("quantize", "smoothquant", p.SmoothQuantParams, f"{_H}:llm_method", kinds=LLM,
               summary="SmoothQuant W8A8: migrate activation outliers into the weights"),
):
    register(_spec)

EXPORT_FORMATS = ("netshrink", "checkpoint", "onnx", "torchscript", "hf", "gguf")  # checkpoint = netshrink
for _fmt in EXPORT_FORMATS:
    register(MethodSpec("export", _fmt, p.ExportParams, f"{_H}:export", summary=f"write the model as {_fmt}"))
