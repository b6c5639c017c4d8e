"""Read and validate a recipe before anything runs: every problem becomes one NetshrinkError naming the file, the
line, the key path, and a suggestion when a near name exists."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from netshrink.errors import NetshrinkError
from netshrink.recipes.methods import STAGES, method, methods_of
from netshrink.recipes.params import Params
from netshrink.recipes.schema import Override, Recipe, Stage
from netshrink.recipes.yaml_lines import line_of, load_with_lines

BUILTIN_DIR = Path(__file__).parent / "builtin"
DISCRIMINATOR = {"prune": "method", "finetune": "method", "quantize": "method", "export": "format"}
DEFAULT_METHOD = {"finetune": "finetune"}


class _Header(BaseModel):
    """The top level of a recipe file."""

    model_config = ConfigDict(extra="forbid", strict=True)
    version: Literal[1] = 1
    name: str = Field(min_length=1)
    description: str = ""
    suits: list[Literal["cnn", "encoder", "decoder", "module"]] = Field(default_factory=list)
    stages: list[dict[str, Any]] = Field(min_length=1)


def dotted(path: tuple[Any, ...]) -> str:
    """('stages', 0, 'prune', 'sparsity') -> 'stages[0].prune.sparsity'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


class _Context:
    """Where the recipe came from, to turn a key path into 'file:line key.path'."""

    def __init__(self, source: str, lines: dict[tuple[Any, ...], int]) -> None:
        self.source, self.lines = source, lines

    def where(self, path: tuple[Any, ...]) -> str:
        line = line_of(self.lines, path)
        return f"{self.source}:{line} {dotted(path)}" if line else f"{self.source} {dotted(path)}"

    def fail(self, path: tuple[Any, ...], what: str, hint: str | None = None) -> NetshrinkError:
        return NetshrinkError(what, where=self.where(path), hint=hint)

    def from_pydantic(self, exc: ValidationError, base: tuple[Any, ...], model: type[BaseModel]) -> NetshrinkError:
        """The first validation error, phrased for a recipe author."""
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # a misspelt key explains a missing one
        first = errors[0]
        loc = tuple(first["loc"])
        path = base + loc
        more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
        if first["type"] == "extra_forbidden":
            key = str(loc[-1])
            fields = list(model.model_fields) if len(loc) == 1 else []
            return self.fail(path, f"unknown key '{key}'{more}", did_you_mean(key, fields))
        if first["type"] == "missing":
            return self.fail(path, f"missing required key '{loc[-1]}'{more}")
        message = first["msg"].removeprefix("Value error, ")
        got = first.get("input")
        shown = f" (got {got!r})" if not isinstance(got, dict) and loc else ""
        hint = None
        if first["type"] == "literal_error" and isinstance(got, str):
            options = first.get("ctx", {}).get("expected", "")
            close = difflib.get_close_matches(got, [o.strip(" '") for o in options.replace(" or ", ",").split(",")], n=1)
            hint = f"did you mean '{close[0]}'?" if close else None
        return self.fail(path, f"{message}{shown}{more}", hint)


def did_you_mean(word: str, options: list[str]) -> str | None:
    """'did you mean X?' for the closest option, or the list of options when none is close."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"expected one of: {', '.join(options)}" if options else None


def _validate(ctx: _Context, model: type[BaseModel], data: Any, path: tuple[Any, ...]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ctx.from_pydantic(exc, path, model) from None


def _stage(ctx: _Context, index: int, item: dict[str, Any], kind_hint: tuple[str, ...]) -> Stage:
    path: tuple[Any, ...] = ("stages", index)
    if len(item) != 1:
        keys = ", ".join(map(str, item)) or "nothing"
        raise ctx.fail(path, f"a stage is one key ({', '.join(STAGES)}) holding its settings, got {keys}")
    kind, body = next(iter(item.items()))
    if kind not in STAGES:
        raise ctx.fail(path + (kind,), f"unknown stage '{kind}'", did_you_mean(str(kind), list(STAGES)))
    path += (kind,)
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise ctx.fail(path, f"stage settings must be a mapping, got {type(body).__name__}")
    body = dict(body)
    key = DISCRIMINATOR[kind]
    name = body.pop(key, DEFAULT_METHOD.get(kind))
    if name is None:
        raise ctx.fail(path, f"missing required key '{key}'", f"one of: {', '.join(methods_of(kind))}")
    spec = method(kind, name) if isinstance(name, str) else None
    if spec is None:
        raise ctx.fail(path + (key,), f"unknown {kind} {key} '{name}'", did_you_mean(str(name), methods_of(kind)))
    exclude = body.pop("exclude", [])
    if not (isinstance(exclude, list) and all(isinstance(p, str) and p for p in exclude)):
        raise ctx.fail(path + ("exclude",), "exclude must be a list of module-name patterns (strings)")
    overrides_raw = body.pop("overrides", {})
    if not isinstance(overrides_raw, dict):
        raise ctx.fail(path + ("overrides",), "overrides must map a module-name pattern to its settings")
    params = _validate(ctx, spec.params, body, path)
    if kind_hint and not set(kind_hint) & set(spec.kinds):
        raise ctx.fail(path + (key,), f"{kind} {key} '{name}' works on {', '.join(spec.kinds)} models, but the recipe "
                       f"suits {', '.join(kind_hint)}")
    overrides = []
    for pattern, values in overrides_raw.items():
        opath = path + ("overrides", pattern)
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ctx.fail(opath, "an override maps settings to values, e.g. {sparsity: 0.3} or {skip: true}")
        allowed = list(spec.overridable) + ["skip"]
        for okey in values:
            if okey not in allowed:
                raise ctx.fail(opath + (okey,), f"'{okey}' cannot be set per layer for {kind} {name}",
                               did_you_mean(str(okey), allowed))
        skip = values.get("skip", False)
        if not isinstance(skip, bool):
            raise ctx.fail(opath + ("skip",), f"skip must be true or false (got {skip!r})")
        changed = {k: v for k, v in values.items() if k != "skip"}
        merged = {**body, **changed}
        try:
            spec.params.model_validate(merged)
        except ValidationError as exc:
            raise ctx.from_pydantic(exc, opath, spec.params) from None
        overrides.append(Override(str(pattern), changed, skip, line_of(ctx.lines, opath)))
    return Stage(kind, name, params, tuple(exclude), tuple(overrides), where=ctx.where(path), source=ctx.source,
                 path=dotted(path),
                 exclude_lines=tuple(line_of(ctx.lines, path + ("exclude", i)) for i in range(len(exclude))))


def parse_recipe(data: Any, source: str = "<dict>", lines: dict[tuple[Any, ...], int] | None = None) -> Recipe:
    """Validate an already-parsed recipe document (`lines` maps key paths to line numbers when known)."""
    ctx = _Context(source, lines or {})
    if not isinstance(data, dict):
        raise ctx.fail((), f"a recipe is a mapping with 'name' and 'stages', got {type(data).__name__}")
    header = _validate(ctx, _Header, data, ())
    kinds = tuple(header.suits)
    stages = tuple(_stage(ctx, i, item, kinds) for i, item in enumerate(header.stages))
    exports = [i for i, s in enumerate(stages) if s.kind == "export"]
    if exports and exports[-1] != len(stages) - 1 or len(exports) > 1:
        bad = exports[0] if len(exports) > 1 else exports[-1]
        raise ctx.fail(("stages", bad), "export must be the last stage, and appear once")
    return Recipe(header.name, stages, header.description, kinds, source, raw=data)


def builtin_names() -> list[str]:
    """Names of the built-in recipes (files in netshrink/recipes/builtin)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_recipe(recipe: str | Path | dict[str, Any] | Recipe) -> Recipe:
    """A validated Recipe from a YAML/JSON file, a built-in name (e.g. 'int8-ptq'), a dict or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    path = Path(recipe)
    if not path.exists():
        name = str(recipe)
        if (BUILTIN_DIR / f"{name}.yaml").exists():
            path = BUILTIN_DIR / f"{name}.yaml"
        else:
            raise NetshrinkError("no such recipe file or built-in recipe", where=name,
                                 hint=did_you_mean(name, builtin_names()))
    if not path.is_file():
        raise NetshrinkError("recipe path is not a file", where=str(path))
    source = f"built-in:{path.stem}" if path.parent == BUILTIN_DIR else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NetshrinkError(f"cannot read recipe: {exc}", where=str(path)) from None
    data, lines = load_with_lines(text, source)
    return parse_recipe(data, source, lines)
