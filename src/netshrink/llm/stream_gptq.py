"""GPTQ straight from a checkpoint on disk, one Linear at a time, in well under one FP32 block of memory.

The in-memory pipeline loads a whole FP32 block and GPTQ holds an [in, in] Hessian plus its factor per Linear; on
SmolLM2 (13.5 MiB blocks, a 1536-wide down projection) that peaked at about 4 blocks. `stream.py` uses this path
for GPTQ with `true_sequential` (the default) and packed output. Per decoder block, group by group in GPTQ's true
sequential order (q/k/v, o, gate/up, down):
1. the block runs on the calibration batches only as far as the group's first Linear (`BlockRunner.run_until`); the
   Linears before it are already quantized and compute their FP32 product from the packed codes a slab of rows at a
   time (`DequantizedProduct`), as the in-memory pipeline computes it from the dense dequantized weight, and the
   ones after it are not loaded yet;
2. the group's shared input builds one packed Hessian (`PackedHessian`: the upper triangle, factored in place;
   `DenseHessian` above 4096 inputs, for speed; with act order a first pass orders the columns by the inputs'
   squared norms), shared by the group's Linears;
3. each Linear is read from its shard a slab of rows at a time and quantized against that factor (rows are
   independent given it: `gptq.gptq_columns`), then packed.
At its peak a block holds its packed Linears, one packed Hessian, one slab of FP32 rows and one batch of
activations. After the last group the packed block computes the next block's inputs, as in the in-memory pipeline.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from netshrink.bench.memory import trim_heap
from netshrink.errors import NetshrinkError
from netshrink.llm.arch import LINEARS, SEQUENTIAL
from netshrink.llm.checks import check_finite
from netshrink.llm.gptq import GPTQ, gptq_columns, initial_grids
from netshrink.llm.grid import assemble
from netshrink.llm.packed_hessian import DenseHessian, PackedHessian, new_hessian
from netshrink.llm.packed_linear import PackedLinear
from netshrink.llm.packing import pack_codes
from netshrink.llm.runner import BlockRunner
from netshrink.llm.safetensors_io import ShardedCheckpoint


def slab_bytes(block_bytes: int) -> int:
    """Working-set unit of this path (FP32 weight rows per slab, activations per batch, Hessian update slabs): a
    sixteenth of an FP32 block, at least 1 MiB."""
    return max(1 << 20, block_bytes // 16)


class DequantizedProduct(nn.Module):
    """x W^T + b in FP32 for a PackedLinear's grid W, dequantized `rows` output rows at a time: the product the
    in-memory pipeline computes with the dense dequantized weight, without ever holding that weight."""

    def __init__(self, packed: PackedLinear, slab: int):
        super().__init__()
        self.packed = packed
        self.rows = max(1, slab // (32 * packed.in_features))  # dequantizing makes ~4 temporaries of a chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.packed
        x2 = x.reshape(-1, p.in_features).float()
        out = torch.empty(x2.shape[0], p.out_features)
        for a in range(0, p.out_features, self.rows):
            b = min(a + self.rows, p.out_features)
            rows = p.quantized_weight(a, b)
            out[:, a:b] = x2 @ rows.dequantize().t()
        if p.bias is not None:
            out += p.bias
        del rows
        trim_heap()                                 # the chunks' temporaries back to the OS (see trim_heap)
        return out.reshape(*x.shape[:-1], p.out_features)


def group_hessian(block: nn.Module, hidden: torch.Tensor, runner: BlockRunner, names: tuple[str, ...], n: int,
                  config: GPTQ, where: str, update_elements: int, packed: bool | None = None
                  ) -> tuple[PackedHessian | DenseHessian, torch.Tensor | None, torch.Tensor, float]:
    """The factored packed Hessian of the inputs shared by `names` (U of H^-1, in act order when asked), the column
    order, the dead inputs (original indices) and the dampening used. A failed factorisation accumulates H again
    with ten times the dampening, with a warning, as `gptq.inverse_hessian_cholesky` does."""
    order = None
    if config.act_order:                        # GPTQ's order: decreasing diag(H) = 2/N sum x_j^2
        sq, count = torch.zeros(n), [0]

        def norms(x: torch.Tensor) -> None:
            x = x.detach().reshape(-1, n).float()
            sq.add_((x * x).sum(0))
            count[0] += x.shape[0]

        runner.run_until(block, hidden, names, norms, where)
        diag = sq * (2.0 / max(count[0], 1))
        diag[sq == 0] = 1                       # a dead input counts as H_ii = 1, as in the dense path
        order = torch.argsort(diag, descending=True)
    damp = config.damp
    for attempt in range(config.damp_retries + 1):
        trim_heap()
        H = new_hessian(n, order, update_elements, packed)

        def add(x: torch.Tensor) -> None:
            H.add(x)
            trim_heap()                         # each batch's temporaries back to the OS before the next

        runner.run_until(block, hidden, names, add, where)
        diag = H.finish(f"{where}.{names[0]}")
        dead = diag == 0
        if dead.any():
            H.add_to_diagonal(dead.float())     # H_ii = 1 for an input no token ever set
        H.add_to_diagonal(damp * float(torch.where(dead, torch.ones_like(diag), diag).mean()))
        if H.factor_inverse_cholesky():
            if attempt:
                warnings.warn(f"{where}.{names[0]}: Cholesky of the Hessian failed; succeeded with dampening "
                              f"{damp:g}", stacklevel=3)
            dead_original = dead if order is None else order[dead]
            return H, order, dead_original, damp
        del H
        damp *= 10
    raise NetshrinkError(f"Hessian is not positive definite even with dampening {damp / 10:g}",
                         where=f"{where}.{names[0]}", hint="use more calibration samples")


def quantize_from_disk(ckpt: ShardedCheckpoint, key: str, H: PackedHessian | DenseHessian,
                       order: torch.Tensor | None, dead: torch.Tensor, config: GPTQ, where: str, slab: int,
                       bias: torch.Tensor | None = None) -> PackedLinear:
    """GPTQ of the weight `key` against the factored H, read, quantized and packed a slab of rows at a time."""
    _, shape, _, _ = ckpt.raw_location(key)
    out_f, in_f = shape
    bits, gs = config.bits, config.group_size
    perm = order if order is not None else torch.arange(in_f)
    invperm = torch.argsort(perm)
    layer = PackedLinear(in_f, out_f, bits, gs, bias=bias is not None)
    if bias is not None:
        layer.bias.copy_(bias)
    step = max(1, slab // (8 * in_f))              # rows per slab: with their permuted copy and updates, ~4x
    for a in range(0, out_f, step):
        b = min(a + step, out_f)
        W = ckpt.read_rows(key, a, b).float()
        check_finite(W, where)
        pruned = W == 0                             # kept at zero, as in gptq_quantize
        W[:, dead] = 0
        scales, zeros = initial_grids(W, config)
        W, pruned = W[:, perm], pruned[:, perm]
        codes, _ = gptq_columns(W, H.upper_rows, perm, pruned, scales, zeros, config, want_losses=False)
        rows = assemble(codes[:, invperm], scales, zeros, bits, gs)
        layer.qweight[a:b] = pack_codes(rows.codes, bits)
        layer.scales[a:b] = rows.scales
        layer.zeros[a:b] = rows.zeros
        del W, pruned, codes, rows
        trim_heap()                                 # this slab's temporaries back to the OS before the next
    return layer


@torch.no_grad()
def gptq_block_from_disk(ckpt: ShardedCheckpoint, arch: Any, hf_config: Any, index: int, config: GPTQ,
                         hidden: torch.Tensor, runner: BlockRunner, where: str, packed_hessian: bool | None = None
                         ) -> tuple[nn.Module, dict[str, dict], torch.Tensor]:
    """Decoder block `index` quantized by GPTQ from the checkpoint (see module doc): (the block with PackedLinears,
    its records, its outputs on `hidden`, the next block's inputs). `packed_hessian`: see `new_hessian`."""
    if not torch.isfinite(hidden).all():
        raise NetshrinkError("input hidden states are NaN or Inf", where=where,
                             hint="an earlier block or the embeddings produce non-finite values")
    block, tensors = arch.block_without_linears(hf_config, index, ckpt.load)
    prefix = f"{arch.layers}.{index}."
    for key, tensor in tensors.items():
        check_finite(tensor, where, key[len(prefix):])
    block.eval()
    block_bytes = 4 * sum(block.get_submodule(n).weight.numel() for n in LINEARS)
    slab = slab_bytes(block_bytes)
    # calibration batches small enough that a batch's widest activation stays within a slab
    widest = max(block.get_submodule(n).out_features for n in LINEARS)
    small = copy.copy(runner)
    small.batch_size = max(1, min(runner.batch_size, slab // (16 * widest * hidden.shape[1])))
    records: dict[str, dict] = {}
    packed: dict[str, PackedLinear] = {}
    for group in SEQUENTIAL:
        n = block.get_submodule(group[0]).in_features
        H, order, dead, damp = group_hessian(block, hidden, small, group, n, config, where, slab // 16,
                                             packed_hessian)
        for name in group:
            bias_key = f"{prefix}{name}.bias"
            bias = ckpt.read(bias_key).float() if bias_key in ckpt.weight_map else None
            if bias is not None:
                check_finite(bias, f"{where}.{name}", "bias")
            packed[name] = quantize_from_disk(ckpt, f"{prefix}{name}.weight", H, order, dead, config,
                                              f"{where}.{name}", slab, bias)
            block.set_submodule(name, DequantizedProduct(packed[name], slab))
            trim_heap()                         # the slabs' temporaries back to the OS before the next step
            records[f"{where}.{name}"] = dict(method="gptq", bits=config.bits,
                                              granularity="group" if config.group_size else "channel",
                                              group_size=config.group_size, symmetric=config.symmetric,
                                              act_order=config.act_order, damp=damp)
        del H
        trim_heap()
    hooks = []
    for name, layer in packed.items():          # the next block's inputs through the packed kernels, as in memory
        block.set_submodule(name, layer)
        layer.prepare()
        trim_heap()                             # the kernel layout's conversion temporaries
        hooks.append(layer.register_forward_hook(lambda *_: trim_heap()))
    try:
        out = small.run(block, hidden, where)
    finally:
        for hook in hooks:
            hook.remove()
    for layer in packed.values():
        layer._kernel = None                    # the layouts were only for that forward
    return block, records, out
