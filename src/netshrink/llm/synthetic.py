"""Synthetic Llama checkpoints (random weights, one shard per block) for memory tests larger than RAM allows."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from netshrink.atomic import atomic_dir
from netshrink.llm.arch import SUPPORTED
from netshrink.llm.safetensors_io import INDEX
from netshrink.llm.stream import block_keys


def write_synthetic_checkpoint(path: str | os.PathLike, config: dict, seed: int = 0,
                               dtype: torch.dtype = torch.float32) -> Path:
    """Write a Llama-architecture folder with random weights (std 0.02, norms 1), generated and saved block by block."""
    arch = SUPPORTED["llama"]
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **config}
    hf = arch.config_class().from_dict(config)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    with atomic_dir(path) as tmp:
        def rand(*shape):
            return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

        rest = {arch.embed + ".weight": rand(hf.vocab_size, hf.hidden_size),
                arch.norm + ".weight": torch.ones(hf.hidden_size, dtype=dtype)}
        if not hf.tie_word_embeddings:
            rest[arch.lm_head + ".weight"] = rand(hf.vocab_size, hf.hidden_size)
        save_file(rest, str(tmp / "rest.safetensors"))
        weight_map.update({k: "rest.safetensors" for k in rest})
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in arch.new_block(hf, 0).state_dict().items()}
        for i in range(hf.num_hidden_layers):
            tensors = {}
            for key in block_keys(arch, hf, i):
                local = key.split(f".{i}.", 1)[1]
                shape = shapes[local]
                tensors[key] = torch.ones(shape, dtype=dtype) if local.endswith("norm.weight") else rand(*shape)
            shard = f"model-{i:05d}.safetensors"
            save_file(tensors, str(tmp / shard))
            weight_map.update({k: shard for k in tensors})
        (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (tmp / "config.json").write_text(json.dumps(config))
    return Path(path)
