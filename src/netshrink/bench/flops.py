"""Multiply-accumulate counts of one forward pass, by torch's own FLOP counter."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.inference_mode()
def count_flops(model: nn.Module, inputs: tuple) -> dict[str, float]:
    """FLOPs (2 per multiply-add) and MACs of `model(*inputs)`; counts matmuls and convolutions, as is customary."""
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    flops = float(counter.get_total_flops())
    return {"flops": flops, "macs": flops / 2.0, "gflops": flops / 1e9}
