"""How big a model is: parameters, non-zero parameters, bytes of weights, and size on disk."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer once (shared tensors counted once), including packed integer weights."""
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        base = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        seen.setdefault((base, tensor.storage_offset(), tuple(tensor.shape), tensor.dtype), (name, tensor))
    return dict(seen.values())


def model_size(model: nn.Module) -> dict[str, float]:
    """Parameter count, non-zero count, and bytes of weights as stored (int8/int4-packed buffers count at their size)."""
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    weight_bytes = 0
    for tensor in _tensors(model).values():
        weight_bytes += tensor.numel() * tensor.element_size()
    return {"parameters": float(params), "nonzero_parameters": float(nonzero),
            "sparsity": 1.0 - nonzero / params if params else 0.0, "weight_bytes": float(weight_bytes),
            "weight_mib": weight_bytes / 2**20}


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes a saved model takes: a file, or everything under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def saved_size(model: nn.Module, folder: str | os.PathLike) -> int:
    """Size on disk of the model's tensors written as safetensors (what a netshrink checkpoint stores)."""
    from safetensors.torch import save_file

    path = Path(folder) / "weights.safetensors"
    tensors = {name: t.detach().contiguous().clone() for name, t in _tensors(model).items()}
    save_file(tensors, str(path))
    return path.stat().st_size
