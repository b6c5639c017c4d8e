"""Structured pruning that physically removes units: plan (groups + importance + selection), then cut or mask.

Dependency analysis (graph.py, transformer.py) says what is coupled; importance.py ranks units; this file picks
how many per group and applies the choice, physically (a smaller dense model) or as masks (same shapes).
"""
from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.patterns import no_match
from netshrink.record import note
from netshrink.sparsity.importance import LossFn
from netshrink.sparsity.masks import make_permanent, masked_modules
from netshrink.sparsity.structured.graph import TraceFailure, channel_groups, inputs_misfit
from netshrink.sparsity.structured.groups import (Group, Slice, mask_positions, remove_physically,
                                                  removal_positions, tensor_of)
from netshrink.sparsity.structured.hf_config import sync_module_attributes, update_hf_config
from netshrink.sparsity.structured.importance import KINDS, bias_compensation, unit_importance
from netshrink.sparsity.structured.reconstruct import RefitResult, reconstruct_
from netshrink.sparsity.structured.transformer import GQA_MODES, transformer_groups

TARGETS = ("channels", "ffn", "heads")
REPORT_ATTR = "_netshrink_structured_report"


@dataclass
class Structured:
    """Remove `ratio` of the units of every coupled group (channels, FFN neurons) and `head_ratio` of the heads.

    targets: 'auto' (FFN + heads on transformers, channels elsewhere) or a tuple from TARGETS.
    gqa: 'query_heads' (drop the same number of query heads in every KV group) or 'kv_groups' (drop whole groups).
    per_group: fnmatch pattern on a group name -> ratio for that group (1.0 would leave zero units: refused).
    round_to: keep a multiple of this many units (e.g. 8 for SIMD-friendly widths).
    physical: False keeps shapes and masks the same units instead (the reference 'masked model').
    compensate: fold the removed units' mean contribution on `calibration` inputs into the consumers' biases
    (Linear consumers with a bias; both the cut and the masked model get it).
    reconstruct: after a physical cut, refit every Linear whose inputs were cut by least squares on `calibration`
    against the uncut model (see `reconstruct.py`); masks and fallbacks skip it and say so in the report.
    """

    ratio: float = 0.5
    head_ratio: float | None = None
    importance: str = "l2"
    targets: str | tuple[str, ...] = "auto"
    gqa: str = "query_heads"
    per_group: dict[str, float] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    round_to: int = 1
    physical: bool = True
    compensate: bool = False
    reconstruct: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Refuse ratios outside [0, 1), unknown targets, importances or GQA modes."""
        for where, r in (("Structured.ratio", self.ratio), ("Structured.head_ratio", self.head_ratio)):
            if r is not None and not (isinstance(r, (int, float)) and 0.0 <= r < 1.0):
                raise NetshrinkError(f"ratio {r!r} is outside [0, 1)", where=where)
        for pattern, r in self.per_group.items():
            if not (isinstance(r, (int, float)) and 0.0 <= r <= 1.0):
                raise NetshrinkError(f"ratio {r!r} is outside [0, 1]", where=f"Structured.per_group[{pattern!r}]")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        for t in targets:
            if t not in TARGETS + ("auto",):
                raise NetshrinkError(f"unknown target {t!r}", where="Structured.targets", hint=", ".join(TARGETS))
        if self.importance not in KINDS:
            raise NetshrinkError(f"unknown importance {self.importance!r}", where="Structured.importance",
                                 hint=", ".join(KINDS))
        if self.gqa not in GQA_MODES:
            raise NetshrinkError(f"unknown gqa mode {self.gqa!r}", where="Structured.gqa", hint=" or ".join(GQA_MODES))
        if self.round_to < 1:
            raise NetshrinkError("round_to must be >= 1", where="Structured.round_to")


@dataclass
class StructuredPlan:
    """What to remove: groups, the removed unit indices per group, and why some spaces were left alone."""

    groups: list[Group]
    removed: dict[str, torch.Tensor]
    importance_used: dict[str, str]
    blocked: dict[str, str] = field(default_factory=dict)
    fallback: str = ""
    bias_delta: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StructuredReport:
    """Outcome of structured pruning, also attached to the model (see `structured_report`)."""

    mode: str
    reason: str
    groups: list[dict[str, Any]]
    blocked: dict[str, str]
    params_before: int
    params_after: int
    refits: list[RefitResult] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary."""
        out = [f"structured pruning: {self.mode}" + (f" ({self.reason})" if self.reason else ""),
               f"parameters {self.params_before:,} -> {self.params_after:,} "
               f"({self.params_after / max(self.params_before, 1):.1%})"]
        out += [f"  {g['name']} [{g['kind']}]: {g['before']} -> {g['after']} by {g['importance']}" for g in self.groups]
        out += [f"  left alone: {name}: {why}" for name, why in self.blocked.items()]
        out += [f"  refit of {r.layer} skipped: {r.skipped}" if r.skipped else
                f"  refitted {r.layer} on {r.tokens} tokens: target error {r.error_before:.4f} -> {r.error_after:.4f}"
                for r in self.refits]
        return out


def _targets(config: Structured, has_transformer: bool) -> tuple[str, ...]:
    targets = (config.targets,) if isinstance(config.targets, str) else tuple(config.targets)
    if "auto" in targets:
        return ("ffn", "heads") if has_transformer else ("channels",)
    return targets


def _fallback_groups(model: nn.Module) -> list[Group]:
    """Without a graph: each Conv/Linear's own output rows, except the last layer (it makes the model output)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    groups = []
    for name, m in layers[:-1]:
        slices = [Slice(name, "weight", 0)] + ([Slice(name, "bias", 0)] if m.bias is not None else [])
        groups.append(Group(name, m.weight.shape[0], "channels", slices))
    return groups


def _group_matches(name: str, pattern: str) -> bool:
    """The rule by which `per_group` and `exclude` patterns select a group: fnmatch on the group's name."""
    return fnmatch.fnmatchcase(name, pattern) or name == pattern


def _check_patterns(groups: list[Group], config: Structured) -> None:
    """Refuse a per_group or exclude pattern that selects no group (it would silently do nothing). An exclude
    pattern naming only layers of groups that other exclude patterns select is accepted (recipes list every layer
    under an excluded block, norms included)."""
    names = [g.name for g in groups]
    fields = [(p, f"Structured.per_group[{p!r}]", False) for p in config.per_group]
    fields += [(p, f"Structured.exclude[{i}]", True) for i, p in enumerate(config.exclude)]
    for pattern, where, is_exclude in fields:
        if any(_group_matches(n, pattern) for n in names):
            continue
        holders = [g.name for g in groups if any(fnmatch.fnmatchcase(s.module, pattern) for s in g.slices)]
        if holders and is_exclude and all(any(_group_matches(h, p) for p in config.exclude) for h in holders):
            continue
        if holders:
            raise NetshrinkError(f"pattern '{pattern}' matches no group of this model", where=where,
                                 hint=f"patterns select groups by name, and this layer is cut as part of group "
                                      f"'{holders[0]}'")
        raise no_match(pattern, names, where, what="group")


def _ratio_for(group: Group, config: Structured) -> float:
    for pattern, r in config.per_group.items():
        if _group_matches(group.name, pattern):
            return float(r)
    if group.kind in ("heads", "kv_groups") and config.head_ratio is not None:
        return config.head_ratio
    return config.ratio


def _select(group: Group, scores: torch.Tensor, config: Structured) -> torch.Tensor:
    """Indices of the units to remove: the lowest-importance ones, keeping a multiple of round_to (at least one)."""
    ratio = _ratio_for(group, config)
    keep = group.size - int(math.floor(ratio * group.size + 1e-9))
    if keep > 0 and config.round_to > 1:
        keep = min(group.size, int(math.ceil(keep / config.round_to) * config.round_to))
    if keep <= 0:
        unit = {"heads": "attention heads", "kv_groups": "KV groups", "ffn": "FFN neurons"}.get(group.kind, "channels")
        raise NetshrinkError(f"pruning ratio {ratio} would leave zero {unit}", where=group.name,
                             hint="use a ratio below 1 for this layer")
    order = torch.argsort(scores, stable=True)
    return torch.sort(order[: group.size - keep]).values


def plan_structured(model: nn.Module, config: Structured, example_inputs: tuple | None = None,
                    calibration: Iterable[Any] | None = None, loss_fn: LossFn | None = None) -> StructuredPlan:
    """Find coupled groups, rank their units and choose which to remove (the model is not changed)."""
    config.validate()
    ffn, heads = transformer_groups(model, config.gqa)
    targets = _targets(config, bool(ffn or heads))
    groups: list[Group] = []
    blocked: dict[str, str] = {}
    fallback = ""
    if "ffn" in targets:
        groups += ffn
    if "heads" in targets:
        groups += heads
    if "channels" in targets:
        if example_inputs is None:
            raise NetshrinkError("channel pruning traces the model and needs example inputs", where="example_inputs",
                                 hint="pass example_inputs=(x,) with a real batch")
        if isinstance(example_inputs, torch.Tensor):
            raise NetshrinkError("example_inputs is a tensor, not a tuple of model inputs", where="example_inputs",
                                 hint="pass example_inputs=(x,)")
        try:
            analysis = channel_groups(model, tuple(example_inputs))
            groups += analysis.groups
            blocked.update(analysis.blocked)
        except TraceFailure as failure:
            fallback = (f"graph not traceable at {failure.op} ({failure.reason}); fell back to masks on each "
                        "layer's output channels: same shapes, no speedup")
            groups += _fallback_groups(model)
    _check_patterns(groups, config)
    if config.exclude:
        groups = [g for g in groups if not any(_group_matches(g.name, p) for p in config.exclude)]
    if not groups:
        raise NetshrinkError(f"nothing to prune for targets {targets}", where=type(model).__name__,
                             hint="; ".join(f"{k}: {v}" for k, v in blocked.items()) or None)
    scores, used = unit_importance(model, groups, config.importance, calibration, loss_fn, config.seed)
    removed = {g.name: _select(g, scores[g.name], config) for g in groups}
    _check_gqa_uniform(groups, removed)
    delta = bias_compensation(model, groups, removed, calibration) if config.compensate and not fallback else {}
    return StructuredPlan(groups, removed, used, blocked, fallback, delta)


def _check_gqa_uniform(groups: list[Group], removed: dict[str, torch.Tensor]) -> None:
    """Every KV group of a layer must keep the same number of query heads (one num_key_value_groups per layer)."""
    per_layer: dict[str, set[int]] = {}
    for g in groups:
        if g.kind == "heads" and "/kv" in g.name:
            per_layer.setdefault(g.name.split("/kv")[0], set()).add(g.size - removed[g.name].numel())
    for layer, kept in per_layer.items():
        if len(kept) > 1:
            raise NetshrinkError(f"KV groups would keep different numbers of query heads {sorted(kept)}", where=layer,
                                 hint="give every KV group of a layer the same ratio, or use gqa='kv_groups'")


def apply_plan(model: nn.Module, plan: StructuredPlan, physical: bool = True) -> StructuredReport:
    """Apply `plan` to `model` in place: cut the units out (physical) or mask them; returns the report."""
    before = sum(p.numel() for p in model.parameters())
    positions = removal_positions([(g, plan.removed[g.name]) for g in plan.groups])
    physical = physical and not plan.fallback
    if physical and masked_modules(model):
        make_permanent(model)
    with torch.no_grad():
        for name, delta in plan.bias_delta.items():
            bias = tensor_of(model, Slice(name, "bias", 0))
            bias.add_(delta.to(bias.dtype))
    if physical:
        remove_physically(model, positions)
        sync_module_attributes(model)
        update_hf_config(model)
    else:
        mask_positions(model, positions)
    rows = []
    for g in plan.groups:
        kept = g.size - plan.removed[g.name].numel()
        rows.append({"name": g.name, "kind": g.kind, "before": g.size, "after": kept,
                     "importance": plan.importance_used[g.name]})
        for s in g.slices:
            if s.role == "out" and s.param == "weight":
                note(model, s.module, method="prune:structured", pattern=g.kind, kept_units=kept, units=g.size,
                     physical=physical)
    after = sum(p.numel() for p in model.parameters()) if physical else before
    mode = "physical" if physical else "masks"
    report = StructuredReport(mode, plan.fallback, rows, plan.blocked, before, after)
    object.__setattr__(model, REPORT_ATTR, report)
    return report


def structured_report(model: nn.Module) -> StructuredReport | None:
    """The report of the last structured pruning applied to `model`, if any."""
    return getattr(model, REPORT_ATTR, None)


def prune_structured(model: nn.Module, config: Structured, example_inputs: tuple | None = None,
                     calibration: Iterable[Any] | None = None, loss_fn: LossFn | None = None) -> nn.Module:
    """Plan and apply structured pruning in place; if the cut model fails to run on example_inputs, mask instead.

    With `config.reconstruct`, the cut layers' consumers are then refitted against the uncut model.
    """
    if config.reconstruct and calibration is None:
        raise NetshrinkError("reconstruction refits layers on calibration inputs; none were given",
                             where="Structured.reconstruct", hint="pass calibration=[batch, ...] (model inputs)")
    if config.reconstruct and not isinstance(calibration, (list, tuple)):
        calibration = list(calibration)
    plan = plan_structured(model, config, example_inputs, calibration, loss_fn)
    if plan.fallback:
        warnings.warn(plan.fallback, UserWarning, stacklevel=2)
    if not config.physical or plan.fallback:
        report = apply_plan(model, plan, physical=config.physical)
        if config.reconstruct:
            report.blocked["reconstruct"] = "skipped: it refits cut layers, and this model was masked, not cut"
        return model
    backup = copy.deepcopy(model) if example_inputs is not None or config.reconstruct else None
    report = apply_plan(model, plan, physical=True)
    if example_inputs is not None:
        try:
            with torch.no_grad():
                model.eval()(*example_inputs)
        except Exception as exc:  # a forward with hard-coded sizes: say so and keep the masked twin
            _restore(model, backup)
            _check_inputs_run(model, example_inputs)
            plan.fallback = (f"the cut model failed to run ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                             "fell back to masks: same shapes, no speedup")
            warnings.warn(plan.fallback, UserWarning, stacklevel=2)
            apply_plan(model, plan, physical=False)
            return model
    if config.reconstruct:
        report.refits = reconstruct_(model, backup, calibration)
    return model


def _check_inputs_run(model: nn.Module, example_inputs: tuple) -> None:
    """Run the uncut `model` (in eval mode) on `example_inputs`; if that fails too, the inputs are at fault, not the
    cut: raise NetshrinkError naming the innermost layer that was running."""
    running: list[str] = []
    modes = {m: m.training for m in model.modules()}
    def entered(name: str) -> Any:
        return lambda module, args: running.append(f"{name} ({type(module).__name__})")

    hooks = [m.register_forward_pre_hook(entered(name)) for name, m in model.named_modules()
             if name and not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            model.eval()(*example_inputs)
    except Exception as exc:
        at = running[-1] if running else type(model).__name__
        raise inputs_misfit(tuple(example_inputs), at, exc) from None
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)


def _restore(model: nn.Module, backup: nn.Module) -> None:
    """Put every child of `backup` back into `model` (undoing a physical cut)."""
    for name, child in backup.named_children():
        setattr(model, name, child)
    for name, p in backup.named_parameters(recurse=False):
        setattr(model, name, p)
