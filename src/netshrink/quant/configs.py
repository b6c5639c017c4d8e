"""Post-training quantization configs: what `quantize_(model, config)` does, one dataclass per format.

Common fields:
- `skip`: module-name glob patterns (fnmatch, e.g. ``"*.classifier"``, ``"encoder.layer.0.*"``) left in float.
- `overrides`: ``{pattern: config or None}``; the first matching pattern decides a layer's format instead of the
  main config (None keeps the layer in float). E.g. ``Int8Dynamic(overrides={"*.output.dense": BF16()})``.
- `fold_bn`: fold BatchNorm into the preceding convolution first (Conv -> BN pairs in an nn.Sequential).
- `backend`: ``"eager"`` runs the quantized layers op by op; ``"compile"`` also compiles the model in place with
  torch.compile (inductor) so the activation quantization, scaling, bias, layer norm and GELU around each int8 GEMM
  fuse into a few loops; ``"native"`` (Int8Dynamic only) runs BERT-style encoder stacks through netshrink's own
  fused int8 forward (`netshrink.quant.native_encoder`, AVX-512 VNNI); ``"auto"`` picks native for Int8Dynamic
  models whose encoders it can run on this CPU, compiles other transformers models (where that fusion is most of
  the speed-up) and leaves small models eager (no compile delay).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from netshrink.errors import NetshrinkError

BACKENDS = ("auto", "eager", "compile", "native")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise NetshrinkError(f"unknown backend {backend!r}", where="config.backend",
                             hint=f"choose one of {', '.join(BACKENDS)}")


@dataclass
class Int8Dynamic:
    """INT8 weights (symmetric, per output channel) and INT8 activations quantized per token at run time.

    `attention="bf16"` also runs the attention score/value matmuls of transformers models in BF16 ("auto" does so
    when compiling; "fp32" keeps the model's own attention). `fold_gelu`: when compiling, BERT-style FFNs quantize
    FC2's input from the pre-GELU row maximum (`netshrink.quant.ffn`), evaluating the GELU once instead of twice.
    """

    per_channel: bool = True
    skip: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    fold_bn: bool = True
    backend: str = "auto"
    attention: str = "auto"
    fold_gelu: bool = True

    def __post_init__(self) -> None:
        _check_backend(self.backend)
        if self.attention not in ("auto", "bf16", "fp32"):
            raise NetshrinkError(f"unknown attention mode {self.attention!r}", where="Int8Dynamic.attention",
                                 hint="choose auto, bf16 or fp32")


@dataclass
class Int8Static:
    """W8A8: INT8 weights per output channel, INT8 activations with one range per layer input from calibration.

    `observer` picks how the range is chosen: minmax, moving_average, percentile, mse or entropy.
    `act_symmetric=False` gives activations an integer zero point (better for ReLU outputs).
    """

    observer: str = "minmax"
    percentile: float = 99.99
    act_symmetric: bool = False
    per_channel: bool = True
    skip: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    fold_bn: bool = True
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_backend(self.backend)
        from netshrink.quant.observers import OBSERVERS

        if self.observer not in OBSERVERS:
            raise NetshrinkError(f"unknown observer {self.observer!r}", where="Int8Static.observer",
                                 hint=f"choose one of {', '.join(OBSERVERS)}")


@dataclass
class BF16:
    """Weights and activations in bfloat16 (fast here: AVX-512 BF16 dot products); inputs/outputs stay FP32."""

    skip: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    fold_bn: bool = True
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_backend(self.backend)


@dataclass
class FP16:
    """Weights and activations in IEEE half precision. Without AVX-512 FP16 / AMX-FP16 the CPU has no fast FP16
    arithmetic: it is converted and computed slowly, so netshrink warns and suggests BF16."""

    skip: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    fold_bn: bool = True
    backend: str = "eager"

    def __post_init__(self) -> None:
        _check_backend(self.backend)


@dataclass
class FP8:
    """Linear weights stored in FP8 (e4m3 or e5m2) with per-channel scales; computed in `compute` precision
    (bf16 or fp32) because the CPU has no FP8 arithmetic. Halves weight memory relative to BF16."""

    fmt: str = "e4m3"
    compute: str = "bf16"
    skip: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    fold_bn: bool = True
    backend: str = "eager"

    def __post_init__(self) -> None:
        _check_backend(self.backend)
        if self.fmt not in ("e4m3", "e5m2"):
            raise NetshrinkError(f"unknown FP8 format {self.fmt!r}", where="FP8.fmt", hint="choose e4m3 or e5m2")
        if self.compute not in ("bf16", "fp32"):
            raise NetshrinkError(f"unknown compute precision {self.compute!r}", where="FP8.compute",
                                 hint="choose bf16 or fp32")


CONFIGS = (Int8Dynamic, Int8Static, BF16, FP16, FP8)
