"""Native (C++, AVX-512) kernels, compiled on first use by the machine that runs them: the shared build step
(`build.py`), headers (`pool.h`, `simd.h`) and `cnn.py` (NativeCNN, small CNN chains at batch 1). The other kernels
live next to what they serve: `netshrink.llm.native` (INT4/INT8 decoding) and `netshrink.quant.native_encoder`
(INT8 BERT-style encoders)."""
from __future__ import annotations


def tracing() -> bool:
    """Whether torch is tracing, exporting or compiling right now: native runtimes hand those to the model itself."""
    import torch

    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
