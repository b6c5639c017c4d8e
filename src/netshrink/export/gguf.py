"""GGUF export of Llama-architecture decoders (what llama.cpp runs), with Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 /
F16 / BF16 / F32 tensors and the tokenizer in the file's metadata.

Tensor names, the rotary permutation of the query and key projections, and the metadata keys follow llama.cpp's
own `convert_hf_to_gguf.py` for `LlamaForCausalLM`; block quantization is the `gguf` package's reference
implementation of llama.cpp's formats. Tokenizer metadata is copied from the model's source GGUF when it came from
one, otherwise built from the Hugging Face BPE tokenizer. 1-D tensors (norms) stay F32, as llama.cpp keeps them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netshrink.atomic import atomic_file
from netshrink.errors import NetshrinkError
from netshrink.export.lowering import float_twin

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q5_1": "MOSTLY_Q5_1", "Q5_0": "MOSTLY_Q5_0", "Q4_1": "MOSTLY_Q4_1", "Q4_0": "MOSTLY_Q4_0"}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


@dataclass
class GGUFExport:
    """The written file, its size, and each tensor's GGML type."""

    path: Path
    qtype: str
    size_bytes: int
    tensor_types: dict[str, str] = field(default_factory=dict)


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder query/key rows from Hugging Face's rotate-half layout to llama.cpp's interleaved one."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(key: str) -> str | None:
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        rest = ".".join(parts[3:])
        if rest in LAYER_NAMES:
            return f"blk.{parts[2]}.{LAYER_NAMES[rest]}"
    return None


def _hyper(config: Any, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Llama hyperparameters read from the (possibly pruned) tensors, checked to be uniform across layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_layers = config.num_hidden_layers
    per_layer = {"ffn": set(), "heads": set(), "kv": set()}
    for i in range(n_layers):
        per_layer["ffn"].add(state[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0])
        per_layer["heads"].add(state[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0] // head_dim)
        per_layer["kv"].add(state[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] // head_dim)
    for what, sizes in per_layer.items():
        if len(sizes) != 1:
            raise NetshrinkError(f"layers have different {what} sizes {sorted(sizes)}; the GGUF llama format needs "
                                 f"one size for all layers", where="gguf")
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if rope_type not in (None, "default"):
        raise NetshrinkError(f"rope scaling '{rope_type}' is not written by this GGUF exporter", where="gguf")
    rope_params = getattr(config, "rope_parameters", None) or {}
    theta = rope_params.get("rope_theta") if isinstance(rope_params, dict) else None
    return {"hidden": config.hidden_size, "layers": n_layers, "ffn": per_layer["ffn"].pop(),
            "heads": per_layer["heads"].pop(), "kv": per_layer["kv"].pop(), "head_dim": head_dim,
            "ctx": getattr(config, "max_position_embeddings", 2048), "eps": config.rms_norm_eps,
            "theta": float(theta or getattr(config, "rope_theta", 10000.0)), "vocab": config.vocab_size}


def _copy_tokenizer(writer: Any, source: Path) -> None:
    """Copy the tokenizer.* keys of another GGUF file verbatim."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub)


def _hf_tokenizer(writer: Any, tokenizer: Any) -> None:
    """Tokenizer metadata from a Hugging Face fast BPE tokenizer (byte-level, as GPT-2 / Llama 3 / SmolLM use)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise NetshrinkError(f"tokenizer model {model.get('type')!r} is not written by this GGUF exporter (BPE only)",
                             where="gguf tokenizer", hint="export from a model loaded from a GGUF file, or a BPE tokenizer")
    vocab = dict(model["vocab"])
    special = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        special[added["id"]] = added.get("special", False)
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = gguf.TokenType.CONTROL if special.get(idx) else (
            gguf.TokenType.USER_DEFINED if idx in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                         ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setter(int(value))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _quantize(arr: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    import gguf

    ggml = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return arr.astype(np.float32), ggml
    if qtype == "F16":
        return arr.astype(np.float16), ggml
    block = gguf.GGML_QUANT_SIZES[ggml][0]
    if arr.shape[-1] % block:
        return arr.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(arr, ggml), ggml


def export_gguf(model: Any, out: str | os.PathLike, qtype: str = "Q8_0", tokenizer: Any = None,
                source_gguf: str | os.PathLike | None = None, embedding_qtype: str | None = None,
                name: str | None = None) -> GGUFExport:
    """Write a Llama-architecture causal LM (nn.Module or decoder ZooModel) to a GGUF file at `out`.

    `embedding_qtype` (token embedding and output head) defaults to Q8_0 for the 4- and 5-bit types (as llama.cpp's
    "mostly" types keep those tensors at higher precision) and to `qtype` otherwise.
    """
    import gguf

    out = Path(out)
    if out.exists():
        raise NetshrinkError("output already exists; choose another path or remove it", where=str(out))
    qtype = qtype.upper()
    if qtype not in QTYPES:
        raise NetshrinkError(f"GGUF type {qtype!r} cannot be written here", where="qtype",
                             hint=f"the gguf package writes {', '.join(QTYPES)}")
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        raise NetshrinkError(f"cannot export a {type(model).__name__} to GGUF", where="export_gguf")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    source = getattr(model, "source", "") if source_gguf is None else str(source_gguf)
    config = getattr(module, "config", None)
    arch = (getattr(config, "architectures", None) or [type(module).__name__])[0]
    if getattr(config, "model_type", None) != "llama" and type(module).__name__ != "LlamaForCausalLM":
        raise NetshrinkError(f"architecture {arch} cannot be expressed by this GGUF exporter (Llama only)",
                             where=type(module).__name__)
    twin, _ = float_twin(module, what="GGUF")
    state = twin.state_dict()
    hp = _hyper(config, state)
    tied = "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    tensors: list[tuple[str, np.ndarray]] = []
    for key, value in state.items():
        if tied and key == "lm_head.weight":
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue
        target = _gguf_name(key)
        if target is None:
            raise NetshrinkError(f"tensor '{key}' has no place in the GGUF llama format", where="gguf",
                                 hint="this model changes the Llama architecture")
        arr = value.detach().float().numpy()
        if target.startswith("blk.") and ("attn_q." in target):
            arr = permute_rope(arr, hp["heads"])
        elif target.startswith("blk.") and ("attn_k." in target):
            arr = permute_rope(arr, hp["kv"])
        tensors.append((target, arr))
    emb_qtype = (embedding_qtype or ("Q8_0" if qtype[1] in "45" else qtype)).upper()
    types: dict[str, str] = {}
    try:
        with atomic_file(out) as tmp:
            writer = gguf.GGUFWriter(str(tmp), arch="llama")
            writer.add_name(name or getattr(model, "name", None) or arch)
            writer.add_context_length(int(hp["ctx"]))
            writer.add_embedding_length(hp["hidden"])
            writer.add_block_count(hp["layers"])
            writer.add_feed_forward_length(hp["ffn"])
            writer.add_rope_dimension_count(hp["head_dim"])
            writer.add_head_count(hp["heads"])
            writer.add_head_count_kv(hp["kv"])
            writer.add_layer_norm_rms_eps(float(hp["eps"]))
            writer.add_rope_freq_base(hp["theta"])
            writer.add_vocab_size(hp["vocab"])
            writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[qtype]])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            if source and str(source).endswith(".gguf") and Path(source).is_file():
                _copy_tokenizer(writer, Path(source))
            elif tokenizer is not None:
                _hf_tokenizer(writer, tokenizer)
            else:
                raise NetshrinkError("GGUF needs the tokenizer in its metadata; pass tokenizer= or source_gguf=",
                                     where="export_gguf")
            for target, arr in tensors:
                chosen = "F32" if arr.ndim == 1 else (emb_qtype if target in ("token_embd.weight", "output.weight") else qtype)
                data, ggml = _quantize(arr, chosen)
                types[target] = ggml.name
                writer.add_tensor(target, data, raw_dtype=ggml)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as exc:
        raise NetshrinkError(f"could not write the GGUF file ({exc.strerror or exc}); nothing was left at the path",
                             where=str(out)) from None
    return GGUFExport(out, qtype, out.stat().st_size, types)


def read_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """Read a GGUF back with gguf.GGUFReader: architecture, metadata values and dequantized tensors by name."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, np.asarray(arr, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))
    return {"metadata": meta, "tensors": tensors}
