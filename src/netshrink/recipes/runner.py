"""`compress(model, recipe)`: validate the recipe and bind it to the model, then run its stages in order."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.recipes.bind import BoundStage, bind
from netshrink.recipes.handlers import StageRun
from netshrink.recipes.loader import load_recipe
from netshrink.recipes.schema import Recipe
from netshrink.recipes.workload import LossFn, Workload, workload_for
from netshrink.record import layer_record


@dataclass
class StepLog:
    """What one stage did and how long it took."""

    stage: str
    seconds: float
    layers_changed: int


@dataclass
class CompressResult:
    """The compressed module, the zoo entry around it (when the input was one), the steps and any exported files."""

    model: nn.Module
    entry: Any | None
    recipe: Recipe
    steps: list[StepLog] = field(default_factory=list)
    exports: dict[str, Path] = field(default_factory=dict)

    @property
    def record(self) -> dict[str, dict]:
        return layer_record(self.model)


def _resolve_model(model: Any) -> tuple[Any | None, nn.Module, str]:
    """(zoo entry or None, the torch module, its kind) from a ZooModel, a zoo spec string or a plain module."""
    if isinstance(model, (str, Path)):
        from netshrink import zoo

        model = zoo.load(str(model))
    if hasattr(model, "model") and hasattr(model, "kind"):
        if model.kind == "onnx":
            raise NetshrinkError("recipes run on PyTorch models; this is an ONNX file", where=model.name,
                                 hint="use the original PyTorch model, or `netshrink export` ONNX quantization")
        return model, model.model, model.kind
    if isinstance(model, nn.Module):
        return None, model, "module"
    raise NetshrinkError(f"cannot compress a {type(model).__name__}", where="model",
                         hint="pass a torch.nn.Module, a ZooModel or a zoo name")


def _restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put the untouched copies of excluded layers back and forget what the stage recorded for them."""
    record = layer_record(model)
    for name, module in originals.items():
        model.set_submodule(name, module)
        record.pop(name, None)


def _transplant(model: nn.Module, donor: nn.Module, names: list[str]) -> None:
    """Take layers `names` (and their record entries) from `donor`, a copy compressed with overridden settings."""
    record, donor_record = layer_record(model), layer_record(donor)
    for name in names:
        model.set_submodule(name, donor.get_submodule(name))
        if name in donor_record:
            record[name] = dict(donor_record[name])
        else:
            record.pop(name, None)


def _run_stage(model: nn.Module, bound: BoundStage, work: Workload, out_dir: Path | None,
               exports: dict[str, Path]) -> nn.Module:
    stage = bound.stage
    params = stage.params.model_dump()
    handler = stage.spec.resolve()
    before = copy.deepcopy(model) if bound.per_layer else None
    originals = {n: copy.deepcopy(model.get_submodule(n)) for n in bound.exclude}
    run = StageRun(stage.kind, stage.method, params, list(bound.exclude), dict(bound.per_layer), work, stage.where,
                   out_dir)
    model = handler(model, run)
    if bound.exclude and not run.native.get("exclude"):
        _restore(model, originals)
    if bound.per_layer and not run.native.get("per_layer"):
        groups: dict[tuple, list[str]] = {}
        for name, values in bound.per_layer.items():
            groups.setdefault(tuple(sorted(values.items())), []).append(name)
        for values, names in groups.items():
            donor_run = StageRun(stage.kind, stage.method, {**params, **dict(values)}, list(bound.exclude), {}, work,
                                 stage.where, out_dir)
            donor = handler(copy.deepcopy(before), donor_run)
            _transplant(model, donor, names)
    exports.update(run.outputs)
    return model


def compress(model: Any, recipe: str | Path | dict | Recipe, *, calibration: Any = None, train_data: Any = None,
             loss_fn: LossFn | None = None, example_inputs: tuple | None = None, out: str | Path | None = None,
             inplace: bool = False, progress: Callable[[str], None] | None = None) -> CompressResult:
    """Run `recipe` (file, built-in name, dict or Recipe) on `model` (nn.Module, ZooModel or zoo name).

    Everything that can be checked is checked before work starts: the recipe's keys and values, that each method
    suits the model, and that every layer pattern matches. Zoo models bring their own calibration and training data;
    a plain module takes `calibration` (input batches, or text for LLMs), `train_data` ((x, y) batches) and `loss_fn`.
    Export stages write under `out`. The input model is untouched unless `inplace=True`.
    """
    recipe = load_recipe(recipe)
    entry, module, kind = _resolve_model(model)
    stages = bind(recipe, module, kind)
    needs_out = any(s.stage.kind == "export" for s in stages)
    out_dir = Path(out) if out is not None else None
    if needs_out and out_dir is None:
        where = next(s.stage.where for s in stages if s.stage.kind == "export")
        raise NetshrinkError("the recipe exports, so it needs an output folder", where=where, hint="pass out=DIR")
    work = workload_for(entry, kind, calibration, train_data, loss_fn, example_inputs)
    work.extra["entry"] = entry
    if not inplace:
        module = copy.deepcopy(module)  # the layer record travels with the copy
    result = CompressResult(module, None, recipe)
    for bound in stages:
        if progress is not None:
            progress(bound.stage.describe())
        start = time.perf_counter()
        before = copy.deepcopy(layer_record(module))
        module = _run_stage(module, bound, work, out_dir, result.exports)
        module.eval()
        after = layer_record(module)
        changed = sum(1 for name, fields in after.items() if before.get(name) != fields)
        result.steps.append(StepLog(bound.stage.describe(), time.perf_counter() - start, changed))
    result.model = module
    result.entry = entry.with_model(module) if entry is not None else None
    return result
