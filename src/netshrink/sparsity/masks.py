"""Binary weight masks kept on the module as a parametrization: weight = original * mask, re-applied after each step."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from netshrink.errors import NetshrinkError


class WeightMask(nn.Module):
    """Parametrization multiplying a weight by a fixed boolean mask (stored as a buffer, so it saves and moves)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The boolean mask on `module.<name>`, or None when it is not masked."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, WeightMask):
            return p.mask
    return None


def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight", where: str = "") -> None:
    """Put `mask` on `module.<name>` (replacing an earlier one) and zero the stored values it removes."""
    current = getattr(module, name)
    if tuple(mask.shape) != tuple(current.shape):
        raise NetshrinkError(f"mask shape {tuple(mask.shape)} does not match {name} {tuple(current.shape)}",
                             where=where or type(module).__name__)
    mask = mask.to(device=current.device, dtype=torch.bool)
    existing = get_mask(module, name)
    if existing is not None:
        existing.copy_(mask)
    else:
        parametrize.register_parametrization(module, name, WeightMask(mask))
    with torch.no_grad():
        module.parametrizations[name].original.mul_(mask.to(current.dtype))


def masked_tensors(module: nn.Module) -> list[str]:
    """Names of the tensors of `module` (weight, bias) that carry a mask."""
    if not parametrize.is_parametrized(module):
        return []
    return [n for n in module.parametrizations.keys() if get_mask(module, n) is not None]


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of `model` that carries a mask on some tensor."""
    return {n: m for n, m in model.named_modules() if masked_tensors(m)}


@torch.no_grad()
def reapply_masks(model: nn.Module) -> None:
    """Zero the stored (original) values under every mask, so optimizer momentum or decay cannot revive them."""
    for module in masked_modules(model).values():
        for name in masked_tensors(module):
            original = module.parametrizations[name].original
            original.mul_(get_mask(module, name).to(original.dtype))


def keep_masks_after_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
    """Register a post-step hook on `optimizer` that re-applies the masks of `model`; returns the removable handle."""
    return optimizer.register_step_post_hook(lambda *_: reapply_masks(model))


def make_permanent(model: nn.Module) -> nn.Module:
    """Bake every mask into a plain weight tensor (zeros stay zeros) and drop the parametrizations."""
    for module in masked_modules(model).values():
        for name in masked_tensors(module):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def sparsity_of(model: nn.Module, layers: dict[str, nn.Module] | None = None) -> dict[str, float]:
    """Fraction of exactly-zero weights per layer (of the effective, masked weight) plus the overall 'total'."""
    from netshrink.sparsity.layers import prunable_layers

    layers = layers if layers is not None else prunable_layers(model)
    out: dict[str, float] = {}
    zeros = total = 0
    for name, module in layers.items():
        w = module.weight
        z = int((w == 0).sum())
        out[name] = z / w.numel()
        zeros += z
        total += w.numel()
    out["total"] = zeros / max(total, 1)
    return out
