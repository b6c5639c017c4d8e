"""`export`: one call from a compressed model (or a zoo spec, or a netshrink checkpoint folder) to any format."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.errors import NetshrinkError

FORMATS = ("netshrink", "hf", "onnx", "torchscript", "gguf")
OPTIONS = {
    "netshrink": {"base"},
    "hf": {"tokenizer"},
    "onnx": {"scheme", "example_inputs", "calibration", "input_names", "output_name", "group_size", "opset",
             "accuracy_level", "check"},
    "torchscript": {"example_inputs", "check"},
    "gguf": {"scheme", "tokenizer", "source_gguf", "embedding_qtype", "name"},
}


def resolve(model: Any) -> Any:
    """A ZooModel or module as is; a string is a netshrink checkpoint folder or anything `netshrink.zoo.load` takes."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    from netshrink.export.checkpoint import is_checkpoint, load_checkpoint_entry

    if is_checkpoint(model):
        return load_checkpoint_entry(model)
    from netshrink.zoo import load

    return load(str(model))


def export(model_or_zoo_model: Any, format: str, out: str | os.PathLike, **options: Any) -> Path:
    """Write `model_or_zoo_model` (nn.Module, ZooModel, zoo spec or checkpoint folder) to `out` in `format`.

    Options by format: netshrink `base`; hf `tokenizer`; onnx `scheme` (fp32, bf16, int8-dynamic, int8-static,
    int4), `example_inputs`, `calibration`, `group_size`, `opset`; torchscript `example_inputs`; gguf `scheme`
    (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32), `tokenizer`, `embedding_qtype`. `out` must not exist.
    """
    if format not in FORMATS:
        raise NetshrinkError(f"unknown export format {format!r}", where="format", hint=f"choose one of {', '.join(FORMATS)}")
    unknown = sorted(k for k, v in options.items() if v is not None and k not in OPTIONS[format])
    if unknown:
        raise NetshrinkError(f"option {unknown[0]!r} does not apply to the {format} format", where="export",
                             hint=f"{format} takes: {', '.join(sorted(OPTIONS[format])) or 'no options'}")
    options = {k: v for k, v in options.items() if v is not None}
    out = Path(out)
    if out.exists():
        raise NetshrinkError("output already exists; choose another path or remove it", where=str(out))
    model = resolve(model_or_zoo_model)
    if not isinstance(model, nn.Module) and not isinstance(getattr(model, "model", None), nn.Module):
        raise NetshrinkError(f"cannot export a {type(model).__name__}", where="export",
                             hint="pass an nn.Module, a ZooModel, a zoo name or a checkpoint folder")
    if format == "netshrink":
        from netshrink.export.checkpoint import save_checkpoint

        return save_checkpoint(model, out, base=options.get("base"))
    if format == "hf":
        from netshrink.export.hf import save_hf

        return save_hf(model, out, tokenizer=options.get("tokenizer")).path
    if format == "onnx":
        from netshrink.export.onnx import export_onnx, quantize_onnx

        if getattr(model, "kind", None) == "onnx":  # an ONNX file as input (e.g. from tf2onnx): PTQ of the graph
            keep = {k: options[k] for k in ("scheme", "calibration", "group_size", "accuracy_level") if k in options}
            return quantize_onnx(model.source, out, **keep).path
        return export_onnx(model, out, **options).path
    if format == "torchscript":
        from netshrink.export.torchscript import export_torchscript

        return export_torchscript(model, out, **options).path
    from netshrink.export.gguf import export_gguf

    qtype = options.pop("scheme", "Q8_0")
    return export_gguf(model, out, qtype=qtype, **options).path
