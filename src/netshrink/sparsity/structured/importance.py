"""Importance of a structured unit (channel, neuron, head): weight norms, BatchNorm scale, first-order Taylor."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity.importance import LossFn, default_loss
from netshrink.sparsity.structured.groups import Group, Slice, tensor_of

KINDS = ("l1", "l2", "group_l2", "bn_scale", "taylor", "activation", "random")


def _per_unit(tensor: torch.Tensor, s: Slice, size: int) -> torch.Tensor:
    """The slice's entries arranged as [size, inner * rest] (one row per unit)."""
    moved = tensor.detach().float().movedim(s.dim, 0)
    part = moved[s.offset: s.offset + size * s.inner]
    return part.reshape(size, -1)


def norm_importance(model: nn.Module, group: Group, p: int, producers_only: bool) -> torch.Tensor:
    """Sum of |w|^p over the unit's producer weights (Li et al. 2017 filter norms) or over every coupled weight."""
    total = torch.zeros(group.size)
    for s in group.slices:
        if s.param != "weight" or (producers_only and s.role != "out") or s.role == "norm":
            continue
        total += _per_unit(tensor_of(model, s), s, group.size).abs().pow(p).sum(1)
    return total if p == 1 else total.sqrt()


def bn_scale_importance(model: nn.Module, group: Group) -> torch.Tensor | None:
    """|gamma| of the BatchNorm layers that normalise the channel (network slimming, Liu et al. 2017)."""
    norms = [s for s in group.slices if s.role == "norm" and s.param == "weight"
             and isinstance(model.get_submodule(s.module), nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return None
    return sum(_per_unit(tensor_of(model, s), s, group.size).abs().sum(1) for s in norms)


def taylor_importance(model: nn.Module, groups: list[Group], calibration: Iterable[Any] | None,
                      loss_fn: LossFn | None) -> dict[str, torch.Tensor]:
    """Molchanov et al. 2019: mean over batches of (sum over the unit's weights of w * dL/dw)^2."""
    if calibration is None:
        raise NetshrinkError("importance 'taylor' needs calibration batches", where="calibration",
                             hint="pass calibration=[batch, ...] and a loss_fn(model, batch) unless batches are (x, y)")
    loss_fn = loss_fn or default_loss
    scores = {g.name: torch.zeros(g.size) for g in groups}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    was_training = model.training
    model.eval()
    batches = 0
    try:
        for batch in calibration:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for g in groups:
                contrib = torch.zeros(g.size)
                for s in g.slices:
                    if s.role == "norm" and s.param != "weight":
                        continue
                    t = tensor_of(model, s)
                    if t.grad is None:
                        continue
                    contrib += (_per_unit(t, s, g.size) * _per_unit(t.grad, s, g.size)).sum(1)
                scores[g.name] += contrib.pow(2)
            batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    if batches == 0:
        raise NetshrinkError("calibration yielded no batch", where="calibration")
    return {k: v / batches for k, v in scores.items()}


@torch.no_grad()
def activation_importance(model: nn.Module, groups: list[Group], calibration: Iterable[Any] | None
                          ) -> dict[str, torch.Tensor]:
    """Expected squared output change when a unit goes: sum over its input positions p of each consumer of
    E[x_p^2] * ||W[:, p]||^2, with x the consumer's real input on calibration batches (as in Wanda / FLAP)."""
    if calibration is None:
        raise NetshrinkError("importance 'activation' needs calibration batches (model inputs, no labels)",
                             where="calibration")
    sums, _, counts = consumer_input_stats(model, groups, calibration)
    scores = {}
    for g in groups:
        total = torch.zeros(g.size)
        for s in g.slices:
            if s.role != "in" or s.module not in sums:
                continue
            w = tensor_of(model, s).detach().float()
            col = w.movedim(1, 0).reshape(w.shape[1], -1).pow(2).sum(1)  # ||W[:, p]||^2 per input position
            meansq = sums[s.module] / counts[s.module]
            total += _per_unit((col * meansq)[:, None], Slice(s.module, s.param, 0, s.offset, s.inner), g.size).sum(1)
        scores[g.name] = total
    return scores


@torch.no_grad()
def consumer_input_stats(model: nn.Module, groups: list[Group], calibration: Iterable[Any] | None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int]]:
    """Per consumer module: sum of x^2 and of x per input position over calibration batches, and the row count."""
    if calibration is None:
        raise NetshrinkError("this needs calibration batches (model inputs, no labels)", where="calibration")
    from netshrink.sparsity.recovery import _call

    consumers = sorted({s.module for g in groups for s in g.slices if s.role == "in"})
    sums: dict[str, torch.Tensor] = {}
    firsts: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name in consumers:
        module = model.get_submodule(name)

        def hook(m: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].detach().float()
            if isinstance(m, nn.Linear):
                flat = x.reshape(-1, x.shape[-1])
            else:
                flat = x.movedim(1, -1).reshape(-1, x.shape[1])
            sums[name] = sums.get(name, 0) + flat.pow(2).sum(0)
            firsts[name] = firsts.get(name, 0) + flat.sum(0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        batches = 0
        for batch in calibration:
            _call(model, batch)
            batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if batches == 0:
        raise NetshrinkError("calibration yielded no batch", where="calibration")
    return sums, firsts, counts


@torch.no_grad()
def bias_compensation(model: nn.Module, groups: list[Group], removed: dict[str, torch.Tensor],
                      calibration: Iterable[Any] | None, stats: tuple | None = None) -> dict[str, torch.Tensor]:
    """Per Linear consumer with a bias: W[:, p] @ E[x_p] summed over its removed input positions p, the mean
    contribution the removed units made (added to the bias, as in FLAP, An et al. 2024).

    stats: `consumer_input_stats` computed once already (they do not depend on what is removed)."""
    sums, firsts, counts = stats if stats is not None else consumer_input_stats(model, groups, calibration)
    delta: dict[str, torch.Tensor] = {}
    for g in groups:
        gone = removed[g.name]
        if gone.numel() == 0:
            continue
        for s in g.slices:
            module = model.get_submodule(s.module)
            if s.role != "in" or not isinstance(module, nn.Linear) or module.bias is None or s.module not in firsts:
                continue
            pos = s.positions(gone)
            w = tensor_of(model, s).detach().float()
            mean = firsts[s.module][pos] / counts[s.module]
            delta[s.module] = delta.get(s.module, 0) + w[:, pos] @ mean
    return delta


def unit_importance(model: nn.Module, groups: list[Group], kind: str, calibration: Iterable[Any] | None = None,
                    loss_fn: LossFn | None = None, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Importance per unit of each group, and per group the criterion actually used (bn_scale falls back to l2)."""
    if kind not in KINDS:
        raise NetshrinkError(f"unknown structured importance {kind!r}", where="Structured.importance",
                             hint=f"one of {', '.join(KINDS)}")
    if kind == "taylor":
        return taylor_importance(model, groups, calibration, loss_fn), {g.name: kind for g in groups}
    if kind == "activation":
        return activation_importance(model, groups, calibration), {g.name: kind for g in groups}
    scores, used = {}, {}
    gen = torch.Generator().manual_seed(seed)
    for g in groups:
        used[g.name] = kind
        if kind == "random":
            scores[g.name] = torch.rand(g.size, generator=gen)
        elif kind == "bn_scale":
            bn = bn_scale_importance(model, g)
            if bn is None:
                used[g.name] = "l2 (no BatchNorm on this group)"
                bn = norm_importance(model, g, 2, producers_only=True)
            scores[g.name] = bn
        else:
            p = 1 if kind == "l1" else 2
            scores[g.name] = norm_importance(model, g, p, producers_only=kind != "group_l2")
    return scores, used
