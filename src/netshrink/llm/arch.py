"""Decoder architectures the LLM pipeline understands: where the blocks are and how their Linears connect.

Every supported family (Llama, Mistral, Qwen2, Qwen3) uses the same block layout:
input_layernorm -> self_attn.{q,k,v}_proj -> self_attn.o_proj, post_attention_layernorm -> mlp.{gate,up}_proj ->
mlp.down_proj. `SEQUENTIAL` is the order GPTQ's "true sequential" mode compresses them in; `SCALE_PAIRS` says which
operation feeds which Linears, so AWQ and SmoothQuant can fold a per-channel scale into it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn

from netshrink.errors import NetshrinkError

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
SEQUENTIAL: tuple[tuple[str, ...], ...] = (ATTN, ("self_attn.o_proj",), MLP_IN, ("mlp.down_proj",))
LINEARS: tuple[str, ...] = tuple(name for group in SEQUENTIAL for name in group)
# (operation whose output feeds the Linears, the Linears); the v->o pair applies only without grouped-query heads.
SCALE_PAIRS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ATTN),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", MLP_IN),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class Arch:
    """Where a model family keeps its classes and tensors."""

    model_type: str
    module: str  # transformers modeling module
    prefix: str  # class name prefix, e.g. "Llama"
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    lm_head: str = "lm_head"

    def _cls(self, suffix: str) -> type:
        return getattr(importlib.import_module(self.module), f"{self.prefix}{suffix}")

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module.replace("modeling_", "configuration_")),
                       f"{self.prefix}Config")

    def new_block(self, config, index: int) -> nn.Module:
        """An empty decoder block of this family (weights to be loaded)."""
        return self._cls("DecoderLayer")(config, index)

    def block_without_linears(self, config, index: int, load) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """Decoder block `index` with its small tensors (norms and the like) from `load(names) -> {name: tensor}`
        and its Linears still on the meta device, for paths that read each Linear later; also the loaded tensors,
        by checkpoint name."""
        with torch.device("meta"):
            block = self.new_block(config, index)
        prefix = f"{self.layers}.{index}."
        lazy = {f"{prefix}{name}.{p}" for name in LINEARS for p in ("weight", "bias")}
        tensors = load([prefix + k for k in block.state_dict() if prefix + k not in lazy])
        block.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, strict=False, assign=True)
        return block, tensors

    def rotary(self, config) -> nn.Module:
        return self._cls("RotaryEmbedding")(config=config)

    def causal_lm_class(self) -> type:
        return self._cls("ForCausalLM")


SUPPORTED: dict[str, Arch] = {
    "llama": Arch("llama", "transformers.models.llama.modeling_llama", "Llama"),
    "mistral": Arch("mistral", "transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": Arch("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2"),
    "qwen3": Arch("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3"),
}


def arch_for(model_type: str | None, where: str | None = None) -> Arch:
    """The Arch of a `config.model_type`, or a NetshrinkError listing what is supported."""
    if model_type not in SUPPORTED:
        raise NetshrinkError(f"unsupported architecture {model_type!r}", where=where,
                             hint=f"supported: {', '.join(sorted(SUPPORTED))}")
    return SUPPORTED[model_type]


def arch_of(model: nn.Module) -> Arch:
    """The Arch of an in-memory causal LM (checks it has the expected decoder blocks)."""
    config = getattr(model, "config", None)
    arch = arch_for(getattr(config, "model_type", None), where=type(model).__name__)
    try:
        model.get_submodule(arch.layers)
    except AttributeError as exc:
        raise NetshrinkError(f"model has no {arch.layers}", where=type(model).__name__,
                             hint="pass the *ForCausalLM model") from exc
    return arch


def block_linears(block: nn.Module, where: str) -> dict[str, nn.Linear]:
    """The seven Linears of a decoder block by local name, checking they exist."""
    found = {}
    for name in LINEARS:
        try:
            module = block.get_submodule(name)
        except AttributeError as exc:
            raise NetshrinkError(f"decoder block has no {name}", where=where,
                                 hint=f"supported architectures: {', '.join(sorted(SUPPORTED))}") from exc
        found[name] = module
    return found


def causal_mask(seq_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive causal mask [1, 1, T, T]: 0 on and below the diagonal, the dtype's minimum above."""
    mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]
