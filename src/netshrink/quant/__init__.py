"""Quantization: affine maths (primitives), calibration observers, post-training quantization (quantize_),
quantization-aware training (qat), and the integer / BF16 layers that run the result fast on CPU."""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "QScheme": "primitives", "compute_qparams": "primitives", "quantize": "primitives", "dequantize": "primitives",
    "fake_quantize": "primitives", "pack_int4": "primitives", "unpack_int4": "primitives",
    "quantize_tensor": "primitives", "choose_qparams": "primitives", "quantize_fp8": "primitives",
    "dequantize_fp8": "primitives", "to_bf16": "primitives", "to_fp16": "primitives",
    "MinMaxObserver": "observers", "MovingAverageMinMaxObserver": "observers", "PercentileObserver": "observers",
    "MSEObserver": "observers", "EntropyObserver": "observers", "make_observer": "observers",
    "Int8Dynamic": "configs", "Int8Static": "configs", "BF16": "configs", "FP16": "configs", "FP8": "configs",
    "quantize_": "api", "quant_report": "api", "QuantReport": "api", "calibrate": "api",
    "Int8Linear": "modules", "Int8Conv2d": "modules", "FP8Linear": "modules", "CastLayer": "modules",
    "reference_mode": "modules",
    "QATConfig": "qat", "prepare_qat": "qat", "train_qat": "qat", "convert": "qat",
    "fold_batchnorms": "fold",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"netshrink.quant.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'netshrink.quant' has no attribute '{name}'")
