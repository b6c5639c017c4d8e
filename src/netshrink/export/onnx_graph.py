"""Rewrite an ONNX graph's weight-bearing MatMul / Gemm / Conv nodes into quantized forms onnxruntime runs.

Four rewrites, each from plain integer grids (computed with `netshrink.quant.primitives`, or taken exactly from a
netshrink-quantized layer):

- ``bf16``: weights stored as BFLOAT16 initializers plus a Cast to FLOAT (half the file; compute stays FP32).
- ``int8-dynamic``: DynamicQuantizeLinear on the activation, MatMulInteger with an int8 per-channel weight, then
  the float rescale (the pattern onnxruntime fuses into DynamicQuantizeMatMul).
- ``int8-static``: QuantizeLinear/DequantizeLinear pairs (QDQ) with calibrated activation ranges and int8
  per-channel weights; onnxruntime fuses them into integer kernels.
- ``int4``: com.microsoft MatMulNBits with group-wise 4-bit weights (weight-only; activations stay float).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from netshrink.errors import NetshrinkError
from netshrink.llm.packing import QuantizedWeight
from netshrink.quant.primitives import QScheme, compute_qparams, pack_int4, quantize_tensor

MS_DOMAIN = "com.microsoft"


@dataclass
class WeightSite:
    """One node that multiplies by a constant weight; `weight` is in torch layout ([out, in] or conv [out, in, k..])."""

    node: onnx.NodeProto
    kind: str  # "matmul" | "gemm" | "conv"
    weight_name: str
    weight: np.ndarray
    bias_name: str | None = None


@dataclass
class Rewrite:
    """What a rewrite did: node names turned integer, and weights left float with the reason."""

    quantized: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def weight_sites(model: onnx.ModelProto) -> list[WeightSite]:
    """Every MatMul (constant 2-D right operand), Gemm (constant B, alpha=beta=1) and Conv (constant weight)."""
    inits = _initializers(model)
    sites = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[0] not in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim == 2 and w.dtype == np.float32:
                sites.append(WeightSite(node, "matmul", node.input[1], np.ascontiguousarray(w.T)))
        elif node.op_type == "Gemm" and node.input[1] in inits:
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                continue
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.dtype != np.float32:
                continue
            w = w if _attr(node, "transB", 0) else w.T
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            sites.append(WeightSite(node, "gemm", node.input[1], np.ascontiguousarray(w), bias))
        elif node.op_type == "Conv" and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.dtype == np.float32:
                bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
                sites.append(WeightSite(node, "conv", node.input[1], w, bias))
    return sites




def _finish(model: onnx.ModelProto, new_nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto]) -> None:
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for n in model.graph.node:  # subgraphs (If/Loop) may read outer initializers
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= {i for sn in a.g.node for i in sn.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _bf16_tensor(name: str, arr: np.ndarray) -> onnx.TensorProto:
    raw = torch.from_numpy(np.array(arr, copy=True)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(arr.shape), raw, raw=True)


def to_bf16(model: onnx.ModelProto, min_elements: int = 1024) -> Rewrite:
    """Store every float weight initializer of at least `min_elements` as BF16, cast back to FP32 where read."""
    done = Rewrite()
    new_nodes, new_inits = [], []
    for init in list(model.graph.initializer):
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            continue
        arr = numpy_helper.to_array(init)
        stored = f"{init.name}__bf16"
        new_inits.append(_bf16_tensor(stored, arr))
        new_nodes.append(helper.make_node("Cast", [stored], [init.name], to=TensorProto.FLOAT, name=f"{init.name}__cast"))
        done.quantized.append(init.name)
    names = set(done.quantized)
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    _finish(model, new_nodes + list(model.graph.node), new_inits)
    return done


def int8_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8 codes and scales of a torch-layout weight (netshrink primitives)."""
    q, scale, _, _ = quantize_tensor(torch.from_numpy(np.array(w, dtype=np.float32, copy=True)),
                                     QScheme(bits=8, symmetric=True, granularity="channel", axis=0))
    return q.numpy(), scale.numpy().astype(np.float32)


def int4_grid(w: np.ndarray, group_size: int) -> QuantizedWeight:
    """Asymmetric group-wise 4-bit grid (unsigned codes, integer zero points) of a [out, in] weight."""
    t = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    k = t.shape[1]
    pad = (-k) % group_size
    if pad:  # pad with the row's first value so padding never widens a group's range beyond the real values
        t = torch.cat([t, t[:, -1:].expand(-1, pad)], dim=1)
    q, scale, zero, _ = quantize_tensor(t, QScheme(bits=4, symmetric=False, signed=False, granularity="group",
                                                   axis=1, group_size=group_size))
    return QuantizedWeight(q[:, :k].to(torch.uint8), scale.float(), zero.to(torch.uint8), 4, group_size)


def _out(site: WeightSite) -> str:
    return site.node.output[0]


def _bias_add(site: WeightSite, value: str, out: str) -> list[onnx.NodeProto]:
    if site.bias_name is None:
        return []
    return [helper.make_node("Add", [value, site.bias_name], [out], name=f"{site.node.name}__bias")]


def int8_dynamic(model: onnx.ModelProto, sites: list[WeightSite], grids: dict[str, tuple[np.ndarray, np.ndarray]]
                 ) -> Rewrite:
    """Dynamic INT8: per-tensor uint8 activations quantized at run time, int8 per-channel weights (`grids`)."""
    done = Rewrite()
    by_node = {id(s.node): s for s in sites if s.kind in ("matmul", "gemm")}
    for s in sites:
        if s.kind == "conv":
            done.kept_float[s.node.name or s.weight_name] = "dynamic INT8 covers MatMul/Gemm; Conv stays FP32"
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    new_nodes, new_inits = [], []
    for node in model.graph.node:
        site = by_node.get(id(node))
        if site is None:
            new_nodes.append(node)
            continue
        tag = f"{site.weight_name}__i8"
        q, scale = grids[site.weight_name]
        a = node.input[0]
        if a not in quantized_inputs:
            names = (f"{a}__q", f"{a}__scale", f"{a}__zp")
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(names), name=f"{a}__dql"))
            quantized_inputs[a] = names
        aq, ascale, azp = quantized_inputs[a]
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(q.T), f"{tag}_w"),
                      numpy_helper.from_array(scale, f"{tag}_scale")]
        out = _out(site)
        pre = out if site.bias_name is None else f"{out}__nobias"
        new_nodes += [
            helper.make_node("MatMulInteger", [aq, f"{tag}_w", azp], [f"{tag}_mm"], name=f"{tag}_mm"),
            helper.make_node("Cast", [f"{tag}_mm"], [f"{tag}_mmf"], to=TensorProto.FLOAT, name=f"{tag}_cast"),
            helper.make_node("Mul", [ascale, f"{tag}_scale"], [f"{tag}_s"], name=f"{tag}_smul"),
            helper.make_node("Mul", [f"{tag}_mmf", f"{tag}_s"], [pre], name=f"{tag}_rescale"),
            *_bias_add(site, pre, out),
        ]
        done.quantized.append(node.name or site.weight_name)
    _finish(model, new_nodes, new_inits)
    return done


def activation_qparams(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric uint8 scale and zero point for an observed activation range (netshrink primitives)."""
    scale, zero = compute_qparams(torch.tensor(lo), torch.tensor(hi), QScheme(bits=8, symmetric=False, signed=False))
    return np.array(scale.item(), dtype=np.float32), np.array(zero.item(), dtype=np.uint8)


def int8_static(model: onnx.ModelProto, sites: list[WeightSite], grids: dict[str, tuple[np.ndarray, np.ndarray]],
                ranges: dict[str, tuple[float, float]], fixed: dict[str, tuple[float, int]] | None = None) -> Rewrite:
    """Static INT8 in QDQ form: int8 per-channel weights; activations as uint8 from calibrated `ranges`, or as
    int8 with the exact (scale, zero point) a netshrink static layer holds (`fixed`), both by tensor name."""
    fixed = fixed or {}
    done = Rewrite()
    by_node = {id(s.node): s for s in sites}
    dq_inputs: dict[str, str] = {}
    new_nodes, new_inits = [], []
    for node in model.graph.node:
        site = by_node.get(id(node))
        if site is None:
            new_nodes.append(node)
            continue
        a = node.input[0]
        if a not in ranges and a not in fixed:
            done.kept_float[node.name or site.weight_name] = "no calibrated range for its input"
            new_nodes.append(node)
            continue
        if a not in dq_inputs:
            if a in fixed:
                s, z = np.array(fixed[a][0], dtype=np.float32), np.array(fixed[a][1], dtype=np.int8)
            else:
                s, z = activation_qparams(*ranges[a])
            new_inits += [numpy_helper.from_array(s, f"{a}__as"), numpy_helper.from_array(z, f"{a}__az")]
            new_nodes += [helper.make_node("QuantizeLinear", [a, f"{a}__as", f"{a}__az"], [f"{a}__aq"], name=f"{a}__ql"),
                          helper.make_node("DequantizeLinear", [f"{a}__aq", f"{a}__as", f"{a}__az"], [f"{a}__adq"],
                                           name=f"{a}__dql")]
            dq_inputs[a] = f"{a}__adq"
        tag = f"{site.weight_name}__qdq"
        q, scale = grids[site.weight_name]
        if site.kind == "matmul":
            stored, axis = np.ascontiguousarray(q.T), 1
        elif site.kind == "gemm":
            stored, axis = q, 0
        else:
            stored, axis = q, 0
        new_inits += [numpy_helper.from_array(stored, f"{tag}_w"), numpy_helper.from_array(scale, f"{tag}_ws"),
                      numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{tag}_wz")]
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_w", f"{tag}_ws", f"{tag}_wz"], [f"{tag}_wdq"],
                                          axis=axis, name=f"{tag}_dq"))
        inputs = list(node.input)
        inputs[0], inputs[1] = dq_inputs[a], f"{tag}_wdq"
        if site.kind == "gemm":
            rebuilt = helper.make_node("Gemm", inputs, list(node.output), name=node.name, transB=1)
        else:
            rebuilt = helper.make_node(node.op_type, inputs, list(node.output), name=node.name)
            if site.kind == "conv":
                rebuilt.attribute.extend(node.attribute)
        new_nodes.append(rebuilt)
        done.quantized.append(node.name or site.weight_name)
    _finish(model, new_nodes, new_inits)
    return done


def nbits_tensors(grid: QuantizedWeight, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits inputs from a 4-bit grid: B uint8 [N, blocks, block/2], scales [N*blocks], packed zero points."""
    codes, scales, zeros = grid.codes, grid.scales.float(), grid.zeros
    n, k = codes.shape
    if grid.group_size != block_size:  # a coarser grid (e.g. per channel) repeats its scale over finer blocks
        if grid.group_size % block_size:
            raise NetshrinkError(f"group size {grid.group_size} is not a multiple of the MatMulNBits block {block_size}",
                                 where="int4")
        reps = grid.group_size // block_size
        scales, zeros = scales.repeat_interleave(reps, 1), zeros.repeat_interleave(reps, 1)
    blocks = -(-k // block_size)
    scales, zeros = scales[:, :blocks], zeros[:, :blocks]
    padded = torch.nn.functional.pad(codes, (0, blocks * block_size - k)).reshape(n, blocks, block_size)
    b = pack_int4(padded).numpy()
    zp = pack_int4(torch.nn.functional.pad(zeros, (0, blocks % 2)).to(torch.uint8)).reshape(-1).numpy()
    return b, scales.reshape(-1).numpy().astype(np.float32), zp


def int4_nbits(model: onnx.ModelProto, sites: list[WeightSite], grids: dict[str, QuantizedWeight],
               block_size: int, accuracy_level: int = 0) -> Rewrite:
    """Weight-only INT4: each MatMul/Gemm becomes com.microsoft MatMulNBits (+ Add for a Gemm bias)."""
    done = Rewrite()
    by_node = {id(s.node): s for s in sites if s.kind in ("matmul", "gemm")}
    for s in sites:
        if s.kind == "conv":
            done.kept_float[s.node.name or s.weight_name] = "MatMulNBits covers MatMul/Gemm; Conv stays FP32"
    new_nodes, new_inits = [], []
    for node in model.graph.node:
        site = by_node.get(id(node))
        if site is None:
            new_nodes.append(node)
            continue
        grid = grids[site.weight_name]
        b, scales, zp = nbits_tensors(grid, block_size)
        tag = f"{site.weight_name}__q4"
        new_inits += [numpy_helper.from_array(b, f"{tag}_b"), numpy_helper.from_array(scales, f"{tag}_s"),
                      numpy_helper.from_array(zp, f"{tag}_z")]
        out = _out(site)
        pre = out if site.bias_name is None else f"{out}__nobias"
        n, k = grid.codes.shape
        new_nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{tag}_b", f"{tag}_s", f"{tag}_z"], [pre],
                                          domain=MS_DOMAIN, name=f"{tag}_mm", K=k, N=n, bits=4, block_size=block_size,
                                          accuracy_level=accuracy_level))
        new_nodes += _bias_add(site, pre, out)
        done.quantized.append(node.name or site.weight_name)
    _finish(model, new_nodes, new_inits)
    return done


def int8_embeddings(model: onnx.ModelProto, min_rows: int = 1024) -> Rewrite:
    """Embedding tables (Gather on a constant [rows, dim] float table) stored as int8 rows with one scale per row;
    the looked-up rows are dequantized after the Gather, so only the rows used are ever turned back to float."""
    done = Rewrite()
    inits = _initializers(model)
    new_nodes, new_inits, converted = [], [], set()
    for node in model.graph.node:
        table = node.input[0] if node.op_type == "Gather" and node.domain in ("", "ai.onnx") else None
        if table is None or table not in inits or _attr(node, "axis", 0) != 0:
            new_nodes.append(node)
            continue
        arr = numpy_helper.to_array(inits[table])
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] < min_rows:
            new_nodes.append(node)
            continue
        tag = f"{table}__e8"
        if table not in converted:
            q, scale = int8_channel(arr)
            new_inits += [numpy_helper.from_array(q, f"{tag}_q"), numpy_helper.from_array(scale[:, None], f"{tag}_s")]
            converted.add(table)
        ids, out = node.input[1], node.output[0]
        new_nodes += [
            helper.make_node("Gather", [f"{tag}_q", ids], [f"{out}__q"], name=f"{node.name}__q", axis=0),
            helper.make_node("Gather", [f"{tag}_s", ids], [f"{out}__s"], name=f"{node.name}__s", axis=0),
            helper.make_node("Cast", [f"{out}__q"], [f"{out}__f"], to=TensorProto.FLOAT, name=f"{node.name}__cast"),
            helper.make_node("Mul", [f"{out}__f", f"{out}__s"], [out], name=f"{node.name}__deq"),
        ]
        done.quantized.append(node.name or table)
    _finish(model, new_nodes, new_inits)
    return done
