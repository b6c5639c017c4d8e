"""Which layers pruning touches: Linear and Conv weights by default, never a weight shared between modules (tied)."""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.patterns import has_own_params, no_match

PRUNABLE_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The effective weight of `module` (the masked one when a mask parametrization is registered)."""
    return module.weight


def check_exclude(model: nn.Module, exclude: Iterable[str], where: str) -> None:
    """Every exclude pattern must select a Linear/Conv layer (by the rule `prunable_layers` applies), or name exactly
    a layer pruning never touches (a norm or an embedding; recipes pass such names when a pattern spans a block)."""
    if not exclude:
        return
    candidates = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    untouched = {n for n, m in model.named_modules()
                 if n and has_own_params(m) and not any(isinstance(sub, PRUNABLE_TYPES) for sub in m.modules())}
    for i, pattern in enumerate(exclude):
        if pattern not in untouched and not any(_matches(n, [pattern]) for n in candidates):
            raise no_match(pattern, candidates, f"{where}[{i}]")


def prunable_layers(
    model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] = (), where: str = "exclude"
) -> dict[str, nn.Module]:
    """Linear/Conv layers of `model` selected by fnmatch patterns; tied weights (e.g. an lm_head) are left out.

    An exclude pattern that selects no layer is refused, naming it as `where[i]` (e.g. "Magnitude.exclude[0]").
    """
    seen: dict[int, str] = {}
    shared: set[int] = set()
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            pid = id(p)
            if pid in seen and seen[pid] != id(module):
                shared.add(pid)
            seen.setdefault(pid, id(module))
    exclude = tuple(exclude)
    include = tuple(include) if include is not None else None
    check_exclude(model, exclude, where)
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if include is not None and not _matches(name, include):
            continue
        if exclude and _matches(name, exclude):
            continue
        original = _original_weight(module)
        if id(original) in shared:
            continue
        chosen[name] = module
    if include is not None:
        for pattern in include:
            if not any(_matches(n, [pattern]) for n in chosen):
                raise NetshrinkError("no prunable Linear/Conv layer matches this pattern", where=pattern,
                                     hint="layer names are those of model.named_modules()")
    if not chosen:
        raise NetshrinkError("the model has no prunable Linear/Conv layer", where=type(model).__name__)
    return chosen


def _original_weight(module: nn.Module) -> torch.Tensor:
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        return parametrizations["weight"].original
    return module.weight
