"""Choose a recipe from the model's kind and size, the hardware and the accuracy budget, and say why.

The rules follow the compression playbook: start with INT8 PTQ; if it drops more than the budget, move to QAT;
use 4-bit only for LLMs; 2:4 sparsity only where sparse tensor cores exist (CUDA capability >= 8.0); INT8 on GPUs
needs INT8 tensor cores (>= 7.5); on CPUs INT8 is fast with VNNI (or AMX) and BF16 with AVX-512 BF16 (or AMX).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from netshrink.errors import NetshrinkError
from netshrink.hardware import HardwareInfo
from netshrink.recipes.loader import load_recipe
from netshrink.recipes.schema import Recipe

TARGETS = ("cpu", "gpu", "edge", "mobile")
KINDS = ("cnn", "encoder", "decoder", "module")


@dataclass
class Recommendation:
    """The chosen built-in recipe, one sentence per choice, and what to try next if it misses the budget."""

    recipe_name: str
    recipe: Recipe
    reasons: list[str]
    escalation: str | None = None  # the recipe to move to if the measured drop exceeds the budget
    alternatives: dict[str, str] = field(default_factory=dict)  # recipe name -> when to prefer it

    def lines(self) -> list[str]:
        out = [f"recipe: {self.recipe_name}  ({'; '.join(self.recipe.describe())})"]
        out += [f"  - {reason}" for reason in self.reasons]
        if self.escalation:
            out.append(f"  if the measured drop exceeds the budget: {self.escalation}")
        out += [f"  alternative {name}: {why}" for name, why in self.alternatives.items()]
        return out


def _cpu(kind: str, hw: HardwareInfo, reasons: list[str], alternatives: dict[str, str]) -> str:
    if hw.fast_cpu_bf16:
        alternatives["bf16"] = ("this CPU has " + ("AMX" if hw.amx else "AVX-512 BF16")
                                + ", so BF16 halves the model at almost no accuracy cost")
    if kind == "cnn":
        if hw.fast_cpu_int8:
            reasons.append(f"This CPU has {'AMX' if hw.amx else 'VNNI'}, so INT8 convolutions and GEMMs run several "
                           "times faster than FP32: start with INT8 PTQ.")
            return "int8-ptq"
        reasons.append("This CPU lacks VNNI, so INT8 gains less (the AVX2 path); removing 50% of the channels gives a "
                       "speedup on any CPU, and INT8 PTQ adds what AVX2 can.")
        return "cnn-structured50-int8"
    if hw.fast_cpu_int8:
        reasons.append(f"This CPU has {'AMX' if hw.amx else 'VNNI'}, so INT8 GEMMs are fast; dynamic INT8 quantizes "
                       "the transformer's Linear layers without a calibration set.")
    else:
        reasons.append("This CPU lacks VNNI, so INT8 GEMMs run on the slower AVX2 path; dynamic INT8 still quarters "
                       "the weight memory and bandwidth.")
    return "int8-dynamic"


def _gpu(kind: str, hw: HardwareInfo, reasons: list[str], alternatives: dict[str, str]) -> str:
    cap = hw.cuda_capability
    if cap is None:
        raise NetshrinkError("target 'gpu' but no CUDA GPU is visible", where="--target",
                             hint="run on the GPU machine, or choose cpu / edge / mobile")
    label = f"{hw.cuda_name or 'this GPU'} (capability {cap[0]}.{cap[1]})"
    if kind == "decoder":
        if hw.sparse_2_4:
            reasons.append(f"{label} has sparse tensor cores, so 2:4 pruning runs faster, and 4-bit weights cut the "
                           "memory traffic that bounds token generation.")
            return "llm-edge-2of4-gptq4"
        reasons.append(f"{label} has no 2:4 sparse tensor cores (they need capability 8.0), so only 4-bit weights "
                       "are used: token generation is memory-bandwidth bound.")
        return "llm-edge-gptq4"
    if hw.sparse_2_4:
        reasons.append(f"{label} has 2:4 sparse tensor cores (capability >= 8.0): 2:4 sparsity with FP16 gives "
                       "2-3x throughput.")
        if cap >= (8, 9):
            alternatives["int8-ptq"] = "capability 8.9+ also has FP8 tensor cores; INT8/FP8 PTQ is an option"
        return "gpu-2of4-fp16"
    if hw.int8_tensor_cores:
        reasons.append(f"{label} has INT8 tensor cores (capability >= 7.5) but no 2:4 sparse ones: INT8 PTQ.")
        return "int8-ptq" if kind == "cnn" else "int8-dynamic"
    reasons.append(f"{label} has FP16 tensor cores but neither INT8 tensor cores (need 7.5) nor 2:4 sparse ones "
                   "(need 8.0): FP16 is the precision that runs faster here.")
    return "fp16"


def recommend(kind: str, hardware: HardwareInfo, target: str = "cpu", max_drop: float = 0.01,
              parameters: int | None = None, measured_ptq_drop: float | None = None) -> Recommendation:
    """A recipe for a `kind` model (cnn, encoder, decoder, module) on `target`, within `max_drop` (a fraction).

    `measured_ptq_drop` (e.g. from `netshrink tune` or a quick evaluation) moves a model whose INT8 PTQ drop exceeds
    the budget to QAT.
    """
    if kind not in KINDS:
        raise NetshrinkError(f"unknown model kind '{kind}'", where="kind", hint=", ".join(KINDS))
    if target not in TARGETS:
        raise NetshrinkError(f"unknown target '{target}'", where="--target", hint=", ".join(TARGETS))
    if not 0.0 < max_drop < 1.0:
        raise NetshrinkError(f"max drop {max_drop!r} must be a fraction in (0, 1), e.g. 0.01 for 1%", where="--max-drop")
    reasons: list[str] = []
    alternatives: dict[str, str] = {}
    if kind == "decoder" and target in ("edge", "mobile"):
        size = f" ({parameters / 1e6:.0f}M parameters)" if parameters else ""
        reasons.append(f"An LLM{size} on a {target} device must fit in little memory: 4-bit GPTQ weights plus 25% "
                       "pruning make it about 8x smaller; 4-bit is for LLMs only, where INT8 would not fit.")
        alternatives["llm-edge-awq4"] = "AWQ quantizes faster than GPTQ and protects salient channels"
        name = "llm-edge-gptq4"
    elif kind == "decoder" and target == "cpu":
        reasons.append("A decoder LLM on a CPU is bound by memory bandwidth; INT8 PTQ first, as the playbook says.")
        name = _cpu(kind, hardware, reasons, alternatives)
        alternatives["llm-edge-gptq4"] = "4-bit weights if INT8 is still too large or slow"
    elif kind == "cnn" and target in ("edge", "mobile"):
        reasons.append(f"A CNN on a {target} device: 50% structured pruning keeps dense layers (a speedup without "
                       "sparse kernels) and INT8 PTQ quarters the weights: 8-16x less compute and memory.")
        name = "cnn-structured50-int8"
    elif target in ("edge", "mobile"):
        reasons.append(f"A {kind} model on a {target} device: INT8 PTQ first; 4-bit is kept for LLMs.")
        name = "int8-ptq" if kind == "module" else "int8-dynamic"
    elif target == "gpu":
        name = _gpu(kind, hardware, reasons, alternatives)
    else:
        name = _cpu(kind, hardware, reasons, alternatives)
    escalation = None
    if kind != "decoder" and name in ("int8-ptq", "int8-dynamic", "cnn-structured50-int8"):
        escalation = "int8-qat"
        if measured_ptq_drop is not None and measured_ptq_drop > max_drop:
            reasons.append(f"INT8 PTQ was measured to drop {measured_ptq_drop:.2%}, more than the {max_drop:.2%} "
                           "budget: quantization-aware training recovers it.")
            name, escalation = "int8-qat", None
        else:
            reasons.append(f"If INT8 PTQ drops more than {max_drop:.2%}, move to QAT (int8-qat); `netshrink tune` "
                           "does this escalation automatically.")
    return Recommendation(name, load_recipe(name), reasons, escalation, alternatives)
