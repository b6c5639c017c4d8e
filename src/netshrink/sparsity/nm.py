"""N:M semi-structured sparsity: in every run of M weights along the reduction dimension keep the N largest.

2:4 is what NVIDIA sparse tensor cores (compute capability >= 8.0) execute: per group the 2 kept values plus
their 2-bit positions. On any other hardware an N:M model runs dense with zeros: same speed as dense.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.record import note
from netshrink.sparsity.layers import prunable_layers
from netshrink.sparsity.masks import make_permanent, set_mask

INDIVISIBLE = ("pad", "skip")


@dataclass
class NM:
    """Keep `n` of every `m` weights along the reduction dimension (Linear: in_features; Conv: input channels).

    indivisible: 'pad' (treat the missing tail of the last group as zeros, so it keeps its min(n, r) largest) or
    'skip' (leave such a layer dense); either way the report names the layers concerned.
    """

    n: int = 2
    m: int = 4
    indivisible: str = "pad"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        """Refuse N > M, non-positive N or M, and unknown indivisible policies."""
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.n < 1 or self.m < 1:
            raise NetshrinkError(f"N and M must be positive integers, got {self.n}:{self.m}", where="NM")
        if self.n > self.m:
            raise NetshrinkError(f"N ({self.n}) is greater than M ({self.m})", where="NM.n",
                                 hint="N:M keeps N of every M weights, so N <= M")
        if self.indivisible not in INDIVISIBLE:
            raise NetshrinkError(f"unknown policy {self.indivisible!r}", where="NM.indivisible", hint="'pad' or 'skip'")


def reduction_view(weight: torch.Tensor) -> torch.Tensor:
    """The weight as [out, K] with K the reduction dim; conv weights channels-last ([out, kh, kw, in])."""
    if weight.dim() == 2:
        return weight
    return weight.movedim(1, -1).reshape(weight.shape[0], -1)


def from_reduction_view(view: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `reduction_view` for a tensor shaped like `like`."""
    if like.dim() == 2:
        return view
    shape = (like.shape[0],) + tuple(like.shape[2:]) + (like.shape[1],)
    return view.reshape(shape).movedim(-1, 1)


def nm_mask(weight2d: torch.Tensor, n: int = 2, m: int = 4, indivisible: str = "pad") -> torch.Tensor | None:
    """Mask keeping the n largest |w| of every m consecutive entries of each row; None when skipped."""
    rows, k = weight2d.shape
    if k % m and indivisible == "skip":
        return None
    groups = math.ceil(k / m)
    scores = torch.full((rows, groups * m), -1.0, dtype=torch.float32)
    scores[:, :k] = weight2d.detach().abs().float()
    order = torch.argsort(-scores.view(rows, groups, m), dim=-1, stable=True)
    keep = torch.zeros(rows, groups, m, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.view(rows, groups * m)[:, :k].contiguous()


@dataclass
class NMCompressed:
    """Kept values [rows, groups * n] and their in-group positions packed at ceil(log2 m) bits, low bits first."""

    values: torch.Tensor
    indices: torch.Tensor  # uint8, packed
    shape: tuple[int, int]
    n: int
    m: int

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.m)))

    def nbytes(self) -> int:
        """Storage of the compressed layout."""
        return self.values.numel() * self.values.element_size() + self.indices.numel()


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack small non-negative integers at `bits` bits each into uint8, first value in the lowest bits."""
    flat = values.flatten().to(torch.int64)
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).flatten()
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
    return (stream.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` values."""
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).flatten()[: count * bits]
    return (stream.view(count, bits) << torch.arange(bits)).sum(1)


def compress_nm(weight2d: torch.Tensor, n: int = 2, m: int = 4, mask: torch.Tensor | None = None) -> NMCompressed:
    """Compressed layout of the N:M-masked weight (the tail of a row not divisible by m counts as padding zeros)."""
    NM(n, m).validate()
    if weight2d.dim() != 2:
        raise NetshrinkError(f"weight has {weight2d.dim()} dimensions, expected 2 ([rows, K])", where="compress_nm",
                             hint="pass reduction_view(weight) for a conv weight")
    if mask is not None and tuple(mask.shape) != tuple(weight2d.shape):
        raise NetshrinkError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight2d.shape)}",
                             where="compress_nm", hint="pass the mask of this weight in the same [rows, K] view")
    mask = nm_mask(weight2d, n, m) if mask is None else mask.to(torch.bool)
    rows, k = weight2d.shape
    groups = math.ceil(k / m)
    padded_w = torch.zeros(rows, groups * m, dtype=weight2d.dtype)
    padded_w[:, :k] = weight2d.detach() * mask
    padded_m = torch.zeros(rows, groups * m, dtype=torch.bool)
    padded_m[:, :k] = mask
    counts = padded_m.view(rows, groups, m).sum(-1)
    if bool((counts > n).any()):
        raise NetshrinkError(f"mask keeps more than {n} of {m} in some group", where="compress_nm")
    # kept positions first (ascending), then filler positions whose values are zero, n per group
    key = (~padded_m).view(rows, groups, m).to(torch.int64) * m + torch.arange(m)
    idx = torch.sort(torch.sort(key, dim=-1).values[..., :n] % m, dim=-1).values
    values = torch.gather(padded_w.view(rows, groups, m), -1, idx).reshape(rows, groups * n)
    bits = max(1, math.ceil(math.log2(m)))
    return NMCompressed(values.contiguous(), pack_bits(idx, bits), (rows, k), n, m)


def decompress_nm(c: NMCompressed) -> torch.Tensor:
    """Dense [rows, K] tensor from the compressed layout (exact inverse of `compress_nm`)."""
    rows, k = c.shape
    groups = math.ceil(k / c.m)
    idx = unpack_bits(c.indices, c.index_bits, rows * groups * c.n).view(rows, groups, c.n)
    dense = torch.zeros(rows, groups, c.m, dtype=c.values.dtype)
    dense.scatter_(-1, idx, c.values.view(rows, groups, c.n))
    return dense.view(rows, groups * c.m)[:, :k].contiguous()


@dataclass
class NMResult:
    """Per-layer outcome: pruned, padded or skipped layers, and what executes them."""

    pattern: str
    pruned: list[str] = field(default_factory=list)
    padded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    execution: str = ""

    def fallbacks(self) -> list[str]:
        """The layers not pruned as asked, one line per policy (also given as a UserWarning by `nm_prune`)."""
        out = []
        if self.padded:
            out.append(f"padded (reduction dim not divisible by M): {', '.join(self.padded)}")
        if self.skipped:
            out.append(f"skipped, left dense (reduction dim not divisible by M): {', '.join(self.skipped)}")
        return out

    def lines(self) -> list[str]:
        return [f"{self.pattern} sparsity on {len(self.pruned)} layers"] + self.fallbacks() + [self.execution]


def nm_prune(model: nn.Module, config: NM) -> NMResult:
    """Put N:M masks on the prunable layers of `model` in place; returns which layers were padded or skipped."""
    config.validate()
    result = NMResult(pattern=f"{config.n}:{config.m}")
    layers = prunable_layers(model, config.include, config.exclude, where="NM.exclude")
    for name, module in layers.items():
        w = module.weight
        view = reduction_view(w)
        mask2d = nm_mask(view, config.n, config.m, config.indivisible)
        if mask2d is None:
            result.skipped.append(name)
            note(model, name, nm_skipped=f"reduction dim {view.shape[1]} not divisible by {config.m}")
            continue
        if view.shape[1] % config.m:
            result.padded.append(name)
        set_mask(module, from_reduction_view(mask2d, w), where=name)
        result.pruned.append(name)
        note(model, name, method="prune:nm", pattern=result.pattern, sparsity=round(1 - float(mask2d.float().mean()), 6),
             nm_padded=name in result.padded)
    result.execution = execution_statement(config)
    for line in result.fallbacks():
        warnings.warn(f"{result.pattern} sparsity: {line}", UserWarning, stacklevel=2)
    return result


def _hardware() -> Any:
    from netshrink.hardware import detect

    return detect()


def execution_statement(config: NM, hardware: Any = None) -> str:
    """What will execute this pattern here, said plainly."""
    hw = hardware if hardware is not None else _hardware()
    cap = getattr(hw, "cuda_capability", None)
    if (config.n, config.m) != (2, 4):
        return (f"{config.n}:{config.m} has no hardware kernel (sparse tensor cores implement 2:4 only): "
                "the model runs dense with zeros, no speedup")
    if cap is None:
        return "no CUDA GPU here: 2:4 sparsity runs dense with zeros on this hardware, no 2:4 speedup"
    if tuple(cap) < (8, 0):
        return (f"GPU compute capability {cap[0]}.{cap[1]} < 8.0 has no sparse tensor cores: runs dense, "
                "no 2:4 speedup on this hardware")
    return (f"GPU compute capability {cap[0]}.{cap[1]} has 2:4 sparse tensor cores: call to_semi_structured() "
            "on the fp16/bf16 CUDA model to use them")


def to_semi_structured(model: nn.Module, hardware: Any = None) -> dict[str, str]:
    """On a CUDA GPU with capability >= 8.0, swap 2:4-masked fp16/bf16 CUDA weights for torch's semi-structured
    sparse tensors (real sparse tensor-core kernels); elsewhere change nothing. Returns per-layer outcome."""
    hw = hardware if hardware is not None else _hardware()
    cap = getattr(hw, "cuda_capability", None)
    outcome: dict[str, str] = {}
    if cap is None or tuple(cap) < (8, 0):
        return {"*": execution_statement(NM(2, 4), hw)}
    from torch.sparse import to_sparse_semi_structured

    make_permanent(model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
            outcome[name] = "dense (needs an fp16/bf16 weight on the CUDA device)"
            continue
        if not _is_2_4(w):
            outcome[name] = "dense (weight is not 2:4 sparse)"
            continue
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
            outcome[name] = "2:4 sparse tensor cores"
        except (RuntimeError, ValueError) as exc:
            outcome[name] = f"dense ({str(exc).splitlines()[0]})"
    return outcome


def _is_2_4(w: torch.Tensor) -> bool:
    rows, k = w.shape
    if k % 4:
        return False
    return bool(((w != 0).view(rows, k // 4, 4).sum(-1) <= 2).all())
