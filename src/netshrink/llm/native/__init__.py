"""Native batch-1 decoding: one C++ call per token over packed INT4/INT3/INT8 weights (AVX-512 VNNI)."""
from netshrink.llm.native.decoder import NativeDecoder, native_available

__all__ = ["NativeDecoder", "native_available"]
