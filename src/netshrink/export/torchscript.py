"""TorchScript export: trace the (quantized or pruned) model, save it, load it back and check its outputs.

Tracing records the operations the model really runs, so netshrink's packed INT4/INT8 layers keep their low-bit
kernels and pruning masks stay applied; the saved file needs only torch to run (`torch.jit.load`).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from netshrink.atomic import atomic_file
from netshrink.errors import NetshrinkError
from netshrink.export.lowering import unwrap


@dataclass
class TorchScriptExport:
    """The saved file, its size, and how far the reloaded module's outputs are from the in-memory model's."""

    path: Path
    size_bytes: int
    max_abs_diff: float
    identical: bool


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "logits"):
        return output.logits
    raise NetshrinkError(f"model output of type {type(output).__name__} is not a tensor", where="torchscript")


def export_torchscript(model: Any, out: str | os.PathLike, example_inputs: tuple | None = None,
                       check: bool = True) -> TorchScriptExport:
    """Trace an nn.Module or ZooModel with `example_inputs`, save it atomically at `out`, reload and compare."""
    out = Path(out)
    if out.exists():
        raise NetshrinkError("output already exists; choose another path or remove it", where=str(out))
    module, zoo_inputs, _, _ = unwrap(model)
    inputs = tuple(example_inputs) if example_inputs is not None else zoo_inputs
    if inputs is None:
        raise NetshrinkError("TorchScript export needs example inputs to trace; pass example_inputs=(...)",
                             where="export_torchscript")
    module = module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, inputs, check_trace=False, strict=False)
    except Exception as exc:  # tracing raises many types; all mean the model is not traceable as it stands
        raise NetshrinkError(f"{type(module).__name__} cannot be expressed in TorchScript: "
                             f"{str(exc).splitlines()[0][:200]}", where=type(module).__name__) from None
    try:
        with atomic_file(out) as tmp:
            torch.jit.save(traced, str(tmp))
    except OSError as exc:
        raise NetshrinkError(f"could not write the TorchScript file ({exc.strerror or exc}); nothing was left at the path",
                             where=str(out)) from None
    diff, identical = 0.0, True
    if check:
        loaded = torch.jit.load(str(out))
        with torch.no_grad():
            expected = _first(module(*inputs)).float()
            got = _first(loaded(*inputs)).float()
        diff = float((expected - got).abs().max()) if expected.numel() else 0.0
        identical = bool(torch.equal(expected, got))
    return TorchScriptExport(out, out.stat().st_size, diff, identical)
