"""The record of what was done to each layer: save, export, report and the tuner read it instead of re-deriving it."""
from __future__ import annotations

from typing import Any

import torch

RECORD_ATTR = "_netshrink_record"


def layer_record(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """The per-layer record of `model` (created empty on first use)."""
    record = getattr(model, RECORD_ATTR, None)
    if record is None:
        record = {}
        object.__setattr__(model, RECORD_ATTR, record)
    return record


def note(model: torch.nn.Module, layer_name: str, **fields: Any) -> None:
    """Record that `layer_name` of `model` was changed (method, bits, sparsity, ...); later notes add to earlier ones."""
    layer_record(model).setdefault(layer_name, {}).update(fields)
