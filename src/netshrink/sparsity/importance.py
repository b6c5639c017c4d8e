"""Per-weight importance for unstructured pruning: |w|, first-order Taylor |w * dL/dw|, and LAMP (Lee et al. 2021)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import NetshrinkError

LossFn = Callable[[nn.Module, Any], torch.Tensor]
KINDS = ("magnitude", "magnitude_x_grad", "lamp")


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy for an (inputs, labels) batch: the loss a classifier was trained with."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise NetshrinkError("gradient importance needs (inputs, labels) batches or a loss_fn(model, batch)",
                             where="calibration")
    x, y = batch
    return F.cross_entropy(model(x), y)


def accumulate_grad_scores(model: nn.Module, layers: dict[str, nn.Module], calibration: Iterable[Any] | None,
                           loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """Sum over batches of |w * dL/dw| for each layer: the loss change a first-order expansion predicts when w -> 0."""
    if calibration is None:
        raise NetshrinkError("importance 'magnitude_x_grad' needs calibration batches", where="calibration",
                             hint="pass calibration=[(x, y), ...] and optionally loss_fn=")
    loss_fn = loss_fn or default_loss
    scores = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers.items()}
    was_training = model.training
    model.eval()
    params = {n: _trainable_weight(m) for n, m in layers.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    seen = 0
    for batch in calibration:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        for n, m in layers.items():
            grad = params[n].grad
            if grad is not None:
                scores[n] += (m.weight.detach() * grad).abs().float()
        seen += 1
    model.zero_grad(set_to_none=True)
    for n, p in params.items():
        p.requires_grad_(flags[n])
    model.train(was_training)
    if seen == 0:
        raise NetshrinkError("calibration yielded no batch", where="calibration")
    return scores


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score w_u^2 / sum_{v >= u} w_v^2 over the layer's weights sorted by magnitude (ascending)."""
    sq = weight.detach().float().flatten() ** 2
    order = torch.argsort(sq, stable=True)
    sorted_sq = sq[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
    scores_sorted = sorted_sq / tail.clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.empty_like(sq)
    out[order] = scores_sorted
    return out.view_as(weight)


def weight_scores(model: nn.Module, layers: dict[str, nn.Module], kind: str,
                  calibration: Iterable[Any] | None = None, loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """Importance of every weight of every layer, by `kind` (one of KINDS)."""
    if kind == "magnitude":
        return {n: m.weight.detach().abs().float() for n, m in layers.items()}
    if kind == "magnitude_x_grad":
        return accumulate_grad_scores(model, layers, calibration, loss_fn)
    if kind == "lamp":
        return {n: lamp_scores(m.weight) for n, m in layers.items()}
    raise NetshrinkError(f"unknown importance {kind!r}", where="importance", hint=f"one of {', '.join(KINDS)}")


def _trainable_weight(module: nn.Module) -> torch.Tensor:
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        return parametrizations["weight"].original
    return module.weight
