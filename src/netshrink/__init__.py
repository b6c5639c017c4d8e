"""netshrink: prune and quantize trained PyTorch models, and prove the gains side by side.

The public API is small and imported lazily, so `import netshrink` stays cheap:

    import netshrink
    entry = netshrink.load("minilm")                      # a ZooModel
    small = netshrink.quantize_(entry.model, netshrink.quant.Int8Dynamic())
    netshrink.evaluate(entry.with_model(small))
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

# torchao (imported by transformers when installed) logs that its CUDA-only kernels don't load on a CPU machine,
# and torch's pytree logs a deprecation for torchao's enums: neither concerns users, so keep them out of the output.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# A compiled encoder meets many sequence lengths during evaluation; dynamo's recompilation notices are not for users.
logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

__version__ = "0.1.0"

_LAZY = {
    "load": ("netshrink.zoo", "load"),
    "ZooModel": ("netshrink.zoo", "ZooModel"),
    "evaluate": ("netshrink.eval", "evaluate"),
    "latency": ("netshrink.bench", "latency"),
    "compare": ("netshrink.bench", "compare"),
    "detect_hardware": ("netshrink.hardware", "detect"),
    "NetshrinkError": ("netshrink.errors", "NetshrinkError"),
    "quantize_": ("netshrink.quant.api", "quantize_"),
    "prune_": ("netshrink.sparsity.api", "prune_"),
    "compress_llm": ("netshrink.llm.api", "compress_llm"),
    "compress": ("netshrink.recipes.runner", "compress"),
    "export": ("netshrink.export.api", "export"),
    "save_checkpoint": ("netshrink.export.checkpoint", "save_checkpoint"),
    "load_checkpoint": ("netshrink.export.checkpoint", "load_checkpoint"),
}
_SUBMODULES = {"zoo", "data", "eval", "bench", "quant", "sparsity", "llm", "recipes", "export", "report", "hardware"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"netshrink.{name}")
    raise AttributeError(f"module 'netshrink' has no attribute '{name}'")
