"""GPTQ (Frantar et al. 2022): quantize a weight column by column, each rounding error pushed onto the columns
not yet quantized through the inverse Hessian of the layer objective ||W X - Q X||^2, H = 2 X X^T.

Follows the reference `fasterquant`: dead inputs zeroed, dampening `damp * mean(diag H)`, optional act-order
(columns by decreasing diag H), group-wise grids (computed when a group starts, or "static" on the original
weight before any update), and lazy batch updates (errors applied to later blocks of `block_size` columns at once).
A Cholesky factorisation that fails (H not positive definite) is retried with ten times the dampening, with a warning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from netshrink.errors import NetshrinkError
from netshrink.llm.checks import check, check_grid, is_int, is_real
from netshrink.llm.context import BlockContext
from netshrink.llm.grid import assemble, slice_qparams
from netshrink.llm.packing import QuantizedWeight


@dataclass
class GPTQ:
    """GPTQ weight quantization settings (group_size None = per output channel)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    block_size: int = 128
    true_sequential: bool = True
    damp_retries: int = 4

    method = "gptq"

    def __post_init__(self) -> None:
        check_grid(self)
        check(self, "damp", is_real(self.damp) and self.damp > 0, "a positive number")
        check(self, "block_size", is_int(self.block_size) and self.block_size > 0, "a positive integer")
        check(self, "damp_retries", is_int(self.damp_retries) and self.damp_retries >= 0, "an integer >= 0")
        if self.act_order and self.group_size and not self.static_groups:
            raise NetshrinkError("act_order with group_size needs static_groups=True", where="GPTQ",
                                 hint="packed layouts store consecutive column groups")


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, retries: int, where: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H) I)^-1, raising the dampening tenfold on each failure.

    H is consumed: pass a copy of your own and keep no reference to it (e.g. `box.pop()` as the argument). It is dampened in place and
    freed as soon as its factor exists, so at most two [in, in] matrices are alive at any time (H and L, then L and
    H^-1, then H^-1 and U). In the rare case that H^-1 has no factor, H is rebuilt from H^-1 for the next try.
    """
    mean_diag = float(torch.mean(torch.diag(H)))
    added = 0.0
    for attempt in range(retries + 1):
        H.diagonal().add_(damp * mean_diag - added)
        added = damp * mean_diag
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            del H
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            # finiteness through one sum (NaN/Inf propagate): torch.isfinite(U) would allocate ~1.75 matrices
            if int(info) == 0 and bool(torch.isfinite(U.sum())):
                if attempt:
                    warnings.warn(f"{where}: Cholesky of the Hessian failed; succeeded with dampening {damp:g}",
                                  stacklevel=3)
                return U, damp
            del U
            H = torch.linalg.inv(Hinv)
            del Hinv
            H = (H + H.T) / 2
        else:
            del L
        damp *= 10
    raise NetshrinkError(f"Hessian is not positive definite even with dampening {damp / 10:g}", where=where,
                         hint="use more calibration samples")


def own_hessian(H: torch.Tensor, consume: bool) -> torch.Tensor:
    """A method's working copy of H in float32: H itself when the caller handed it over, else a copy."""
    H = H.detach()
    return H.float() if consume or H.dtype != torch.float32 else H.clone()


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, config: GPTQ, where: str = "layer",
                  consume_hessian: bool = False) -> tuple[QuantizedWeight, dict]:
    """Quantize weight W [out, in] against Hessian H [in, in]; returns the grid and {loss, damp}.

    H is left untouched unless `consume_hessian`: then GPTQ works in H's own storage and frees it early (pass a
    matrix nobody else holds, e.g. `InputStats.take_H()`), so a layer needs about two [in, in] matrices at its peak
    instead of about four (tested on a 3072-wide layer)."""
    W = W.detach().clone().float()
    H = own_hessian(H, consume_hessian or config.act_order)   # act-order's permuted gather is a copy already
    out_f, cols = W.shape
    bits, sym, gs = config.bits, config.symmetric, config.group_size
    # Weights already pruned (SparseGPT, Wanda, 2:4) stay exactly zero: each is "quantized" to the zero code and its
    # error is pushed onto the kept weights like any rounding error, so GPTQ after pruning keeps the sparsity pattern.
    pruned = W == 0
    diag = torch.diag(H).clone()
    dead = diag == 0
    diag[dead] = 1                  # a dead input gets H_ii = 1 (in GPTQ's own copy of H, set after the copy)
    W[:, dead] = 0

    scales, zeros = initial_grids(W, config)

    perm = torch.arange(cols)
    if config.act_order:
        perm = torch.argsort(diag, descending=True)
        # one gather (not H[perm][:, perm], which makes an intermediate copy); the unpermuted H is freed here
        W, H, pruned, dead = W[:, perm], H[perm.unsqueeze(1), perm.unsqueeze(0)], pruned[:, perm], dead[perm]
    H[dead, dead] = 1
    invperm = torch.argsort(perm)

    box = [H]                       # handed over below: inverse_hessian_cholesky holds the only reference
    del H
    Hinv, damp = inverse_hessian_cholesky(box.pop(), config.damp, config.damp_retries, where)
    codes, losses = gptq_columns(W, lambda i1, i2, c0, c1: Hinv[i1:i2, c0:c1], perm, pruned, scales, zeros,
                                 config)
    qw = assemble(codes[:, invperm], scales, zeros, bits, gs)
    return qw, {"loss": float(losses.sum()), "damp": damp}


def initial_grids(W: torch.Tensor, config: GPTQ) -> tuple[list, list]:
    """Per-group (scale, zero point) lists of rows W before any update: per channel, or every group when static;
    None where a group's grid is computed when GPTQ reaches it (static_groups=False)."""
    gs = config.group_size
    n_groups = -(-W.shape[1] // gs) if gs else 1
    scales: list = [None] * n_groups
    zeros: list = [None] * n_groups
    if gs is None:
        scales[0], zeros[0] = slice_qparams(W, config.bits, config.symmetric)
    elif config.static_groups:
        for g in range(n_groups):
            scales[g], zeros[g] = slice_qparams(W[:, g * gs: (g + 1) * gs], config.bits, config.symmetric)
    return scales, zeros


def gptq_columns(W: torch.Tensor, upper, perm: torch.Tensor, pruned: torch.Tensor, scales: list, zeros: list,
                 config: GPTQ, update_columns: int = 512, want_losses: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPTQ's column loop on rows W [rows, cols] (columns in `perm` order; W is updated in place): codes (in
    `perm` order) and per-row losses. `upper(i1, i2, c0, c1)` gives U[i1:i2, c0:c1], a block of the upper Cholesky
    factor U of H^-1 (the lazy update past each block of columns asks for it `update_columns` at a time, so a packed
    U is never unpacked more than that). Rows are independent given U, so a weight may go through in row slabs with
    the same U (`scales`, `zeros`: per-group row parameters of these rows; None = computed here). The loop is a
    few small torch ops per column, so per-column Python work is kept out of it (`want_losses=False` skips the
    losses: the streamed path, which runs the loop once per slab of rows, does not use them)."""
    rows, cols = W.shape
    bits, sym, gs = config.bits, config.symmetric, config.group_size
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    losses = torch.zeros(rows) if want_losses else None
    group_of = [int(c) // gs for c in perm.tolist()] if gs else [0] * cols
    has_pruned = pruned.any(0).tolist()
    qmax = (1 << bits) - 1
    grid = None
    for i1 in range(0, cols, config.block_size):
        i2 = min(i1 + config.block_size, cols)
        Hinv1 = upper(i1, i2, i1, i2)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if gs and not config.static_groups and col % gs == 0:
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                scales[g], zeros[g] = slice_qparams(ahead, bits, sym)
                grid = None
            if grid is None or grid[0] != g:                # round_slice's arithmetic, its parameters cast once
                grid = (g, scales[g].reshape(-1).float(), zeros[g].reshape(-1).float())
            _, s, z = grid
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.round(w / s).add_(z).clamp_(0, qmax)
            wq = (q - z).mul_(s)
            if has_pruned[col]:
                keep_zero = pruned[:, col]
                q = torch.where(keep_zero, z, q)
                wq = torch.where(keep_zero, torch.zeros_like(wq), wq)
            codes[:, col] = q                               # whole numbers in [0, qmax]: exact as uint8
            err = (w - wq) / d
            if want_losses:
                losses += err * err / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        for c0 in range(i2, cols, update_columns):
            c1 = min(c0 + update_columns, cols)
            W[:, c0:c1] -= Err1 @ upper(i1, i2, c0, c1)
    return codes, losses


def compress_block(ctx: BlockContext, config: GPTQ) -> None:
    """GPTQ every Linear of the block, in true-sequential order, Hessians from the calibration inputs."""
    def one(name, layer, stats):
        qw, info = gptq_quantize(layer.weight, stats.take_H(), config, where=f"{ctx.where}.{name}",
                                 consume_hessian=True)
        ctx.set_weight(name, qw.dequantize(), qw, method="gptq", bits=config.bits,
                       granularity="group" if config.group_size else "channel", group_size=config.group_size,
                       symmetric=config.symmetric, act_order=config.act_order, damp=info["damp"])
    ctx.sequential({"hessian"}, one, config.true_sequential)
