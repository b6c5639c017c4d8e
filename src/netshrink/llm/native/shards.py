"""How the native decoder splits each block between its threads: Megatron-style tensor parallelism on one CPU.

Thread t owns q heads [h0, h1), the kv heads [j0, j1) they read, and intermediate rows [i0, i1) of the MLP. It
computes its rows of q/k/v and gate/up, its heads' attention, and the product of its columns of o_proj and
down_proj: partial sums of the residual update, which the threads add after meeting. So a block costs two
meetings instead of one per matrix, and each thread streams its weights of a block in two long runs instead of
six short ones; the price is that a kv head shared by two shards' q heads is computed by both.

Column boundaries fall on whole activation blocks (64) and whole weight groups, so each slice is a grid of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from netshrink.llm.native.layout import BLOCK
from netshrink.llm.packing import QuantizedWeight


@dataclass(frozen=True)
class ShardPlan:
    """One thread's share of every block (see the module docstring); empty ranges are allowed."""

    h0: int
    h1: int
    j0: int
    j1: int
    i0: int
    i1: int


def column_unit(cols: int, group_size: int) -> int:
    """The smallest column step a slice of a `cols`-column grid may start at: an activation block, and a whole
    weight group unless the grid is per channel."""
    return BLOCK if group_size >= cols else math.lcm(BLOCK, group_size)


def _split(units: int, threads: int) -> list[tuple[int, int]]:
    return [(t * units // threads, (t + 1) * units // threads) for t in range(threads)]


def plan_shards(heads: int, kv_heads: int, head_dim: int, inter: int, o_group: int, down_group: int,
                threads: int) -> list[ShardPlan]:
    """Contiguous, balanced shares of the q heads and of the intermediate rows, on the boundaries `column_unit`
    allows in o_proj (group size `o_group`) and down_proj (`down_group`)."""
    group = heads // kv_heads
    head_unit = math.lcm(column_unit(heads * head_dim, o_group), head_dim) // head_dim
    inter_unit = column_unit(inter, down_group)
    plans = []
    for (u0, u1), (v0, v1) in zip(_split(-(-heads // head_unit), threads), _split(-(-inter // inter_unit), threads)):
        h0, h1 = min(heads, u0 * head_unit), min(heads, u1 * head_unit)
        j0, j1 = (h0 // group, (h1 - 1) // group + 1) if h1 > h0 else (0, 0)
        plans.append(ShardPlan(h0, h1, j0, j1, min(inter, v0 * inter_unit), min(inter, v1 * inter_unit)))
    return plans


def grid_rows(qw: QuantizedWeight, ranges: list[tuple[int, int]]) -> QuantizedWeight:
    """The grid of the given row ranges, stacked in order."""
    pick = lambda t: torch.cat([t[a:b] for a, b in ranges])  # noqa: E731
    return QuantizedWeight(pick(qw.codes), pick(qw.scales), pick(qw.zeros), qw.bits, qw.group_size)


def grid_columns(qw: QuantizedWeight, c0: int, c1: int) -> QuantizedWeight:
    """Columns [c0, c1) as a grid of their own: per channel, one group of their width; else whole groups."""
    cols, size = qw.shape[1], qw.group_size
    if size >= cols:
        return QuantizedWeight(qw.codes[:, c0:c1], qw.scales[:, :1], qw.zeros[:, :1], qw.bits, c1 - c0)
    if c0 % size:
        raise ValueError(f"column {c0} is inside a group of {size}")
    g0, g1 = c0 // size, -(-c1 // size)
    return QuantizedWeight(qw.codes[:, c0:c1], qw.scales[:, g0:g1], qw.zeros[:, g0:g1], qw.bits, size)
