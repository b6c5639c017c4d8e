"""Coupled groups of transformer blocks, found by module layout: FFN neurons, attention heads, GQA groups.

BERT-style: attention.self.{query,key,value} + attention.output.dense; intermediate.dense + output.dense.
Llama-style: self_attn.{q,k,v,o}_proj with grouped-query attention; mlp.{gate,up,down}_proj.
"""
from __future__ import annotations

from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity.structured.groups import Group, Slice

GQA_MODES = ("query_heads", "kv_groups")


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _rows(module: str, lin: nn.Linear, offset: int = 0, inner: int = 1) -> list[Slice]:
    out = [Slice(module, "weight", 0, offset, inner, "out")]
    if lin.bias is not None:
        out.append(Slice(module, "bias", 0, offset, inner, "out"))
    return out


def _cols(module: str, offset: int = 0, inner: int = 1) -> list[Slice]:
    return [Slice(module, "weight", 1, offset, inner, "in")]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def bert_groups(model: nn.Module) -> tuple[list[Group], list[Group]]:
    """(FFN groups, head groups) for every BERT-style layer of `model`."""
    ffn, heads = [], []
    for name, m in model.named_modules():
        attn, inter, out = getattr(m, "attention", None), getattr(m, "intermediate", None), getattr(m, "output", None)
        if attn is None or inter is None or out is None:
            continue
        sa, so = getattr(attn, "self", None), getattr(attn, "output", None)
        q, k, v = (_linear(sa, n) for n in ("query", "key", "value")) if sa is not None else (None, None, None)
        o, up, down = _linear(so, "dense") if so is not None else None, _linear(inter, "dense"), _linear(out, "dense")
        if None in (q, k, v, o, up, down) or not hasattr(sa, "attention_head_size"):
            continue
        d = int(sa.attention_head_size)
        n_heads = q.out_features // d
        a, s = _join(name, "attention.self"), _join(name, "attention.output.dense")
        slices = []
        for proj, lin in (("query", q), ("key", k), ("value", v)):
            slices += _rows(f"{a}.{proj}", lin, inner=d)
        slices += _cols(s, inner=d)
        heads.append(Group(_join(name, "attention.heads"), n_heads, "heads", slices))
        ffn.append(Group(_join(name, "ffn"), up.out_features, "ffn",
                         _rows(_join(name, "intermediate.dense"), up) + _cols(_join(name, "output.dense"))))
    return ffn, heads


def llama_groups(model: nn.Module, gqa: str = "query_heads") -> tuple[list[Group], list[Group]]:
    """(FFN groups, head groups) for every Llama-style decoder layer; `gqa` picks query heads or whole KV groups."""
    if gqa not in GQA_MODES:
        raise NetshrinkError(f"unknown gqa mode {gqa!r}", where="Structured.gqa", hint=" or ".join(GQA_MODES))
    ffn, heads = [], []
    for name, m in model.named_modules():
        q, k, v, o = (_linear(m, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if None not in (q, k, v, o) and hasattr(m, "head_dim"):
            d = int(m.head_dim)
            n_q, n_kv = q.out_features // d, k.out_features // d
            g = n_q // n_kv
            if gqa == "kv_groups":
                slices = _rows(_join(name, "q_proj"), q, inner=g * d) + _rows(_join(name, "k_proj"), k, inner=d) \
                    + _rows(_join(name, "v_proj"), v, inner=d) + _cols(_join(name, "o_proj"), inner=g * d)
                heads.append(Group(_join(name, "kv_groups"), n_kv, "kv_groups", slices))
            else:
                for kv in range(n_kv):
                    off = kv * g * d
                    slices = _rows(_join(name, "q_proj"), q, offset=off, inner=d) + _cols(_join(name, "o_proj"), off, d)
                    heads.append(Group(f"{_join(name, 'heads')}/kv{kv}", g, "heads", slices))
        gate, up, down = (_linear(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
        if None not in (gate, up, down):
            slices = _rows(_join(name, "gate_proj"), gate) + _rows(_join(name, "up_proj"), up) \
                + _cols(_join(name, "down_proj"))
            ffn.append(Group(_join(name, "ffn"), up.out_features, "ffn", slices))
    return ffn, heads


def transformer_groups(model: nn.Module, gqa: str = "query_heads") -> tuple[list[Group], list[Group]]:
    """FFN and head groups of a BERT- or Llama-style model (empty lists for anything else)."""
    ffn, heads = bert_groups(model)
    lffn, lheads = llama_groups(model, gqa)
    return ffn + lffn, heads + lheads
