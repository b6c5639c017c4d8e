"""Which compressions `netshrink demo` shows for each model kind: the best netshrink has on this machine."""
from __future__ import annotations

from netshrink.demo import Variant
from netshrink.zoo import ZooModel


def _int4_decoder(entry: ZooModel):
    from netshrink.llm import RTN, compress_llm

    return compress_llm(entry.model, RTN(bits=4, group_size=128), pack=True)


def variants_for_kind(kind: str) -> list[Variant]:
    if kind == "decoder":
        return [Variant("INT4 g128 RTN", _int4_decoder, "weights INT4 group 128, torch int4 CPU kernel, BF16 activations")]
    return []
