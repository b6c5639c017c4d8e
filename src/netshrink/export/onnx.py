"""ONNX export (FP32, BF16 weights, INT8 dynamic, INT8 static QDQ, INT4 MatMulNBits) and PTQ of ONNX files.

A model is exported by torch's TorchScript-based ONNX exporter from a float "twin" (netshrink's packed layers
replaced by plain Linear layers holding their dequantized weights), then the weight-bearing nodes are rewritten
(`netshrink.export.onnx_graph`) with integer grids taken exactly from netshrink's quantized layers, or computed
with `netshrink.quant.primitives`. Every export is run once in onnxruntime and compared with the PyTorch model.

`quantize_onnx` takes any ONNX file as input, so models from other frameworks (TensorFlow through tf2onnx) get
the same post-training quantization; static INT8 calibrates activation ranges by running onnxruntime on the
caller's inputs.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from netshrink.atomic import atomic_file
from netshrink.errors import NetshrinkError
from netshrink.export import onnx_graph as g
from netshrink.export.lowering import LayerGrid, float_twin, unwrap, weight_key
from netshrink.llm.packing import QuantizedWeight

SCHEMES = ("fp32", "bf16", "int8-dynamic", "int8-static", "int4")
# Minimum cosine between onnxruntime's and PyTorch's outputs for the export to count as faithful.
MIN_COSINE = {"fp32": 0.99999, "bf16": 0.999, "int8-dynamic": 0.98, "int8-static": 0.97, "int4": 0.95}


@dataclass
class OnnxExport:
    """Where the file went, what was quantized, and how close onnxruntime's outputs are to the reference."""

    path: Path
    scheme: str
    quantized: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0
    max_abs_diff: float | None = None
    cosine: float | None = None


def _names(inputs: Sequence[torch.Tensor], names: list[str] | None) -> list[str]:
    return list(names) if names else [f"input_{i}" for i in range(len(inputs))]


def _dynamic_axes(inputs: Sequence[torch.Tensor], names: list[str], out_name: str, kind: str | None) -> dict:
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(names, inputs):
        axes[name] = {0: "batch"}
        if t.ndim == 2 and not t.is_floating_point():
            axes[name][1] = "sequence"
    axes[out_name] = {0: "batch", 1: "sequence"} if kind == "decoder" else {0: "batch"}
    return axes


def torch_to_onnx(module: nn.Module, inputs: tuple, path: Path, names: list[str], out_name: str, kind: str | None,
                  opset: int) -> None:
    """Run torch's TorchScript-based ONNX exporter, then (for graphs it cannot express, such as transformers'
    decoder masks) the torch.export-based one; if neither can, a NetshrinkError names the unsupported operator."""
    axes = _dynamic_axes(inputs, names, out_name, kind)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=opset, input_names=names,
                              output_names=[out_name], dynamic_axes=axes, do_constant_folding=True)
        return
    except Exception as exc:  # the exporter raises several types; all mean "this graph is not expressible"
        first = exc
    dims = {label: torch.export.Dim(label) for spec in axes.values() for label in spec.values()}
    shapes = tuple({i: dims[label] for i, label in axes[name].items()} for name in names)
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, inputs, str(path), dynamo=True, opset_version=max(opset, 18), input_names=names,
                              output_names=[out_name], dynamic_shapes=shapes)
        return
    except Exception:  # report the first exporter's error: it names the operator
        pass
    text = str(first)
    op = re.search(r"operator '?([\w:.]+)'?", text)
    what = f"operator {op.group(1)}" if op else f"the model ({type(first).__name__}: {text.splitlines()[0][:200]})"
    raise NetshrinkError(f"{what} cannot be expressed in ONNX opset {opset}", where=type(module).__name__,
                         hint="a newer opset, or replacing that operation, may make it exportable") from None


def session(path_or_bytes: str | bytes, threads: int = 2) -> Any:
    """An onnxruntime CPU session with a fixed thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def bound_runner(sess: Any, inputs: dict[str, np.ndarray]) -> Callable[[], list[np.ndarray]]:
    """A zero-argument call that runs `sess` on fixed `inputs` through onnxruntime's IO binding.

    The inputs are bound once and every output goes into a buffer allocated once, so a call does no numpy
    conversion and no output allocation: what a latency-critical server does with a fixed-shape request. For a
    20 us model (the half-cut digit CNN at batch 1) that per-call work is about 10% of the time."""
    import onnxruntime as ort

    binding = sess.io_binding()
    for name, value in inputs.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    outputs = sess.run(None, inputs)                     # one plain run for the output shapes and dtypes
    buffers = [ort.OrtValue.ortvalue_from_numpy(np.empty_like(o)) for o in outputs]
    for meta, buffer in zip(sess.get_outputs(), buffers):
        binding.bind_ortvalue_output(meta.name, buffer)

    def run() -> list[np.ndarray]:
        sess.run_with_iobinding(binding)
        return [b.numpy() for b in buffers]

    return run


def feeds(model: onnx.ModelProto, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Map positional inputs (torch tensors or arrays) onto the graph's input names."""
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if isinstance(inputs, dict):
        return {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return {n: (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)) for n, t in zip(names, inputs)}


def observe_ranges(model: onnx.ModelProto, tensor_names: Iterable[str], calibration: Iterable[Any]) -> dict[str, tuple[float, float]]:
    """Min/max of the named intermediate tensors over the calibration inputs (onnxruntime runs of the float graph)."""
    probe = copy.deepcopy(model)
    wanted = [n for n in dict.fromkeys(tensor_names) if n not in {o.name for o in probe.graph.output}]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in wanted)
    sess = session(probe.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    ranges: dict[str, tuple[float, float]] = {}
    count = 0
    for batch in calibration:
        count += 1
        for name, value in zip(names, sess.run(None, feeds(probe, batch))):
            if name in wanted or name in tensor_names:
                lo, hi = float(np.min(value)), float(np.max(value))
                old = ranges.get(name, (lo, hi))
                ranges[name] = (min(lo, old[0]), max(hi, old[1]))
    if count == 0:
        raise NetshrinkError("static INT8 needs calibration inputs, and none were given", where="calibration")
    return ranges


def _int8_grid(site: g.WeightSite, grids: dict[bytes, LayerGrid]) -> tuple[np.ndarray, np.ndarray]:
    exact = grids.get(weight_key(site.weight))
    if exact is not None and exact.int8 is not None:
        return exact.int8
    return g.int8_channel(site.weight)


def _int4_grid(site: g.WeightSite, grids: dict[bytes, LayerGrid], block: int) -> QuantizedWeight:
    exact = grids.get(weight_key(site.weight))
    if exact is not None and exact.int4 is not None and exact.int4.group_size % block == 0:
        return exact.int4
    return g.int4_grid(site.weight, block)


def rewrite(model: onnx.ModelProto, scheme: str, grids: dict[bytes, LayerGrid], calibration: Iterable[Any] | None,
            group_size: int, accuracy_level: int = 0, embeddings: bool = True) -> g.Rewrite:
    """Apply `scheme` to a float ONNX graph in place (integer schemes also store large embedding tables as int8)."""
    done = _rewrite_weights(model, scheme, grids, calibration, group_size, accuracy_level)
    if embeddings and scheme in ("int8-dynamic", "int8-static", "int4"):
        emb = g.int8_embeddings(model)
        done.quantized += emb.quantized
    return done


def _rewrite_weights(model: onnx.ModelProto, scheme: str, grids: dict[bytes, LayerGrid],
                     calibration: Iterable[Any] | None, group_size: int, accuracy_level: int) -> g.Rewrite:
    if scheme not in SCHEMES:
        raise NetshrinkError(f"unknown ONNX scheme {scheme!r}", where="scheme", hint=f"choose one of {', '.join(SCHEMES)}")
    if scheme == "fp32":
        return g.Rewrite()
    if scheme == "bf16":
        return g.to_bf16(model)
    sites = g.weight_sites(model)
    if scheme == "int4":
        if group_size < 16 or group_size & (group_size - 1):
            raise NetshrinkError(f"MatMulNBits needs a power-of-two block size of at least 16, got {group_size}",
                                 where="group_size")
        return g.int4_nbits(model, sites, {s.weight_name: _int4_grid(s, grids, group_size) for s in sites
                                           if s.kind != "conv"}, group_size, accuracy_level)
    int8 = {s.weight_name: _int8_grid(s, grids) for s in sites}
    if scheme == "int8-dynamic":
        return g.int8_dynamic(model, sites, int8)
    fixed = {s.node.input[0]: grids[weight_key(s.weight)].act for s in sites
             if weight_key(s.weight) in grids and grids[weight_key(s.weight)].act is not None}
    observe = [s.node.input[0] for s in sites if s.node.input[0] not in fixed]
    ranges = observe_ranges(model, observe, calibration if calibration is not None else []) if observe else {}
    return g.int8_static(model, sites, int8, ranges, fixed)


def compare(reference: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max |difference|, cosine similarity) of two outputs, flattened."""
    a, b = reference.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    return float(np.max(np.abs(a - b))), cos


def save_onnx(model: onnx.ModelProto, out: Path, verify: Callable[[Path], None] | None = None) -> int:
    """Write atomically (refusing an existing path), running `verify` on the finished temporary file first, so a
    file that fails its check never appears at `out`; returns the size in bytes."""
    if model.ByteSize() > 2_000_000_000:
        raise NetshrinkError("model exceeds the 2 GB protobuf limit of a single ONNX file", where=str(out),
                             hint="quantize it (int8/int4) first or export a smaller model")
    try:
        with atomic_file(out) as tmp:
            onnx.save_model(model, str(tmp))
            if verify is not None:
                verify(tmp)
    except OSError as exc:
        raise NetshrinkError(f"could not write the ONNX file ({exc.strerror or exc}); nothing was left at the path",
                             where=str(out)) from None
    return out.stat().st_size


def export_onnx(model: Any, out: str | os.PathLike, scheme: str = "fp32", example_inputs: tuple | None = None,
                calibration: Iterable[Any] | None = None, input_names: list[str] | None = None,
                output_name: str = "output", group_size: int = 32, opset: int = 17, accuracy_level: int = 0,
                check: bool = True) -> OnnxExport:
    """Export an nn.Module or ZooModel to one ONNX file at `out` in the given scheme and check it in onnxruntime.

    `calibration` (static INT8): input tuples; a ZooModel defaults to its real example inputs (8 + the traced batch).
    """
    out = Path(out)
    if out.exists():
        raise NetshrinkError("output already exists; choose another path or remove it", where=str(out))
    if scheme not in SCHEMES:
        raise NetshrinkError(f"unknown ONNX scheme {scheme!r}", where="scheme", hint=f"choose one of {', '.join(SCHEMES)}")
    module, zoo_inputs, zoo_names, kind = unwrap(model)
    inputs = tuple(example_inputs) if example_inputs is not None else zoo_inputs
    if inputs is None:
        raise NetshrinkError("ONNX export needs example inputs to trace; pass example_inputs=(...)", where="export_onnx")
    names = _names(inputs, input_names or zoo_names)
    if scheme == "int8-static" and calibration is None and zoo_inputs is not None:
        calibration = [tuple(model.example_inputs(batch=8, seq_len=32)), inputs]  # real data of the zoo entry
    twin, grids = float_twin(module)
    with tempfile.TemporaryDirectory() as tmpdir:
        raw = Path(tmpdir) / "float.onnx"
        torch_to_onnx(twin, inputs, raw, names, output_name, kind, opset)
        proto = onnx.load(str(raw))
    calib_feeds = [feeds(proto, c) for c in calibration] if calibration is not None else None
    done = rewrite(proto, scheme, grids, calib_feeds, group_size, accuracy_level)
    result = OnnxExport(out, scheme, done.quantized, done.kept_float)

    def verify(tmp: Path) -> None:
        with torch.no_grad():
            reference = module(*inputs)
        reference = reference.float().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
        got = session(str(tmp)).run(None, feeds(proto, inputs))[0]
        result.max_abs_diff, result.cosine = compare(reference, got)
        if result.cosine < MIN_COSINE[scheme]:
            raise NetshrinkError(f"onnxruntime's output differs from PyTorch's (cosine {result.cosine:.5f} < "
                                 f"{MIN_COSINE[scheme]} for {scheme})", where=str(out))

    result.size_bytes = save_onnx(proto, out, verify if check else None)
    return result


def quantize_onnx(path: str | os.PathLike, out: str | os.PathLike, scheme: str = "int8-dynamic",
                  calibration: Iterable[Any] | None = None, group_size: int = 32, accuracy_level: int = 0) -> OnnxExport:
    """Post-training quantization of an existing ONNX file (e.g. from tf2onnx) into `out`.

    `calibration`: dicts of input name -> array (or positional tuples); needed for int8-static, and when given the
    quantized model's first output is compared with the float model's on the first of them.
    """
    src = Path(path)
    if not src.is_file():
        raise NetshrinkError("ONNX file not found", where=str(src))
    out = Path(out)
    if out.exists():
        raise NetshrinkError("output already exists; choose another path or remove it", where=str(out))
    try:
        proto = onnx.load(str(src))
    except Exception as exc:  # protobuf DecodeError and friends
        raise NetshrinkError(f"not a readable ONNX model ({type(exc).__name__})", where=str(src)) from None
    batches = [feeds(proto, c) for c in calibration] if calibration is not None else None
    reference = session(proto.SerializeToString()).run(None, batches[0])[0] if batches else None
    done = rewrite(proto, scheme, {}, batches, group_size, accuracy_level)
    result = OnnxExport(out, scheme, done.quantized, done.kept_float)

    def verify(tmp: Path) -> None:
        got = session(str(tmp)).run(None, batches[0])[0]
        result.max_abs_diff, result.cosine = compare(reference, got)

    result.size_bytes = save_onnx(proto, out, verify if reference is not None else None)
    return result
