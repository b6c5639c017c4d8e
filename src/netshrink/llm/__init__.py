"""LLM compression: GPTQ, AWQ, SmoothQuant, SparseGPT, Wanda, magnitude and RTN, block by block, with packed
INT3/INT4/INT8 Linears on torch's low-bit CPU kernels. Names import lazily so `import netshrink.llm` is cheap."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "compress_llm": "api", "pack_model": "api", "pack_lm_head": "api", "fuse_projections": "fuse",
    "RTN": "rtn", "GPTQ": "gptq", "AWQ": "awq", "SmoothQuant": "smoothquant", "SparseGPT": "sparsegpt",
    "Wanda": "wanda", "Magnitude": "magnitude",
    "gptq_quantize": "gptq", "sparsegpt_prune": "sparsegpt",
    "compress_checkpoint": "stream", "load_compressed": "stream",
    "PackedLinear": "packed_linear", "W8A8Linear": "smoothquant", "QuantizedWeight": "packing",
    "pack_codes": "packing", "unpack_codes": "packing", "quantize_weight": "grid",
    "calibration_ids": "calibration", "write_synthetic_checkpoint": "synthetic",
    "measure_bandwidth": "bandwidth", "weight_bytes_per_token": "bandwidth",
    "greedy_agreement": "evaluate", "llm_quality": "evaluate", "SUPPORTED": "arch",
    "LeanDecoder": "decode", "NativeDecoder": "native", "native_available": "native",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"netshrink.llm.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'netshrink.llm' has no attribute {name!r}")
