"""Unstructured pruning: drop the lowest-importance weights, per layer or by one global percentile across layers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.patterns import no_match
from netshrink.record import note
from netshrink.sparsity.importance import KINDS, LossFn, weight_scores
from netshrink.sparsity.layers import prunable_layers
from netshrink.sparsity.masks import set_mask


@dataclass
class Magnitude:
    """Unstructured pruning to `sparsity`: scope 'layer' (same fraction everywhere) or 'global' (one threshold)."""

    sparsity: float = 0.5
    scope: str = "global"
    importance: str = "magnitude"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    per_layer: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        """Refuse a sparsity outside [0, 1), an unknown scope or importance."""
        check_sparsity(self.sparsity, "Magnitude.sparsity")
        for name, s in self.per_layer.items():
            check_sparsity(s, f"Magnitude.per_layer[{name!r}]")
        if self.scope not in ("layer", "global"):
            raise NetshrinkError(f"unknown scope {self.scope!r}", where="Magnitude.scope", hint="'layer' or 'global'")
        if self.importance not in KINDS:
            raise NetshrinkError(f"unknown importance {self.importance!r}", where="Magnitude.importance",
                                 hint=f"one of {', '.join(KINDS)}")


def check_sparsity(value: float, where: str) -> None:
    """Sparsity must lie in [0, 1): 1.0 would remove the whole layer."""
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise NetshrinkError(f"sparsity {value!r} is outside [0, 1)", where=where)


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask keeping all but the `k` lowest scores (ties broken by position, so exactly k are removed)."""
    flat = scores.flatten()
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.argsort(flat, stable=True)[:k]] = False
    return mask.view_as(scores)


def compute_masks(scores: dict[str, torch.Tensor], config: Magnitude) -> dict[str, torch.Tensor]:
    """Masks from importance scores: per-layer overrides first, then one global percentile or the same per layer."""
    masks: dict[str, torch.Tensor] = {}
    fixed = {n: s for n, s in scores.items() if n in config.per_layer}
    for name, s in fixed.items():
        masks[name] = lowest_k_mask(s, int(round(config.per_layer[name] * s.numel())))
    rest = {n: s for n, s in scores.items() if n not in fixed}
    if not rest:
        _refuse_empty_layers(masks, config)
        return masks
    if config.scope == "layer":
        for name, s in rest.items():
            masks[name] = lowest_k_mask(s, int(round(config.sparsity * s.numel())))
        _refuse_empty_layers(masks, config)
        return masks
    flat = torch.cat([s.flatten() for s in rest.values()])
    global_mask = lowest_k_mask(flat, int(round(config.sparsity * flat.numel())))
    offset = 0
    for name, s in rest.items():
        masks[name] = global_mask[offset:offset + s.numel()].view_as(s)
        offset += s.numel()
    _refuse_empty_layers(masks, config)
    return masks


def _refuse_empty_layers(masks: dict[str, torch.Tensor], config: Magnitude) -> None:
    """A layer with no weight left cuts the model in two: refuse it, naming the layer and how to spare it."""
    for name, mask in masks.items():
        if mask.numel() == 0 or bool(mask.any()):
            continue
        if name in config.per_layer:
            what, hint = f"per_layer sparsity {config.per_layer[name]}", f"lower Magnitude.per_layer[{name!r}]"
        elif config.scope == "global":
            what, hint = f"global sparsity {config.sparsity}", "use scope='layer', a per_layer entry, or exclude it"
        else:
            what, hint = f"sparsity {config.sparsity}", "give it a lower per_layer sparsity, or exclude it"
        raise NetshrinkError(f"{what} would remove every weight of this layer (0 of {mask.numel()} kept)",
                             where=name, hint=hint)


def magnitude_prune(model: nn.Module, config: Magnitude, calibration: Iterable[Any] | None = None,
                    loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """Put unstructured masks on `model` in place (weights stay in memory, zeros under the mask); returns the masks."""
    config.validate()
    layers = prunable_layers(model, config.include, config.exclude, where="Magnitude.exclude")
    for name in config.per_layer:
        if name not in layers:
            raise no_match(name, list(layers), where=f"Magnitude.per_layer[{name!r}]", what="prunable layer",
                           kind="name")
    scores = weight_scores(model, layers, config.importance, calibration, loss_fn)
    masks = compute_masks(scores, config)
    for name, mask in masks.items():
        set_mask(layers[name], mask, where=name)
        note(model, name, method=f"prune:{config.importance}", pattern="unstructured",
             sparsity=round(1.0 - float(mask.float().mean()), 6))
    return masks
