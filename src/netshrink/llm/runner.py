"""Run one decoder block on the calibration activations, and collect the input statistics of its Linears.

The block sees exactly what it sees inside the model: causal mask, rotary position embeddings, mini-batches of
calibration samples. Statistics are summed over every calibration token:
  hessian  H = 2/N sum x x^T     (GPTQ, SparseGPT: the layer objective ||WX - W'X||^2 is quadratic in H)
  sq_norm  sum x_j^2 per channel (Wanda's ||X_j||_2^2)
  abs_max  max |x_j|             (SmoothQuant)
  samples  a fixed random subset of token rows (AWQ's scale and clip search)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.llm.arch import causal_mask


@dataclass
class InputStats:
    """Running statistics of one Linear's input."""

    want: frozenset
    max_samples: int = 4096
    tokens: int = 0
    hessian: torch.Tensor | None = None
    sq_norm: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    rows: list = field(default_factory=list)
    seed: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if "hessian" in self.want:     # accumulated in place: no second [in, in] matrix per batch
            self.hessian = x.t() @ x if self.hessian is None else self.hessian.addmm_(x.t(), x)
        if "sq_norm" in self.want:
            s = (x * x).sum(0)
            self.sq_norm = s if self.sq_norm is None else self.sq_norm.add_(s)
        if "abs_max" in self.want:
            m = x.abs().amax(0)
            self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if "samples" in self.want:
            gen = torch.Generator().manual_seed(self.seed + self.tokens)
            keep = torch.randperm(n, generator=gen)[: max(1, self.max_samples // 8)]
            self.rows.append(x[keep].clone())
        self.tokens += n

    def H(self) -> torch.Tensor:
        """Hessian of the layer objective, 2/N X X^T (float32)."""
        return self.hessian * (2.0 / self.tokens)

    def take_H(self) -> torch.Tensor:
        """The Hessian 2/N X X^T, scaled in place and handed over: these statistics keep no reference to it, so a
        consumer such as GPTQ can free it as soon as it is done (no second [in, in] copy)."""
        H, self.hessian = self.hessian, None
        if H is None:
            raise NetshrinkError("the Hessian was not collected or was already taken", where="InputStats")
        return H.mul_(2.0 / self.tokens)

    def samples(self) -> torch.Tensor:
        """At most `max_samples` input rows [n, in]."""
        rows = torch.cat(self.rows)
        if rows.shape[0] > self.max_samples:
            gen = torch.Generator().manual_seed(self.seed)
            rows = rows[torch.randperm(rows.shape[0], generator=gen)[: self.max_samples]]
        return rows


class BlockRunner:
    """Forward calibration activations [n, T, H] through a decoder block, in mini-batches, as the model would."""

    def __init__(self, rotary: nn.Module, seq_len: int, hidden: int, batch_size: int = 8):
        pos = torch.arange(seq_len)[None]
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, seq_len, hidden), pos)
        self.position_ids, self.position_embeddings = pos, (cos, sin)
        self.mask = causal_mask(seq_len)
        self.batch_size = batch_size

    def _call(self, block: nn.Module, h: torch.Tensor):
        return block(h, attention_mask=self.mask, position_ids=self.position_ids,
                     position_embeddings=self.position_embeddings)

    @torch.no_grad()
    def run(self, block: nn.Module, hidden: torch.Tensor, where: str = "block") -> torch.Tensor:
        """Block outputs for every sample; NaN or Inf in them raises NetshrinkError naming the block."""
        outs = []
        for i in range(0, hidden.shape[0], self.batch_size):
            out = self._call(block, hidden[i: i + self.batch_size])
            outs.append(out[0] if isinstance(out, tuple) else out)
        result = torch.cat(outs)
        if not torch.isfinite(result).all():
            raise NetshrinkError("hidden states became NaN or Inf", where=where,
                                 hint="check the input weights of this block, or lower the compression")
        return result

    @torch.no_grad()
    def run_until(self, block: nn.Module, hidden: torch.Tensor, names: tuple[str, ...],
                  consume: Callable[[torch.Tensor], None], where: str) -> None:
        """Run the block on each calibration batch only as far as the first of the Linears `names` it calls (they
        share one input): `consume` gets that input, and the rest of the block is skipped, so Linears after it need
        no weights yet (streamed GPTQ loads each just before it is compressed)."""
        class Reached(Exception):
            pass

        def stop(_module, args):
            consume(args[0])
            raise Reached

        handles = [block.get_submodule(n).register_forward_pre_hook(stop) for n in names]
        try:
            for i in range(0, hidden.shape[0], self.batch_size):
                try:
                    self._call(block, hidden[i: i + self.batch_size])
                except Reached:
                    continue
                raise NetshrinkError("the block's forward never called this layer", where=f"{where}.{names[0]}")
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def capture(self, block: nn.Module, names: list[str], want: set[str], max_samples: int = 4096
                ) -> Iterator[dict[str, InputStats]]:
        """Hooks collecting InputStats for the named Linears of `block` while the body runs the block."""
        stats = {n: InputStats(frozenset(want), max_samples=max_samples) for n in names}
        handles = [block.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: stats[n].add(args[0])) for n in names]
        try:
            yield stats
        finally:
            for handle in handles:
                handle.remove()

    def collect(self, block: nn.Module, hidden: torch.Tensor, names: list[str], want: set[str], where: str,
                max_samples: int = 4096) -> dict[str, InputStats]:
        """Run the block once and return the input statistics of `names`; a Linear no token reaches is an error."""
        with self.capture(block, names, want, max_samples) as stats:
            self.run(block, hidden, where)
        for n, s in stats.items():
            if s.tokens == 0:
                raise NetshrinkError("no calibration token reaches this layer", where=f"{where}.{n}",
                                     hint="use more or more varied calibration samples")
        return stats
