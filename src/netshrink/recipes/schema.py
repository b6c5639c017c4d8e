"""A recipe: ordered stages (prune, finetune, quantize, export), each one method with its parameters, layers it
skips (`exclude`) and per-layer overrides, keyed by module-name glob."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from netshrink.recipes.methods import MethodSpec, method
from netshrink.recipes.params import Params


@dataclass(frozen=True)
class Override:
    """Parameters for the layers matching `pattern`; `skip` leaves them untouched by this stage."""

    pattern: str
    values: dict[str, Any]
    skip: bool = False
    line: int | None = None


@dataclass(frozen=True)
class Stage:
    """One step of a recipe: `kind` (prune, finetune, quantize, export), the method and its validated parameters."""

    kind: str
    method: str
    params: Params
    exclude: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    where: str = ""  # "recipe.yaml:12 stages[1].quantize" for errors raised while running
    exclude_lines: tuple[int | None, ...] = ()
    source: str = ""
    path: str = ""

    @property
    def spec(self) -> MethodSpec:
        found = method(self.kind, self.method)
        assert found is not None  # the loader only builds stages of registered methods
        return found

    def describe(self) -> str:
        """One line: 'quantize int8-static (calibration_samples=256)'."""
        values = ", ".join(f"{k}={v}" for k, v in self.params.model_dump().items() if v not in ({}, None))
        return f"{self.kind} {self.method}" + (f" ({values})" if values else "")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; `source` is the file (or 'built-in:NAME', or '<dict>') it came from."""

    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    suits: tuple[str, ...] = ()
    source: str = "<dict>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def describe(self) -> list[str]:
        return [stage.describe() for stage in self.stages]

    def with_export(self, fmt: str) -> "Recipe":
        return with_export(self, fmt)


def with_export(recipe: Recipe, fmt: str) -> Recipe:
    """The recipe with its export stage replaced by (or extended with) an export to `fmt`."""
    from netshrink.recipes.params import ExportParams

    stages = tuple(s for s in recipe.stages if s.kind != "export")
    export = Stage("export", fmt, ExportParams(), where=f"{recipe.source} --export", source=recipe.source,
                   path="--export")
    return Recipe(recipe.name, stages + (export,), recipe.description, recipe.suits, recipe.source, recipe.raw)
