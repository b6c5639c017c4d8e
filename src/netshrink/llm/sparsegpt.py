"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning as sparse regression on the layer objective.

Column by column (lazy blocks of `block_size`, like GPTQ), the weights with the smallest w^2 / [H^-1]_jj^2 are
masked -- chosen per block for unstructured sparsity, or n of every m for an N:M pattern -- and each column's
error (pruning, optionally followed by quantization) is compensated on the columns still to come through H^-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from netshrink.errors import NetshrinkError
from netshrink.llm.checks import check, check_grid, check_sparsity, is_int, is_real
from netshrink.llm.context import BlockContext
from netshrink.llm.gptq import inverse_hessian_cholesky, own_hessian
from netshrink.llm.grid import assemble, round_slice, slice_qparams
from netshrink.llm.packing import QuantizedWeight


def parse_pattern(pattern: str | None, where: str = "pattern") -> tuple[int, int]:
    """"2:4" -> (2, 4): prune n of every m consecutive input weights; None -> (0, 0), unstructured."""
    if pattern is None:
        return 0, 0
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except (AttributeError, ValueError) as exc:
        raise NetshrinkError(f"bad N:M pattern {pattern!r}", where=where, hint='write it like "2:4"') from exc
    if not 0 < n < m:
        raise NetshrinkError(f"N:M pattern needs 0 < N < M, got {pattern!r}", where=where)
    return n, m


def check_nm_fits(in_features: int, pattern: str | None, where: str) -> None:
    """An N:M pattern needs M to divide the layer's input size (groups are consecutive input weights)."""
    _, m = parse_pattern(pattern)
    if m and in_features % m:
        raise NetshrinkError(f"{in_features} input features do not split into groups of {m} (pattern {pattern!r})",
                             where=where, hint="choose an M that divides the layer's input size, e.g. 2:4")


@dataclass
class SparseGPT:
    """SparseGPT settings: unstructured `sparsity`, or an N:M `pattern` ("2:4" prunes 2 of every 4); `bits` set
    means joint sparsification + GPTQ-style quantization."""

    sparsity: float = 0.5
    pattern: str | None = None
    block_size: int = 128
    damp: float = 0.01
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = False
    true_sequential: bool = True
    damp_retries: int = 4

    method = "sparsegpt"

    def __post_init__(self) -> None:
        _, m = parse_pattern(self.pattern, where="SparseGPT.pattern")
        if self.pattern is None:
            check_sparsity(self)
        check_grid(self, bits_optional=True)
        check(self, "damp", is_real(self.damp) and self.damp > 0, "a positive number")
        check(self, "block_size", is_int(self.block_size) and self.block_size > 0 and self.block_size % max(m, 1) == 0,
              f"a positive multiple of the pattern's M={m}" if m else "a positive integer")
        check(self, "damp_retries", is_int(self.damp_retries) and self.damp_retries >= 0, "an integer >= 0")


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, config: SparseGPT, where: str = "layer",
                    consume_hessian: bool = False) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight | None, dict]:
    """Prune (and optionally quantize) W [out, in] against H; returns (new weight, keep mask, grid or None, info).

    `consume_hessian`: work in H's own storage and free it early (see `gptq_quantize`)."""
    W = W.detach().clone().float()
    H = own_hessian(H, consume_hessian)
    out_f, cols = W.shape
    check_nm_fits(cols, config.pattern, where)
    prunen, prunem = parse_pattern(config.pattern)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    bits, gs, sym = config.bits, config.group_size, config.symmetric
    scales, zeros = [], []
    if bits and gs is None:
        s, z = slice_qparams(W, bits, sym)
        scales, zeros = [s], [z]
    box = [H]                       # handed over below: inverse_hessian_cholesky holds the only reference
    del H
    Hinv, damp = inverse_hessian_cholesky(box.pop(), config.damp, config.damp_retries, where)
    pruned = torch.zeros(out_f, cols, dtype=torch.bool)
    codes = torch.zeros(out_f, cols, dtype=torch.uint8)
    losses = torch.zeros(out_f)
    for i1 in range(0, cols, config.block_size):
        i2 = min(i1 + config.block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            score = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = int(score.numel() * config.sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                mask1.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = i1 + i
            if prunen and i % prunem == 0:
                score = W1[:, i: i + prunem] ** 2 / torch.diag(Hinv1)[i: i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(score, prunen, dim=1, largest=False).indices, True)
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            if bits:
                if gs and col % gs == 0:
                    ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                    keep_ahead = ~torch.cat([mask1[:, i:], torch.zeros(out_f, max(0, cols - i2), dtype=torch.bool)],
                                            dim=1)[:, :gs]
                    s, z = slice_qparams(ahead * keep_ahead, bits, sym)
                    scales.append(s)
                    zeros.append(z)
                c, q = round_slice(q, scales[-1], zeros[-1], bits, sym)
                codes[:, col] = c
            Q1[:, i] = q
            losses += (w - q) ** 2 / d ** 2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    qw = assemble(codes, scales, zeros, bits, gs) if bits else None
    return W, ~pruned, qw, {"loss": float(losses.sum()), "damp": damp}


def compress_block(ctx: BlockContext, config: SparseGPT) -> None:
    """SparseGPT every Linear of the block, true-sequential, Hessians from the calibration inputs."""
    def one(name, layer, stats):
        W, keep, qw, info = sparsegpt_prune(layer.weight, stats.take_H(), config, where=f"{ctx.where}.{name}",
                                            consume_hessian=True)
        fields = dict(method="sparsegpt", sparsity=float(1 - keep.float().mean()), pattern=config.pattern or
                      "unstructured", damp=info["damp"])
        if qw is not None:
            fields.update(bits=config.bits, granularity="group" if config.group_size else "channel",
                          group_size=config.group_size, symmetric=config.symmetric)
        ctx.set_weight(name, W, qw, **fields)
    ctx.sequential({"hessian"}, one, config.true_sequential)
