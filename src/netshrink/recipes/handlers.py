"""Thin stage handlers: each turns a recipe stage into one call of another part of netshrink's public API.

A handler receives the working model (already a copy unless the caller asked for in-place) and a `StageRun`; it
returns the model, which may be a new object (a quantized conversion).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.recipes.workload import Workload


@dataclass
class StageRun:
    """One stage as the handler sees it: effective parameters, resolved layer names and the data."""

    kind: str
    method: str
    params: dict[str, Any]
    exclude: list[str]  # resolved module names to leave untouched (exclude patterns and `skip` overrides)
    per_layer: dict[str, dict[str, Any]]  # resolved module name -> overridden parameters
    workload: Workload
    where: str
    out_dir: Path | None = None
    native: dict[str, bool] = field(default_factory=dict)  # what the handler handled itself: 'exclude', 'per_layer'
    outputs: dict[str, Path] = field(default_factory=dict)


def make_config(cls: type, where: str, **values: Any) -> Any:
    """`cls(**values)`, refusing a value the installed config class has no field for (never dropped silently)."""
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    if names is not None:
        missing = [k for k in values if k not in names]
        if missing:
            raise NetshrinkError(f"{cls.__name__} has no setting '{missing[0]}'", where=where,
                                 hint=f"its settings: {', '.join(sorted(names))}")
    return cls(**values)


# ---- prune -------------------------------------------------------------------------------------------------------
def prune_magnitude(model: nn.Module, run: StageRun) -> nn.Module:
    from netshrink.sparsity.layers import prunable_layers
    from netshrink.sparsity.magnitude import Magnitude, magnitude_prune

    p = run.params
    prunable = prunable_layers(model)
    per_layer = {name: values["sparsity"] for name, values in run.per_layer.items()
                 if "sparsity" in values and name in prunable}
    config = make_config(Magnitude, run.where, sparsity=p["sparsity"], scope=p["scope"], importance=p["importance"],
                         exclude=tuple(run.exclude), per_layer=per_layer)
    calibration = None
    if p["importance"] == "magnitude_x_grad":
        calibration = run.workload.need("training", run.where)(64, 8)
    magnitude_prune(model, config, calibration=calibration, loss_fn=run.workload.loss)
    run.native.update(exclude=True, per_layer=True)
    return model


def prune_structured(model: nn.Module, run: StageRun) -> nn.Module:
    from netshrink.sparsity.structured.prune import Structured
    from netshrink.sparsity.structured.prune import prune_structured as apply

    p = run.params
    config = make_config(Structured, run.where, ratio=p["sparsity"], head_ratio=p["head_ratio"],
                         importance=p["importance"], round_to=p["round_to"], exclude=tuple(run.exclude))
    calibration = None
    if p["importance"] == "taylor":
        calibration = run.workload.need("training", run.where)(64, 8)
    apply(model, config, example_inputs=run.workload.example_inputs, calibration=calibration,
          loss_fn=run.workload.loss)
    run.native.update(exclude=True)
    return model


def prune_nm(model: nn.Module, run: StageRun) -> nn.Module:
    from netshrink.sparsity import NM
    from netshrink.sparsity.api import prune_

    config = make_config(NM, run.where, n=run.params["n"], m=run.params["m"], exclude=tuple(run.exclude))
    model = prune_(model, config, inplace=True)
    run.native.update(exclude=True)
    return model


# ---- finetune ----------------------------------------------------------------------------------------------------
def finetune(model: nn.Module, run: StageRun) -> nn.Module:
    from netshrink.sparsity.finetune import FineTune
    from netshrink.sparsity.finetune import finetune as train

    p = run.params
    batches = run.workload.need("training", run.where)(p["batch_size"], p["steps"])
    loss = run.workload.need("loss", run.where)
    train(model, batches, FineTune(steps=p["steps"], lr=p["lr"], weight_decay=p["weight_decay"]), loss_fn=loss)
    model.eval()
    return model


# ---- quantize ----------------------------------------------------------------------------------------------------
def _bake_masks(model: nn.Module) -> None:
    """Turn pruning masks (parametrizations) into plain zero weights, so the quantizer sees ordinary layers."""
    from netshrink.sparsity.masks import make_permanent

    make_permanent(model)


def _quantize(model: nn.Module, run: StageRun, config: Any, calibration: Any = None) -> nn.Module:
    from netshrink.quant.api import quantize_

    _bake_masks(model)
    model = quantize_(model, config, calibration=calibration, inplace=True)
    run.native.update(exclude=True)
    return model


def quant_int8_dynamic(model: nn.Module, run: StageRun) -> nn.Module:
    from netshrink.quant import Int8Dynamic

    p = run.params
    return _quantize(model, run, make_config(Int8Dynamic, run.where, per_channel=p["per_channel"],
                                             backend=p["backend"], skip=tuple(run.exclude)))


def quant_int8_static(model: nn.Module, run: StageRun) -> nn.Module:
    from netshrink.quant import Int8Static

    p = run.params
    config = make_config(Int8Static, run.where, per_channel=p["per_channel"], observer=p["observer"],
                         backend=p["backend"], skip=tuple(run.exclude))
    calibration = run.workload.need("calibration", run.where)(p["calibration_samples"])
    return _quantize(model, run, config, calibration)


def quant_bf16(model: nn.Module, run: StageRun) -> nn.Module:
    from netshrink.quant import BF16

    return _quantize(model, run, make_config(BF16, run.where, backend=run.params["backend"], skip=tuple(run.exclude)))


def quant_fp16(model: nn.Module, run: StageRun) -> nn.Module:
    import warnings

    from netshrink.quant import FP16

    with warnings.catch_warnings():  # FP16 suits GPUs; its CPU slowness warning is expected in a GPU recipe
        warnings.simplefilter("ignore", UserWarning)
        return _quantize(model, run, make_config(FP16, run.where, backend=run.params["backend"],
                                                 skip=tuple(run.exclude)))


def quant_qat(model: nn.Module, run: StageRun) -> nn.Module:
    """LSQ quantization-aware training: fake-quantize, train `steps` batches with the workload's loss, convert."""
    import itertools

    from netshrink.quant.qat import QATConfig, convert, prepare_qat, train_qat

    p = run.params
    loss_fn = run.workload.need("loss", run.where)
    batches = run.workload.need("training", run.where)(p["batch_size"], p["steps"])
    calibration = run.workload.need("calibration", run.where)(p["calibration_samples"])
    config = make_config(QATConfig, run.where, weight_bits=p["weight_bits"], act_bits=p["act_bits"],
                         skip=tuple(run.exclude))
    _bake_masks(model)
    model = prepare_qat(model, config, calibration=calibration, inplace=True)
    steps = list(itertools.islice(itertools.cycle(batches), p["steps"]))

    def step(m: nn.Module, batch: Any, optimizer: Any) -> Any:
        optimizer.zero_grad()
        loss = loss_fn(m, batch)
        loss.backward()
        optimizer.step()
        return loss

    train_qat(model, steps, epochs=1, lr=p["lr"], train_step=step)
    model = convert(model, inplace=True)
    run.native.update(exclude=True)
    return model


# ---- LLM methods -------------------------------------------------------------------------------------------------
def _llm_config(method: str, p: dict[str, Any], where: str) -> Any:
    from netshrink.llm.awq import AWQ
    from netshrink.llm.gptq import GPTQ
    from netshrink.llm.magnitude import Magnitude
    from netshrink.llm.rtn import RTN
    from netshrink.llm.smoothquant import SmoothQuant
    from netshrink.llm.sparsegpt import SparseGPT
    from netshrink.llm.wanda import Wanda

    weight = dict(bits=p.get("bits"), group_size=p.get("group_size"), symmetric=p.get("symmetric"))
    if method == "rtn":
        return make_config(RTN, where, **weight)
    if method == "gptq":
        return make_config(GPTQ, where, **weight, damp=p["damp"], act_order=p["act_order"])
    if method == "awq":
        return make_config(AWQ, where, **weight, n_grid=p["n_grid"])
    if method == "smoothquant":
        return make_config(SmoothQuant, where, alpha=p["alpha"])
    if method == "sparsegpt":
        return make_config(SparseGPT, where, sparsity=p["sparsity"], pattern=p["pattern"])
    if method == "wanda":
        return make_config(Wanda, where, sparsity=p["sparsity"], pattern=p["pattern"])
    return make_config(Magnitude, where, sparsity=p["sparsity"], pattern=p["pattern"])


def llm_method(model: nn.Module, run: StageRun) -> nn.Module:
    """GPTQ, AWQ, RTN, SmoothQuant, SparseGPT, Wanda and magnitude through `netshrink.llm.api.compress_llm`."""
    from netshrink.llm.api import compress_llm

    p = run.params
    config = _llm_config(run.method, p, run.where)
    calibration = run.workload.need("text", run.where) if "samples" in p else None
    return compress_llm(model, config, calibration, tokenizer=run.workload.tokenizer, n_samples=p.get("samples", 32),
                        seq_len=p.get("seq_len", 256), pack=p.get("pack", False), inplace=True)


# ---- export ------------------------------------------------------------------------------------------------------
FORMAT_OF = {"checkpoint": "netshrink"}  # recipe name -> netshrink.export.api format
EXTENSIONS = {"netshrink": "", "checkpoint": "", "onnx": ".onnx", "torchscript": ".pt", "hf": "", "gguf": ".gguf"}


def export(model: nn.Module, run: StageRun) -> nn.Module:
    """Write the model through `netshrink.export.api.export` (zoo models keep their tokenizer and base name)."""
    from netshrink.export.api import export as write

    if run.out_dir is None:
        raise NetshrinkError("an export stage needs an output folder", where=run.where, hint="pass --out DIR / out=")
    fmt = FORMAT_OF.get(run.method, run.method)
    target = run.out_dir / (run.params["path"] or f"model-{run.method}{EXTENSIONS[run.method]}")
    entry = run.workload.extra.get("entry")
    options = dict(run.params["options"])
    if fmt == "netshrink" and entry is not None:
        options.setdefault("base", entry.name)
    try:
        path = write(entry.with_model(model) if entry is not None else model, fmt, target, **options)
    except NetshrinkError as exc:
        raise NetshrinkError(exc.what, where=f"{run.where} ({exc.where})", hint=exc.hint) from None
    run.outputs[run.method] = Path(path) if path is not None else target
    return model
