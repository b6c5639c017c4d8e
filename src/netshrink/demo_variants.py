"""Which compressions `netshrink demo` shows for each model kind: the best netshrink has on this machine."""
from __future__ import annotations

import weakref

from netshrink.demo import Variant
from netshrink.zoo import ZooModel


def _bf16(entry: ZooModel):
    from netshrink.quant import BF16, quantize_

    return quantize_(entry.model, BF16())


def _int8_dynamic(entry: ZooModel):
    from netshrink.quant import Int8Dynamic, quantize_

    return quantize_(entry.model, Int8Dynamic())


def _bf16_eager(entry: ZooModel):
    """BF16 without torch.compile: a decoder's generate() changes shapes every step, which would recompile."""
    from netshrink.quant import BF16, quantize_

    return quantize_(entry.model, BF16(backend="eager"))


def _int8_dynamic_eager(entry: ZooModel):
    from netshrink.quant import Int8Dynamic, quantize_

    return quantize_(entry.model, Int8Dynamic(backend="eager"))


def _int8_static_cnn(entry: ZooModel):
    from netshrink.data import digits
    from netshrink.quant import Int8Static, quantize_

    x, _ = digits("train", n=512)
    return quantize_(entry.model, Int8Static(observer="percentile"), calibration=[x[i : i + 128] for i in range(0, 512, 128)])


_PRUNED_CNN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # entry model -> its pruned, fine-tuned copy


def _pruned_cnn(entry: ZooModel):
    """Half the conv filters and FC neurons physically removed, fine-tuned on the digits train split (built once
    per model and shared by the variants below, which copy it)."""
    import copy

    from netshrink.data import digits
    from netshrink.sparsity import structured_prune
    from netshrink.sparsity.finetune import FineTune, finetune

    if entry.model not in _PRUNED_CNN:
        x, y = digits("train")
        pruned = structured_prune(entry.model, 0.5, example_inputs=(x[:8],))
        finetune(pruned, [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)], FineTune(steps=300, lr=1e-3))
        _PRUNED_CNN[entry.model] = pruned.eval()
    return copy.deepcopy(_PRUNED_CNN[entry.model])


def _pruned_int8_cnn(entry: ZooModel):
    """The pruned, fine-tuned CNN, then INT8."""
    from netshrink.data import digits
    from netshrink.quant import Int8Static, quantize_

    x, _ = digits("train")
    calibration = [x[i : i + 128] for i in range(0, 512, 128)]
    return quantize_(_pruned_cnn(entry), Int8Static(observer="percentile"), calibration=calibration)


def _pruned_native_cnn(entry: ZooModel):
    """The pruned, fine-tuned CNN in FP32, run by netshrink's NativeCNN where this machine can (else as it is)."""
    from netshrink.errors import NetshrinkError
    from netshrink.native.cnn import NativeCNNModule, native_available

    pruned = _pruned_cnn(entry)
    if not native_available() or entry.input_shape is None:
        return pruned
    try:
        return NativeCNNModule(pruned, entry.input_shape)
    except NetshrinkError:  # a layer NativeCNN does not run: the pruned model as it is
        return pruned


def _pruned_int8_encoder(entry: ZooModel):
    """A quarter of the FFN neurons and heads removed (activation importance, bias compensation, least-squares
    refit), distilled from the original on real sentences, then INT8."""
    from netshrink import data
    from netshrink.quant import Int8Dynamic, quantize_
    from netshrink.sparsity import structured_prune

    sentences = data.sentences(2048)[256:]  # the demo's fidelity sentences (the first 256) are held out
    batches = []
    for start in range(0, len(sentences), 16):
        enc = entry.tokenizer(sentences[start : start + 16], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"]))
    pruned = structured_prune(entry.model, 0.25, head_ratio=0.25, example_inputs=batches[0], importance="activation",
                              calibration=batches[:16], compensate=True, reconstruct=True,
                              recovery_batches=batches, recovery_steps=150)
    return quantize_(pruned.eval(), Int8Dynamic())


def _int4_decoder(entry: ZooModel):
    from netshrink.llm import RTN, compress_llm, pack_lm_head

    model = compress_llm(entry.model, RTN(bits=4, group_size=128), pack=True)
    return pack_lm_head(model, bits=8)  # the tied 49152x576 head is the largest matrix read per token


def variants_for_kind(kind: str) -> list[Variant]:
    """The variants for a model kind, in the order they appear in the table."""
    if kind == "cnn":
        return [Variant("BF16", _bf16, "weights and activations bfloat16 (AVX-512 BF16)"),
                Variant("INT8 static", _int8_static_cnn, "W8A8, per-channel weights, percentile-calibrated activations on digits train split"),
                Variant("pruned 50% + INT8", _pruned_int8_cnn, "half the filters/neurons removed, fine-tuned on digits train, then W8A8"),
                Variant("pruned 50%, native", _pruned_native_cnn, "the same pruned, fine-tuned model in FP32, run by netshrink's NativeCNN (the whole forward in one C++ call)")]
    if kind == "encoder":
        return [Variant("BF16", _bf16, "bfloat16 weights and activations, compiled"),
                Variant("INT8 dynamic", _int8_dynamic, "INT8 weights per channel, activations per token at run time, integer GEMMs"),
                Variant("pruned 25% + INT8", _pruned_int8_encoder, "25% of FFN neurons and heads removed, refitted by least squares, distilled 150 steps, then INT8 dynamic")]
    if kind == "decoder":
        return [Variant("BF16", _bf16_eager, "bfloat16 weights and activations"),
                Variant("INT8 dynamic", _int8_dynamic_eager, "INT8 weights per channel, activations per token, integer GEMMs"),
                Variant("INT4 g128 RTN", _int4_decoder, "blocks INT4 group 128, LM head INT8; batch-1 latency from the forward on torch's int4 kernel (BF16 activations); perplexity and tokens/s from NativeDecoder (int8 activations, AVX-512 VNNI) where the CPU has it")]
    return []
