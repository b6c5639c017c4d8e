"""Check a recipe against one model before any work: every stage suits the model's kind, and every exclude or
override pattern matches at least one layer (a typo'd pattern would otherwise silently do nothing)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.patterns import layer_names, no_match
from netshrink.recipes.schema import Recipe, Stage


@dataclass
class BoundStage:
    """A stage with its patterns resolved to this model's layer names."""

    stage: Stage
    exclude: list[str]
    per_layer: dict[str, dict]


def match(pattern: str, names: list[str]) -> list[str]:
    """Layer names matched by an fnmatch pattern (a module's name also selects the layers inside it)."""
    return [n for n in names if fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern + ".")
            or fnmatch.fnmatchcase(n, pattern + ".*")]


def _where(stage: Stage, line: int | None, what: str) -> str:
    return f"{stage.source}:{line} {stage.path}.{what}" if line else f"{stage.source} {stage.path}.{what}"


def _no_match(stage: Stage, pattern: str, line: int | None, what: str, names: list[str]) -> NetshrinkError:
    return no_match(pattern, names, _where(stage, line, what))


def bind(recipe: Recipe, model: nn.Module, kind: str) -> list[BoundStage]:
    """Resolve every stage's patterns on `model`; raises NetshrinkError naming the recipe line of the first problem."""
    names = layer_names(model)
    bound = []
    for stage in recipe.stages:
        if kind not in stage.spec.kinds:
            raise NetshrinkError(f"{stage.kind} method '{stage.method}' works on {', '.join(stage.spec.kinds)} models, "
                                 f"and this model is a {kind}", where=stage.where)
        exclude: list[str] = []
        for pattern, line in zip(stage.exclude, stage.exclude_lines or (None,) * len(stage.exclude)):
            found = match(pattern, names)
            if not found:
                raise _no_match(stage, pattern, line, "exclude", names)
            exclude += [n for n in found if n not in exclude]
        per_layer: dict[str, dict] = {}
        for override in stage.overrides:
            found = match(override.pattern, names)
            if not found:
                raise _no_match(stage, override.pattern, override.line, f"overrides.{override.pattern}", names)
            for name in found:
                if override.skip:
                    if name not in exclude:
                        exclude.append(name)
                elif override.values:
                    per_layer.setdefault(name, {}).update(override.values)
        bound.append(BoundStage(stage, exclude, {k: v for k, v in per_layer.items() if k not in exclude}))
    return bound
