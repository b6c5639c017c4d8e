"""Which compressions `netshrink demo` shows for each model kind: the best netshrink has on this machine."""
from __future__ import annotations

from netshrink.demo import Variant
from netshrink.zoo import ZooModel


def _bf16(entry: ZooModel):
    from netshrink.quant import BF16, quantize_

    return quantize_(entry.model, BF16())


def _int8_dynamic(entry: ZooModel):
    from netshrink.quant import Int8Dynamic, quantize_

    return quantize_(entry.model, Int8Dynamic())


def _int8_static_cnn(entry: ZooModel):
    from netshrink.data import digits
    from netshrink.quant import Int8Static, quantize_

    x, _ = digits("train", n=512)
    return quantize_(entry.model, Int8Static(observer="percentile"), calibration=[x[i : i + 128] for i in range(0, 512, 128)])


def _int4_decoder(entry: ZooModel):
    from netshrink.llm import RTN, compress_llm

    return compress_llm(entry.model, RTN(bits=4, group_size=128), pack=True)


def variants_for_kind(kind: str) -> list[Variant]:
    """The variants for a model kind, in the order they appear in the table."""
    if kind == "cnn":
        return [Variant("BF16", _bf16, "weights and activations bfloat16 (AVX-512 BF16)"),
                Variant("INT8 static", _int8_static_cnn, "W8A8, per-channel weights, percentile-calibrated activations on digits train split")]
    if kind == "encoder":
        return [Variant("BF16", _bf16, "bfloat16 weights and activations, compiled"),
                Variant("INT8 dynamic", _int8_dynamic, "INT8 weights per channel, activations per token at run time, integer GEMMs")]
    if kind == "decoder":
        return [Variant("BF16", _bf16, "bfloat16 weights and activations"),
                Variant("INT8 dynamic", _int8_dynamic, "INT8 weights per channel, activations per token, integer GEMMs"),
                Variant("INT4 g128 RTN", _int4_decoder, "weights INT4 group 128 on torch's int4 CPU kernel, BF16 activations")]
    return []
