"""Bad-input checks shared by the LLM methods: config fields (run when a config is constructed), `pack` bit widths,
and finite weights. Each raises one NetshrinkError naming the field (e.g. "RTN.bits") or the layer."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from netshrink.errors import NetshrinkError

PACK_BITS = (3, 4, 8)  # the bit widths `pack_codes` and PackedLinear store


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check(config: Any, field: str, ok: bool, expected: str) -> None:
    """NetshrinkError "`field` must be `expected`, got ..." at `Config.field` unless `ok`."""
    if not ok:
        raise NetshrinkError(f"{field} must be {expected}, got {getattr(config, field)!r}",
                             where=f"{type(config).__name__}.{field}")


def check_grid(config: Any, bits_optional: bool = False) -> None:
    """`bits` (2 to 8: codes are uint8 on a QScheme grid; None allowed if `bits_optional`) and `group_size`."""
    bits = config.bits
    check(config, "bits", (bits_optional and bits is None) or (is_int(bits) and 2 <= bits <= 8),
          "an integer from 2 to 8" + (" or None" if bits_optional else ""))
    gs = config.group_size
    check(config, "group_size", gs is None or (is_int(gs) and gs > 0), "None (per channel) or a positive integer")


def check_sparsity(config: Any) -> None:
    check(config, "sparsity", is_real(config.sparsity) and 0 <= config.sparsity < 1, "in [0, 1)")


def check_pack(config: Any, pack: bool) -> None:
    """Refuse `pack=True` for a bit width packing cannot store, before any block is compressed."""
    bits = getattr(config, "bits", None)
    if pack and bits is not None and bits not in PACK_BITS:
        raise NetshrinkError(f"pack=True cannot store {bits}-bit weights", where=f"{type(config).__name__}.bits",
                             hint="packed layouts take 3, 4 or 8 bits; choose one of them or pack=False")


def check_finite(tensor: torch.Tensor, where: str, what: str = "weight") -> None:
    """NetshrinkError "`what` contains NaN or Inf" naming the layer `where`."""
    if not bool(torch.isfinite(tensor).all()):
        raise NetshrinkError(f"{what} contains NaN or Inf", where=where, hint="fix the source weights")


def check_block_finite(block: nn.Module, where: str) -> None:
    """Every parameter of a decoder block is finite; the error names its layer (e.g. model.layers.1.mlp.up_proj)."""
    for name, param in block.named_parameters():
        module, _, what = name.rpartition(".")
        check_finite(param, f"{where}.{module}" if module else where, what)
