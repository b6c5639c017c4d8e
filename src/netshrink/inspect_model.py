"""What a model is made of and which compressions apply to which layers on this hardware (`netshrink info`)."""
from __future__ import annotations

from collections import Counter
from typing import Any

from torch import nn

from netshrink.hardware import HardwareInfo


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per weight-bearing leaf layer: name, type, weight shape, parameters."""
    rows = []
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        if params == 0:
            continue
        weight = getattr(module, "weight", None)
        rows.append({"name": name, "type": type(module).__name__,
                     "shape": tuple(weight.shape) if weight is not None and hasattr(weight, "shape") else (),
                     "parameters": params})
    return rows


def applicable_compressions(kind: str, layer_type: str, hw: HardwareInfo) -> list[str]:
    """The compressions netshrink can apply to one layer type, each with whether this hardware runs it faster."""
    fast = lambda flag: "faster here" if flag else "no speedup here"  # noqa: E731
    out: list[str] = []
    if layer_type in ("Linear", "Conv2d"):
        out.append(f"INT8 PTQ/QAT ({fast(hw.fast_cpu_int8 or hw.int8_tensor_cores)})")
        out.append(f"BF16 ({fast(hw.fast_cpu_bf16 or hw.cuda_capability is not None)})")
        out.append("unstructured pruning (smaller checkpoint; speed only at high sparsity)")
        out.append(f"2:4 sparsity ({fast(hw.sparse_2_4)})")
        out.append("structured pruning (" + ("filters/channels" if layer_type == "Conv2d" else "neurons/heads") + ", faster anywhere)")
        if layer_type == "Linear" and kind == "decoder":
            out.append("INT4/INT3 weight-only: RTN, GPTQ, AWQ (faster decode where memory-bound)")
            out.append("SmoothQuant W8A8; SparseGPT / Wanda")
    elif layer_type == "Embedding":
        out.append("INT8/INT4 weight storage (smaller; no compute to speed up)")
    elif "Norm" in layer_type:
        out.append("folded into the previous layer or kept in float (no compression)")
    return out


def summarize(model: nn.Module, kind: str, hw: HardwareInfo) -> dict[str, Any]:
    """Layer counts by type with parameters and the applicable compressions."""
    rows = layer_table(model)
    by_type: Counter[str] = Counter()
    params_by_type: Counter[str] = Counter()
    for row in rows:
        by_type[row["type"]] += 1
        params_by_type[row["type"]] += row["parameters"]
    return {
        "layers": rows,
        "by_type": [
            {"type": t, "count": n, "parameters": params_by_type[t], "compressions": applicable_compressions(kind, t, hw)}
            for t, n in by_type.most_common()
        ],
    }
