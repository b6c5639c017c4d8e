"""Export and deployment: netshrink checkpoints (safetensors + manifest), Hugging Face folders (compressed-tensors
for packed LLMs), ONNX (FP32 / BF16 / INT8 / INT4 MatMulNBits), TorchScript and GGUF."""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export": "api", "FORMATS": "api",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "load_checkpoint_entry": "checkpoint",
    "is_checkpoint": "checkpoint",
    "Codec": "registry", "register_codec": "registry",
    "register_lowering": "lowering", "LayerGrid": "lowering",
    "save_hf": "hf", "HFExport": "hf",
    "export_onnx": "onnx", "quantize_onnx": "onnx", "OnnxExport": "onnx",
    "export_torchscript": "torchscript", "TorchScriptExport": "torchscript",
    "export_gguf": "gguf", "read_gguf": "gguf", "GGUFExport": "gguf",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"netshrink.export.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'netshrink.export' has no attribute '{name}'")
