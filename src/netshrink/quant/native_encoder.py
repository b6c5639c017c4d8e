"""NativeEncoder: the int8 forward of a BERT-style encoder in one native call (encode.cpp).

Compiled with torch.compile, an Int8Dynamic encoder spends about half its time outside the int8 GEMMs: softmax,
GELU, layer norms, activation quantization and the framework's own overhead, op by op. encode.cpp runs the same
arithmetic (per-token int8 activations x per-channel int8 weights, int32 sums, float32 elsewhere except the
attention's BF16 value products) with those steps fused around the GEMMs, on an OpenMP team that meets once per
layer. `use_native_encoders(model)` routes a quantized model's BERT-style encoders through it; the modules, the
state dict, saving and export stay those of the ordinary quantized model.
"""
from __future__ import annotations

import ctypes
import threading
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.native import tracing
from netshrink.native.build import available, build
from netshrink.quant.ffn import is_exact_gelu
from netshrink.quant.modules import Int8Linear

SOURCE = Path(__file__).with_name("encode.cpp")
HEAD_DIMS = (16, 32, 48, 64)
CPU_FLAGS = ("avx512_bf16",)  # beyond AVX-512 VNNI: the attention's value products run vdpbf16ps


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """Build (if needed) and load the encoder library, with its C signatures declared. torch, imported above, has
    loaded its libgomp already, so the library's OpenMP calls join that runtime."""
    lib = build(SOURCE, where="native encoder", fallback='Int8Dynamic(backend="compile")',
                extra_flags=("-fopenmp", "-mavx512bf16"), extra_cpu_flags=CPU_FLAGS)
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.nse_panel_columns.restype = i
    lib.nse_panel_columns.argtypes = []
    lib.nse_create.restype = p
    lib.nse_create.argtypes = [i, i, i, f, i]
    lib.nse_set_linear.restype = None
    lib.nse_set_linear.argtypes = [p, i, i, p, p, p, i, i]
    lib.nse_set_norms.restype = None
    lib.nse_set_norms.argtypes = [p, i, p, p, p, p]
    lib.nse_forward.restype = None
    lib.nse_forward.argtypes = [p, p, p, i, i]
    lib.nse_destroy.restype = None
    lib.nse_destroy.argtypes = [p]
    lib.nse_linear.restype = None
    lib.nse_linear.argtypes = [p, p, p, i, i, p, i, p]
    lib.nse_profile.restype = None
    lib.nse_profile.argtypes = [p, p]
    lib.nse_gelu.restype = None
    lib.nse_gelu.argtypes = [p, i]
    return lib


def native_available() -> bool:
    """True when this CPU has AVX-512 VNNI and BF16 and the library builds."""
    return available(load_library, CPU_FLAGS)


class PanelLinear:
    """An int8 Linear in encode.cpp's layout: panels of 48 output columns, each byte code + 128, 4 inputs per lane
    (padded with code 0 to whole panels and a multiple of 4 inputs)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        n, k = codes.shape
        cols = load_library().nse_panel_columns()
        self.n, self.k = n, k
        npad, kpad = -(-n // cols) * cols, -(-k // 4) * 4
        padded = torch.zeros(npad, kpad, dtype=torch.int16)
        padded[:n, :k] = codes.to(torch.int16)
        self.packed = (padded + 128).to(torch.uint8).view(npad // cols, cols, kpad // 4, 4).permute(0, 2, 1, 3).contiguous()
        self.scale = torch.zeros(npad, dtype=torch.float32)
        self.scale[:n] = scale.float()
        self.bias = torch.zeros(npad, dtype=torch.float32)
        if bias is not None:
            self.bias[:n] = bias.float()

    def pointers(self) -> tuple[int, int, int, int, int]:
        return self.packed.data_ptr(), self.scale.data_ptr(), self.bias.data_ptr(), self.n, self.k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """y = dequant(quant(x) . W) + bias on one thread, for tests: x [m, k] float32."""
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], self.n, dtype=torch.float32)
        load_library().nse_linear(*self.pointers()[:3], self.n, self.k, x.data_ptr(), x.shape[0], y.data_ptr())
        return y


def _dynamic_int8(module: object, where: str) -> Int8Linear:
    if not (isinstance(module, Int8Linear) and module.mode == "dynamic"):
        raise NetshrinkError(f"{type(module).__name__} is not an Int8Linear with dynamic activations", where=where,
                             hint='quantize the model with Int8Dynamic() first, or use backend="compile"')
    return module


def _check_layer_norm(module: object, where: str) -> nn.LayerNorm:
    if not (isinstance(module, nn.LayerNorm) and module.elementwise_affine and len(module.normalized_shape) == 1
            and module.weight is not None and module.bias is not None):
        raise NetshrinkError("expected a LayerNorm with weight and bias", where=where)
    return module


class NativeEncoder:
    """A BERT-style encoder stack (`encoder.layer[i]` with attention.self.query/key/value, attention.output.dense /
    LayerNorm, intermediate.dense + exact GELU, output.dense / LayerNorm) of Int8Dynamic layers, run by encode.cpp.

    Call it with the embeddings [batch, seq, hidden] and the keys to keep [batch, seq] (bool); it returns the last
    hidden state. It holds its own packed copy of the weights (about the int8 model's size).
    """

    def __init__(self, encoder: nn.Module, name: str = "encoder") -> None:
        layers = getattr(encoder, "layer", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise NetshrinkError("not a BERT-style encoder (no .layer list)", where=name)
        self.name = name
        self.parts: list[dict] = []
        hidden = head_dim = eps = None
        for i, layer in enumerate(layers):
            where = f"{name}.layer.{i}"
            try:
                att, out, mid = layer.attention, layer.output, layer.intermediate
                q, k, v = att.self.query, att.self.key, att.self.value
                o, ln1 = att.output.dense, att.output.LayerNorm
                up, down, ln2, act = mid.dense, out.dense, out.LayerNorm, mid.intermediate_act_fn
                n_heads = att.self.num_attention_heads
            except AttributeError as exc:
                raise NetshrinkError(f"not a BERT-style layer: {exc}", where=where) from None
            if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False) \
                    or getattr(att.self, "is_causal", False):
                raise NetshrinkError("decoder or cross-attention layers are not supported", where=where)
            for part, module in (("query", q), ("key", k), ("value", v), ("attention.output.dense", o),
                                 ("intermediate.dense", up), ("output.dense", down)):
                _dynamic_int8(module, f"{where}.{part}")
            _check_layer_norm(ln1, f"{where}.attention.output.LayerNorm")
            _check_layer_norm(ln2, f"{where}.output.LayerNorm")
            if not is_exact_gelu(act):
                raise NetshrinkError("the intermediate activation is not the exact (erf) GELU", where=where,
                                     hint='use backend="compile"')
            h, inner, inter = q.weight_int8.shape[1], q.weight_int8.shape[0], up.weight_int8.shape[0]
            if n_heads < 1 or inner % n_heads or (inner // n_heads) not in HEAD_DIMS:
                raise NetshrinkError(f"{n_heads} heads over {inner} features: the head dimension must be one of "
                                     f"{HEAD_DIMS}", where=where)
            if (hidden, head_dim) != (None, None) and (h, inner // n_heads) != (hidden, head_dim):
                raise NetshrinkError(f"hidden size {h} / head dimension {inner // n_heads} differ from the first "
                                     f"layer's {hidden} / {head_dim}", where=where)
            hidden, head_dim = h, inner // n_heads
            if ln1.eps != ln2.eps or (eps is not None and ln1.eps != eps):
                raise NetshrinkError("layer norms differ in eps", where=where)
            eps = ln1.eps
            expected = {"key": (k, (inner, h)), "value": (v, (inner, h)), "attention.output.dense": (o, (h, inner)),
                        "intermediate.dense": (up, (inter, h)), "output.dense": (down, (h, inter))}
            for part, (module, shape) in expected.items():
                if tuple(module.weight_int8.shape) != shape:
                    raise NetshrinkError(f"{part} is {tuple(module.weight_int8.shape)}, expected {shape}", where=where)
            qkv_bias = None
            if any(m.bias is not None for m in (q, k, v)):
                qkv_bias = torch.cat([m.bias if m.bias is not None else torch.zeros(inner) for m in (q, k, v)])
            self.parts.append({
                "linears": [
                    PanelLinear(torch.cat([q.weight_int8, k.weight_int8, v.weight_int8]),
                                 torch.cat([q.weight_scale, k.weight_scale, v.weight_scale]), qkv_bias),
                    PanelLinear(o.weight_int8, o.weight_scale, o.bias),
                    PanelLinear(up.weight_int8, up.weight_scale, up.bias),
                    PanelLinear(down.weight_int8, down.weight_scale, down.bias),
                ],
                "norms": [t.detach().float().contiguous() for t in (ln1.weight, ln1.bias, ln2.weight, ln2.bias)],
            })
        self.hidden, self.head_dim, self.eps = hidden, head_dim, float(eps)
        self._handles: dict[int, int] = {}
        self._lock = threading.Lock()  # a handle's buffers serve one forward at a time

    def _handle(self, threads: int) -> int:
        if threads not in self._handles:
            lib = load_library()
            handle = lib.nse_create(len(self.parts), self.hidden, self.head_dim, self.eps, threads)
            for i, part in enumerate(self.parts):
                for which, linear in enumerate(part["linears"]):
                    lib.nse_set_linear(handle, i, which, *linear.pointers())
                lib.nse_set_norms(handle, i, *(t.data_ptr() for t in part["norms"]))
            self._handles[threads] = handle
        return self._handles[threads]

    def __call__(self, hidden_states: torch.Tensor, keep: torch.Tensor | None = None,
                 threads: int | None = None) -> torch.Tensor:
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.hidden:
            raise NetshrinkError(f"expected hidden states [batch, seq, {self.hidden}], got {tuple(hidden_states.shape)}",
                                 where=self.name)
        batch, seq, _ = hidden_states.shape
        x = hidden_states.detach().to(torch.float32, copy=True).contiguous()
        if keep is None:
            keep = torch.ones(batch, seq, dtype=torch.uint8)
        else:
            if tuple(keep.shape) != (batch, seq):
                raise NetshrinkError(f"mask {tuple(keep.shape)} does not match hidden states {(batch, seq)}",
                                     where=self.name)
            keep = keep.to(torch.uint8).contiguous()
        if batch * seq:
            with self._lock:
                handle = self._handle(threads or torch.get_num_threads())
                load_library().nse_forward(handle, x.data_ptr(), keep.data_ptr(), batch, seq)
        return x

    PHASES = ("q/k/v GEMM", "barrier wait", "attention", "attention output + LayerNorm", "intermediate + GELU",
              "output + LayerNorm")

    def profile(self, threads: int | None = None) -> torch.Tensor:
        """Time-stamp-counter ticks per thread and phase (`PHASES`) since the last call, for the runtime of that
        thread count: where a forward's time goes."""
        n = threads or torch.get_num_threads()
        out = torch.zeros(n, len(self.PHASES), dtype=torch.int64)
        load_library().nse_profile(self._handle(n), out.data_ptr())
        return out

    def __getstate__(self) -> dict:  # a copy builds its own native handles (they hold raw pointers)
        state = self.__dict__.copy()
        state["_handles"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        handles = getattr(self, "_handles", {})
        if handles:
            try:
                lib = load_library()
            except Exception:  # interpreter shutdown: nothing left to free into
                return
            for handle in handles.values():
                lib.nse_destroy(handle)
            handles.clear()


def keys_kept(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """The keys a bidirectional encoder's mask keeps, [batch, seq] bool, from whatever form transformers passes:
    None (all), a [batch, seq] padding mask, or a [batch, 1, 1 or seq, seq] boolean / additive mask. None when the
    mask differs between queries (not a padding mask)."""
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool)
    m = attention_mask
    if m.ndim == 2:
        return m.bool()
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[-1] != seq:
        return None
    if m.shape[2] != 1 and not bool((m == m[:, :, :1]).all()):
        return None
    row = m[:, 0, 0, :]
    keep = row if row.dtype == torch.bool else (row > torch.finfo(row.dtype).min / 2)
    return keep.expand(batch, seq)


def _capturing_outputs() -> bool:
    """True while transformers (5.x) collects per-layer outputs through hooks (output_hidden_states / attentions):
    those hooks sit on the layers, which the native forward does not call."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers pass output_* to the encoder itself, which the kwargs check sees
        return False
    try:
        return bool(_active_collector.get())
    except LookupError:  # never set: nothing is being collected
        return False


def _recordable_outputs(model: nn.Module) -> dict:
    """What transformers (5.x) can record from `model` through hooks (output_hidden_states, attentions)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        return {}
    return _CAN_RECORD_REGISTRY.get(model)


def _warn_gradients() -> None:
    warnings.warn("the native int8 encoder runs without autograd: with gradients enabled this model runs its eager "
                  "int8 layers instead (several times slower); call it under torch.no_grad() or "
                  "torch.inference_mode() for speed", stacklevel=4)


def native_encoder_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           *args, **kwargs):
    """A BERT encoder's forward through its NativeEncoder; anything it cannot do (cross-attention, cache, attention
    outputs, gradients, causal masks) and any tracing, export or compilation go to the original forward."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    plain = not args and not any(kwargs.get(key) for key in (
        "encoder_hidden_states", "encoder_attention_mask", "output_attentions", "output_hidden_states", "use_cache",
        "cache", "past_key_values"))
    plain = plain and not tracing() and not _capturing_outputs()
    keep = keys_kept(attention_mask, hidden_states.shape[0], hidden_states.shape[1]) if plain else None
    if keep is not None and torch.is_grad_enabled() and hidden_states.requires_grad:
        _warn_gradients()
        keep = None
    if keep is None:
        return type(self).__bases__[0].forward(self, hidden_states, attention_mask, *args, **kwargs)
    out = self._netshrink_native(hidden_states, keep).to(hidden_states.dtype)
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


def native_model_forward(self: nn.Module, input_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None, *args, **kwargs):
    """A BERT-style model's forward (embeddings -> native encoder -> pooler) without transformers' mask building,
    which costs ~0.4 ms a call at batch 1; anything beyond ids + a 2-D padding mask goes to the original forward."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    config = getattr(self, "config", None)
    plain = input_ids is not None and input_ids.ndim == 2 and not args and not tracing() \
        and not getattr(config, "output_hidden_states", False) and not getattr(config, "output_attentions", False) \
        and (attention_mask is None or attention_mask.shape == input_ids.shape) \
        and kwargs.get("return_dict", True) is not False \
        and not any(value is not None and value is not False for key, value in kwargs.items() if key != "return_dict")
    if plain and torch.is_grad_enabled() and any(p.requires_grad for p in self.embeddings.parameters()):
        _warn_gradients()
        plain = False
    if not plain:
        return type(self).__bases__[0].forward(self, input_ids, attention_mask, token_type_ids, position_ids, *args,
                                               **kwargs)
    hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    out = self.encoder._netshrink_native(hidden, keep).to(hidden.dtype)
    pooler = getattr(self, "pooler", None)
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=out,
                                                        pooler_output=pooler(out) if pooler is not None else None)


_NATIVE_CLASSES: dict[tuple[type, object], type] = {}


def _native_class(cls: type, forward) -> type:
    """cls with `forward` replaced; a subclass, so deepcopy keeps it and isinstance still holds."""
    if (cls, forward) not in _NATIVE_CLASSES:
        _NATIVE_CLASSES[cls, forward] = type(f"Native{cls.__name__}", (cls,),
                                             {"forward": forward, "__module__": cls.__module__})
    return _NATIVE_CLASSES[cls, forward]


def bert_style_encoders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BERT-style encoder stack in `model` (an *Encoder with a .layer ModuleList)."""
    return [(name, m) for name, m in model.named_modules()
            if type(m).__name__.endswith("Encoder") and isinstance(getattr(m, "layer", None), nn.ModuleList)]


def use_native_encoders(model: nn.Module) -> list[str]:
    """Route every BERT-style encoder of `model` whose layers are all Int8Dynamic through a NativeEncoder; returns
    the names of the encoders switched. Raises (naming the layer) when an encoder cannot run natively, before
    switching any."""
    found = [(name, module, NativeEncoder(module, name or "encoder")) for name, module in bert_style_encoders(model)]
    for name, module, native in found:
        object.__setattr__(module, "_netshrink_native", native)
        if type(module) not in _NATIVE_CLASSES.values():
            module.__class__ = _native_class(type(module), native_encoder_forward)
    for module in model.modules():  # the model around an encoder: skip transformers' mask building as well
        encoder, embeddings = getattr(module, "encoder", None), getattr(module, "embeddings", None)
        if any(encoder is m for _, m, _ in found) and isinstance(embeddings, nn.Module) \
                and type(module) not in _NATIVE_CLASSES.values():
            recordable = _recordable_outputs(module)
            module.__class__ = _native_class(type(module), native_model_forward)
            if recordable:  # transformers keys what a model can record by class name: give the subclass the same
                from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

                _CAN_RECORD_REGISTRY[module] = recordable
    return [name for name, _, _ in found]


def unuse_native_encoders(model: nn.Module) -> list[str]:
    """Undo `use_native_encoders` in place (exporters want the plain modules); returns the names switched back."""
    switched = []
    for name, module in model.named_modules():
        if type(module) in _NATIVE_CLASSES.values():
            module.__class__ = type(module).__bases__[0]
            module.__dict__.pop("_netshrink_native", None)
            switched.append(name)
    return switched


def uses_native_encoders(model: nn.Module) -> bool:
    """Whether any module of `model` runs through the native encoder runtime (what a checkpoint must restore)."""
    return any(type(m) in _NATIVE_CLASSES.values() for m in model.modules())
