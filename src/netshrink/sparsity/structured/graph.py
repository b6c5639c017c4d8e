"""Channel dependency analysis on a torch.fx trace: which Conv/Linear outputs, norms and inputs share a channel.

Each producer (Conv/Linear output) opens a channel space; pass-through ops carry it, elementwise adds unite
spaces, concatenation lays spaces side by side, flatten spreads a channel over H*W positions. A space that
reaches the model output, a model input, or an op we do not understand is blocked (never pruned).
"""
from __future__ import annotations

import contextlib
import io
import operator
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from netshrink.errors import NetshrinkError
from netshrink.sparsity.structured.groups import Group, Slice

PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                nn.Hardsigmoid, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Identity, nn.MaxPool1d,
                nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
PASS_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                  F.leaky_relu, F.hardswish, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                  F.max_pool1d, F.avg_pool1d, torch.clone}
PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "to"}
BINARY = {operator.add, operator.sub, operator.mul, operator.iadd, torch.add, torch.sub, torch.mul,
          "add", "sub", "mul", "add_", "mul_"}
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class TraceFailure(Exception):
    """The model's graph could not be traced: `op` names where tracing stopped."""

    def __init__(self, op: str, reason: str) -> None:
        self.op, self.reason = op, reason
        super().__init__(f"{op}: {reason}")


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, so a shape error can name the layer."""

    node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        return super().run_node(n)


def inputs_misfit(example_inputs: tuple, layer: str, exc: BaseException) -> NetshrinkError:
    """The error for example inputs the model cannot run: their shapes, the layer that refused them, and why."""
    shapes = ", ".join(f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                       for x in example_inputs) or "no inputs"
    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return NetshrinkError(f"{shapes} {'does' if len(example_inputs) == 1 else 'do'} not fit the model at {layer}: "
                          f"{reason}", where="example_inputs",
                          hint="pass example_inputs=(x,) with x a real batch of model inputs")


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record every node's output shape by running `example_inputs` through `gm`; inputs that do not fit the model
    raise NetshrinkError naming them and the layer where the shapes disagree (torch's traceback is not printed)."""
    prop = _ShapeProp(gm)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):  # ShapeProp prints a traceback before raising
            prop.propagate(*example_inputs)
    except Exception as exc:
        node = prop.node
        if node is None:
            layer = type(gm).__name__
        elif node.op == "call_module":
            layer = f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
        elif node.op == "placeholder":
            layer = f"model input '{node.target}'"
        else:
            layer = f"op {getattr(node.target, '__name__', node.target)} at {node.name}"
        raise inputs_misfit(example_inputs, layer, exc.__cause__ or exc) from None
    sys.stderr.write(printed.getvalue())


@dataclass
class Segment:
    space: int
    count: int
    inner: int = 1


@dataclass
class Layout:
    """Where channel spaces sit along `axis` of a tensor: segments laid end to end."""

    axis: int
    segments: list[Segment]


@dataclass
class Space:
    size: int
    blocked: str = ""
    slices: list[Slice] = field(default_factory=list)
    producer: str = ""


class _ModulePathTracer(fx.Tracer):
    """A tracer that remembers which module it is inside, to name the op when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.stack.append(f"{self.path_of_module(m)} ({type(m).__name__})")
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.stack.pop()


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace `model`; on failure raise TraceFailure naming the module and source line that stopped it."""
    tracer = _ModulePathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        where = tracer.stack[-1] if tracer.stack else type(model).__name__
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
        line = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""
        raise TraceFailure(where + line, f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
    return fx.GraphModule(model, graph)


class _Analysis:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.parent: list[int] = []
        self.spaces: list[Space] = []
        self.layouts: dict[fx.Node, Layout | None] = {}

    # union-find over spaces
    def new_space(self, size: int, blocked: str = "", producer: str = "") -> int:
        self.parent.append(len(self.parent))
        self.spaces.append(Space(size=size, blocked=blocked, producer=producer))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, why: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.spaces[ra].size != self.spaces[rb].size:
            self.block_space(ra, why)
            self.block_space(rb, why)
            return
        self.parent[rb] = ra
        sa, sb = self.spaces[ra], self.spaces[rb]
        sa.slices += sb.slices
        sa.blocked = sa.blocked or sb.blocked
        sa.producer = sa.producer or sb.producer

    def block_space(self, i: int, why: str) -> None:
        root = self.spaces[self.find(i)]
        root.blocked = root.blocked or why

    def block(self, layout: Layout | None, why: str) -> None:
        if layout is not None:
            for seg in layout.segments:
                self.block_space(seg.space, why)

    def add_slice(self, space: int, s: Slice) -> None:
        self.spaces[self.find(space)].slices.append(s)

    # helpers
    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def layout_of(self, arg: Any) -> Layout | None:
        return self.layouts.get(arg) if isinstance(arg, fx.Node) else None

    def tensor_layouts(self, args: Any) -> list[Layout]:
        found: list[Layout] = []
        fx.node.map_arg(args, lambda n: found.append(self.layouts[n]) if self.layouts.get(n) else None)
        return found

    def single(self, size: int, axis: int, producer: str) -> Layout:
        return Layout(axis=axis, segments=[Segment(self.new_space(size, producer=producer), size)])

    def consume(self, name: str, layout: Layout | None, param: str = "weight", dim: int = 1) -> None:
        if layout is None:
            return
        offset = 0
        for seg in layout.segments:
            self.add_slice(seg.space, Slice(name, param, dim, offset, seg.inner, role="in"))
            offset += seg.count * seg.inner

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.layouts[node] = self.visit(node)

    def visit(self, node: fx.Node) -> Layout | None:
        shape = self.shape(node)
        if node.op == "placeholder":
            if shape is None or len(shape) < 2:
                return None
            return Layout(1, [Segment(self.new_space(shape[1], blocked="model input"), shape[1])])
        if node.op == "output":
            for layout in self.tensor_layouts(node.args):
                self.block(layout, "reaches the model output")
            return None
        if node.op == "get_attr":
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(node.target), shape)
        if node.op in ("call_function", "call_method"):
            return self.visit_function(node, shape)
        return None

    def visit_module(self, node: fx.Node, m: nn.Module, shape: tuple[int, ...] | None) -> Layout | None:
        name = str(node.target)
        inp = self.layout_of(node.args[0]) if node.args else None
        if isinstance(m, CONV_TYPES):
            if m.groups == 1:
                if inp is not None and inp.axis != 1:
                    self.block(inp, f"{name} reads channels on an unexpected axis")
                else:
                    self.consume(name, inp)
                layout = self.single(m.out_channels, 1, name)
                self.add_out(layout, name, m)
                return layout
            if m.groups == m.in_channels == m.out_channels and inp is not None:
                self.add_norm(inp, name, ("weight", "bias") if m.bias is not None else ("weight",))
                return inp
            self.block(inp, f"grouped conv {name}")
            return Layout(1, [Segment(self.new_space(m.out_channels, blocked=f"grouped conv {name}"), m.out_channels)])
        if isinstance(m, nn.Linear):
            if inp is not None and shape is not None and inp.axis != len(shape) - 1:
                self.block(inp, f"{name} reads features on an unexpected axis")
            else:
                self.consume(name, inp)
            layout = self.single(m.out_features, len(shape) - 1 if shape else 1, name)
            self.add_out(layout, name, m)
            return layout
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            self.add_norm(inp, name, ("weight", "bias", "running_mean", "running_var") if m.affine
                          else ("running_mean", "running_var"))
            return inp
        if isinstance(m, PASS_MODULES):
            return inp
        if isinstance(m, nn.Flatten):
            return self.flatten(node, inp, shape)
        for layout in self.tensor_layouts((node.args, node.kwargs)):
            self.block(layout, f"{name} ({type(m).__name__}) mixes channels")
        return None

    def add_out(self, layout: Layout, name: str, m: nn.Module) -> None:
        space = layout.segments[0].space
        self.add_slice(space, Slice(name, "weight", 0, role="out"))
        if getattr(m, "bias", None) is not None:
            self.add_slice(space, Slice(name, "bias", 0, role="out"))

    def add_norm(self, layout: Layout | None, name: str, params: tuple[str, ...]) -> None:
        if layout is None:
            return
        if any(seg.inner != 1 for seg in layout.segments):
            self.block(layout, f"{name} sits on a flattened tensor")
            return
        offset = 0
        for seg in layout.segments:
            for p in params:
                self.add_slice(seg.space, Slice(name, p, 0, offset, role="norm"))
            offset += seg.count

    def flatten(self, node: fx.Node, inp: Layout | None, shape: tuple[int, ...] | None) -> Layout | None:
        in_shape = self.shape(node.args[0]) if node.args else None
        if inp is None:
            return None
        if shape is not None and in_shape is not None and shape == in_shape:
            return inp
        if (shape is None or in_shape is None or inp.axis != 1 or len(shape) != 2 or shape[0] != in_shape[0]
                or len(in_shape) < 2):
            self.block(inp, f"{node.name} reshapes channels")
            return None
        spread = 1
        for d in in_shape[2:]:
            spread *= d
        return Layout(1, [Segment(s.space, s.count, s.inner * spread) for s in inp.segments])

    def visit_function(self, node: fx.Node, shape: tuple[int, ...] | None) -> Layout | None:
        target = node.target
        first = node.args[0] if node.args else None
        inp = self.layout_of(first)
        if target in PASS_FUNCTIONS or target in PASS_METHODS:
            return inp
        if target in (torch.flatten, "flatten", "view", "reshape"):
            return self.flatten(node, inp, shape)
        if target in BINARY:
            return self.binary(node, shape)
        if target in (torch.cat, torch.concat):
            return self.cat(node)
        if target in ("size", "dim") or target is getattr:
            return None
        if target in (torch.mean, torch.sum, "mean", "sum", torch.amax, "amax") and inp is not None:
            in_shape = self.shape(first)
            if shape is not None and in_shape is not None and len(shape) > inp.axis \
                    and shape[inp.axis] == in_shape[inp.axis] and shape[: inp.axis] == in_shape[: inp.axis]:
                return inp
        for layout in self.tensor_layouts((node.args, node.kwargs)):
            self.block(layout, f"op {getattr(target, '__name__', target)} at {node.name}")
        return None

    def binary(self, node: fx.Node, shape: tuple[int, ...] | None) -> Layout | None:
        args = list(node.args[:2])
        layouts = [self.layout_of(a) for a in args]
        with_layout = [la for la in layouts if la is not None]
        if not with_layout:
            return None
        base = with_layout[0]
        for a, la in zip(args, layouts):
            if la is None and isinstance(a, fx.Node):
                other_shape = self.shape(a)
                if other_shape is None or int(torch.Size(other_shape).numel()) != 1:
                    self.block(base, f"{node.name} combines channels with a constant tensor")
        if len(with_layout) == 2:
            a, b = with_layout
            if a.axis != b.axis or len(a.segments) != len(b.segments) or any(
                    x.count != y.count or x.inner != y.inner for x, y in zip(a.segments, b.segments)):
                self.block(a, f"{node.name} adds tensors with different channel layouts")
                self.block(b, f"{node.name} adds tensors with different channel layouts")
                return None
            for x, y in zip(a.segments, b.segments):
                self.union(x.space, y.space, f"{node.name} adds different channel counts")
        return base

    def cat(self, node: fx.Node) -> Layout | None:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        layouts = [self.layout_of(p) for p in parts]
        shape = self.shape(node)
        if any(la is None for la in layouts) or shape is None:
            for la in layouts:
                self.block(la, f"{node.name} concatenates unknown tensors")
            return None
        dim = dim % len(shape)
        if all(la.axis == dim for la in layouts) and all(s.inner == 1 for la in layouts for s in la.segments):
            return Layout(dim, [s for la in layouts for s in la.segments])
        for la in layouts:
            self.block(la, f"{node.name} concatenates along another axis")
        return None


@dataclass
class GraphAnalysis:
    """Prunable channel groups and the spaces left alone with the reason."""

    groups: list[Group]
    blocked: dict[str, str]


def channel_groups(model: nn.Module, example_inputs: tuple) -> GraphAnalysis:
    """Trace `model` and return one Group per prunable channel space (raises TraceFailure when untraceable)."""
    gm = trace(model)
    propagate_shapes(gm, example_inputs)
    analysis = _Analysis(gm)
    analysis.run()
    groups: list[Group] = []
    blocked: dict[str, str] = {}
    seen: set[int] = set()
    for i in range(len(analysis.spaces)):
        root = analysis.find(i)
        if root in seen:
            continue
        seen.add(root)
        space = analysis.spaces[root]
        if not space.producer:
            continue
        if space.blocked:
            blocked[space.producer] = space.blocked
            continue
        if not any(s.role == "out" for s in space.slices):
            continue
        producers = sorted(dict.fromkeys(s.module for s in space.slices if s.role == "out"))
        groups.append(Group(name="+".join(producers), size=space.size, kind="channels", slices=list(space.slices)))
    return GraphAnalysis(groups=groups, blocked=blocked)
