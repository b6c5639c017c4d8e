"""Native (C++, AVX-512 VNNI) kernels, compiled on first use by the machine that runs them: the shared build step
and headers. The kernels themselves live next to what they serve: `netshrink.llm.native` (INT4/INT8 decoding) and
`netshrink.quant.native_encoder` (INT8 BERT-style encoders)."""
