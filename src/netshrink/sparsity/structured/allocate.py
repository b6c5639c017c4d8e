"""Non-uniform structured budgets from measured sensitivity.

Uniform pruning removes the same share of heads and neurons from every layer, yet layers differ in how much they
need them. `scan_groups` cuts each group alone at several ratios and records the quality lost; `allocate_groups`
then picks one ratio per group so that every kind (heads, FFN neurons, channels) loses the same total number of
units as the uniform budget, with the least summed loss (an exact dynamic programme over the measured options,
assuming losses add). The result is a `Structured.per_group` dict, so the cut itself is unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity.importance import LossFn
from netshrink.sparsity.structured.groups import Group
from netshrink.sparsity.structured.importance import bias_compensation, consumer_input_stats, unit_importance
from netshrink.sparsity.structured.reconstruct import reconstruct_
from netshrink.sparsity.structured.prune import (Structured, StructuredPlan, _ratio_for, _select, apply_plan,
                                                 plan_structured)

DEFAULT_RATIOS = (0.25, 0.375, 0.5, 0.625, 0.75)


@dataclass
class GroupScan:
    """Quality lost (baseline score minus score) with only this group cut, at each ratio."""

    name: str
    kind: str
    size: int
    ratios: list[float]
    loss: list[float]


@torch.no_grad()
def scan_groups(model: nn.Module, config: Structured, evaluate: Callable[[nn.Module], float],
                ratios: Iterable[float] = DEFAULT_RATIOS, example_inputs: tuple | None = None,
                calibration: Iterable[Any] | None = None, loss_fn: LossFn | None = None) -> list[GroupScan]:
    """Cut each group of `config`'s plan alone at each ratio (importance and compensation computed once; with
    `config.reconstruct` the cut layer is refitted too, so the scan measures the recipe that will be applied) and
    measure `evaluate(cut_model)` (higher is better); the model is not changed."""
    ratios = sorted(set(float(r) for r in ratios))
    if not ratios or not all(0.0 < r < 1.0 for r in ratios):
        raise NetshrinkError(f"scan ratios must lie in (0, 1), got {ratios}", where="scan_groups.ratios")
    calibration = list(calibration) if calibration is not None else None
    plan = plan_structured(model, config, example_inputs, calibration, loss_fn)
    if plan.fallback:
        raise NetshrinkError(plan.fallback, where=type(model).__name__, hint="a scan needs a model that can be cut")
    scores, used = unit_importance(model, plan.groups, config.importance, calibration, loss_fn, config.seed)
    stats = consumer_input_stats(model, plan.groups, calibration) if config.compensate else None
    baseline = float(evaluate(model))
    none = {g.name: torch.empty(0, dtype=torch.long) for g in plan.groups}
    out = []
    for g in plan.groups:
        losses = []
        for r in ratios:
            removed = dict(none)
            removed[g.name] = _select(g, scores[g.name], dataclasses.replace(config, per_group={g.name: r}))
            delta = bias_compensation(model, plan.groups, removed, calibration, stats) if stats else {}
            cut = copy.deepcopy(model)
            apply_plan(cut, StructuredPlan(plan.groups, removed, used, bias_delta=delta), physical=True)
            if config.reconstruct:
                reconstruct_(cut, model, calibration)
            losses.append(baseline - float(evaluate(cut.eval())))
        out.append(GroupScan(g.name, g.kind, g.size, ratios, losses))
    return out


def allocate_groups(scans: list[GroupScan], config: Structured) -> dict[str, float]:
    """Per-group ratios removing, for each kind, as many units as `config` would uniformly, at least summed loss."""
    by_kind: dict[str, list[GroupScan]] = {}
    for s in scans:
        by_kind.setdefault(s.kind, []).append(s)
    result: dict[str, float] = {}
    for kind, group_scans in by_kind.items():
        target = sum(math.floor(_ratio_for(Group(s.name, s.size, s.kind), config) * s.size + 1e-9) for s in group_scans)
        result.update(_cheapest(group_scans, target, kind))
    return result


def _cheapest(scans: list[GroupScan], target: int, kind: str) -> dict[str, float]:
    """Exact DP: one option (ratio 0 or a scanned ratio) per group, total removed units == target, least loss."""
    best: dict[int, tuple[float, tuple[float, ...]]] = {0: (0.0, ())}
    for s in scans:
        options = [(0, 0.0, 0.0)] + [(math.floor(r * s.size + 1e-9), loss, r) for r, loss in zip(s.ratios, s.loss)]
        nxt: dict[int, tuple[float, tuple[float, ...]]] = {}
        for units, (total, chosen) in best.items():
            for add, loss, r in options:
                key, value = units + add, total + loss
                if key <= target and (key not in nxt or value < nxt[key][0]):
                    nxt[key] = (value, chosen + (r,))
        best = nxt
    if target not in best:
        raise NetshrinkError(f"no combination of the scanned ratios removes exactly {target} {kind} units",
                             where="allocate_groups", hint="scan more ratios (e.g. steps of 1/size)")
    return {s.name: r for s, r in zip(scans, best[target][1])}
