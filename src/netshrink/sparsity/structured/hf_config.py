"""After physical removal: make module attributes and the Hugging Face config tell the truth about the new shapes."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

PRUNED_KEY = "netshrink_pruned_layers"


def sync_module_attributes(model: nn.Module) -> None:
    """Set in/out feature counts, BatchNorm sizes, head counts and GQA group sizes from the (new) weight shapes."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            depthwise = m.groups > 1 and m.weight.shape[1] == 1 and m.groups == m.in_channels == m.out_channels
            m.out_channels = m.weight.shape[0]
            if depthwise:
                m.groups = m.in_channels = m.out_channels
            else:
                m.in_channels = m.weight.shape[1] * m.groups
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            ref = m.running_mean if m.running_mean is not None else m.weight
            m.num_features = ref.shape[0]
        if hasattr(m, "attention_head_size") and isinstance(getattr(m, "query", None), nn.Linear):
            m.num_attention_heads = m.query.weight.shape[0] // m.attention_head_size
            m.all_head_size = m.num_attention_heads * m.attention_head_size
        if hasattr(m, "head_dim") and isinstance(getattr(m, "q_proj", None), nn.Linear):
            n_q, n_kv = m.q_proj.weight.shape[0] // m.head_dim, m.k_proj.weight.shape[0] // m.head_dim
            m.num_key_value_groups = n_q // n_kv
            for attr, value in (("num_heads", n_q), ("num_key_value_heads", n_kv)):
                if hasattr(m, attr):
                    setattr(m, attr, value)


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per transformer layer: query heads, KV heads, head size and FFN width, read from the weights."""
    shapes: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if hasattr(m, "attention_head_size") and isinstance(getattr(m, "query", None), nn.Linear):
            layer = name.rsplit(".attention.self", 1)[0]
            d = int(m.attention_head_size)
            shapes.setdefault(layer, {}).update(heads=m.query.out_features // d, kv_heads=m.key.out_features // d,
                                                head_dim=d)
        if hasattr(m, "head_dim") and isinstance(getattr(m, "q_proj", None), nn.Linear):
            layer = name.rsplit(".self_attn", 1)[0]
            d = int(m.head_dim)
            shapes.setdefault(layer, {}).update(heads=m.q_proj.out_features // d,
                                                kv_heads=m.k_proj.out_features // d, head_dim=d)
        inter = getattr(getattr(m, "intermediate", None), "dense", None)
        if isinstance(inter, nn.Linear) and hasattr(m, "attention"):
            shapes.setdefault(name, {})["intermediate_size"] = inter.out_features
        if isinstance(getattr(m, "up_proj", None), nn.Linear) and isinstance(getattr(m, "down_proj", None), nn.Linear):
            shapes.setdefault(name.rsplit(".mlp", 1)[0], {})["intermediate_size"] = m.up_proj.out_features
    return shapes


def hf_owners(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(module, config) for each distinct transformers config, with the outermost module that holds it."""
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append((m, cfg))
    return out


def update_hf_config(model: nn.Module) -> dict[str, dict[str, int]]:
    """Write the new sizes into each HF config: uniform values into its own fields (intermediate_size; for Llama
    also heads, KV heads, head_dim), and per-layer values, named relative to the config's model, under
    `netshrink_pruned_layers` (read back by `resize_to_pruned`). Returns the per-layer shapes."""
    every: dict[str, dict[str, int]] = {}
    for owner, cfg in hf_owners(model):
        shapes = layer_shapes(owner)
        if not shapes:
            continue
        every.update(shapes)
        values = list(shapes.values())
        inter = {v.get("intermediate_size") for v in values} - {None}
        if len(inter) == 1:
            cfg.intermediate_size = inter.pop()
        heads = {(v.get("heads"), v.get("kv_heads"), v.get("head_dim")) for v in values if "heads" in v}
        if hasattr(cfg, "num_key_value_heads") and len(heads) == 1:
            n_q, n_kv, d = heads.pop()
            cfg.head_dim = d
            cfg.num_attention_heads, cfg.num_key_value_heads = n_q, n_kv
        setattr(cfg, PRUNED_KEY, {k: dict(v) for k, v in shapes.items()})
    return every


@torch.no_grad()
def resize_to_pruned(model: nn.Module) -> nn.Module:
    """Shrink a freshly built (unpruned-shape) model to the per-layer shapes recorded in its config, so that a
    pruned state dict loads into it (which units are kept does not matter: the state dict overwrites them)."""
    from netshrink.sparsity.structured.groups import remove_physically, removal_positions
    from netshrink.sparsity.structured.transformer import transformer_groups

    recorded: dict[str, dict[str, int]] | None = None
    for owner, cfg in hf_owners(model):
        if owner is model:
            recorded = getattr(cfg, PRUNED_KEY, None)
    if not recorded:
        return model
    ffn, kv_groups = transformer_groups(model, gqa="kv_groups")
    kv_groups = [g for g in kv_groups if g.kind == "kv_groups"]
    _, q_heads = transformer_groups(model, gqa="query_heads")
    current = layer_shapes(model)
    plan = []
    for layer, want in recorded.items():
        have = current.get(layer, {})
        mine = lambda groups: [g for g in groups if g.name.startswith(layer + ".")]  # noqa: E731
        if "intermediate_size" in want:
            plan += [(g, torch.arange(want["intermediate_size"], g.size)) for g in mine(ffn)]
        if "heads" not in want or "heads" not in have:
            continue
        if not mine(kv_groups):  # BERT-style attention: one group of heads per layer
            plan += [(g, torch.arange(want["heads"], g.size)) for g in mine(q_heads)]
            continue
        plan += [(g, torch.arange(want["kv_heads"], g.size)) for g in mine(kv_groups)]
        per_group = want["heads"] // want["kv_heads"]
        plan += [(g, torch.arange(per_group, g.size)) for g in mine(q_heads)[: want["kv_heads"]]]
    remove_physically(model, removal_positions(plan))
    sync_module_attributes(model)
    return model
