"""Quantization-aware training: fake quantization with a straight-through estimator and learned step sizes (LSQ).

Esser et al. 2020, "Learned Step Size Quantization": the forward pass rounds ``clamp(v / s, qmin, qmax)`` and
multiplies back by ``s``; the backward pass treats rounding as identity (the straight-through estimator) and learns
the step size ``s`` too, with its gradient scaled by ``1 / sqrt(numel * qmax)`` so it trains at the pace of the
weights. Weights use one step per output channel (symmetric, signed); each layer input uses one step per tensor
(unsigned when calibration shows it is never negative, e.g. after ReLU).

    qat = prepare_qat(model, QATConfig(weight_bits=4), calibration=x[:256])
    train_qat(qat, (x_train, y_train), epochs=3)            # or your own loop: `qat` is an ordinary nn.Module
    int_model = convert(qat)                                 # Int8Linear / Int8Conv2d running integer kernels
"""
from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.quant.api import (REPORT_ATTR, QuantReport, _set_module, check_finite, check_patterns,
                                 feed_calibration, restored_on_error)
from netshrink.quant.fold import fold_batchnorms
from netshrink.quant.modules import Int8Conv2d, Int8Linear
from netshrink.record import note


@dataclass
class QATConfig:
    """Bit widths (2..8) of weights and activations, and what to leave in float."""

    weight_bits: int = 8
    act_bits: int = 8
    weight_granularity: str = "channel"
    skip: tuple[str, ...] = ()
    fold_bn: bool = True

    def __post_init__(self) -> None:
        for field_name in ("weight_bits", "act_bits"):
            bits = getattr(self, field_name)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise NetshrinkError(f"{field_name}={bits!r} is out of range", where="QATConfig",
                                     hint="QAT converts to the int8 kernels, so use 2 to 8 bits")
        if self.weight_granularity not in ("channel", "tensor"):
            raise NetshrinkError(f"unknown weight granularity {self.weight_granularity!r}",
                                 where="QATConfig.weight_granularity", hint="choose channel or tensor")


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return v + (torch.round(v) - v).detach()


def grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    """Value of `s`, gradient multiplied by `g` (LSQ's step-size gradient scale)."""
    return s * g + (s - s * g).detach()


def lsq_quantize(v: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """LSQ fake quantization: round_ste(clamp(v / s, qmin, qmax)) * s, with the step gradient scaled."""
    g = 1.0 / math.sqrt(max(v.numel() // max(step.numel(), 1), 1) * max(qmax, 1))
    s = grad_scale(step, g)
    return round_ste(torch.clamp(v / s, qmin, qmax)) * s


class _QATLayer(nn.Module):
    """A Linear or Conv2d with fake-quantized weight (per channel) and input (per tensor), steps learned."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, config: QATConfig, name: str) -> None:
        super().__init__()
        self.layer = layer
        self.name = name
        self.weight_bits, self.act_bits = config.weight_bits, config.act_bits
        self.w_qmax = (1 << (config.weight_bits - 1)) - 1
        w = layer.weight.detach()
        if not torch.isfinite(w).all():
            raise NetshrinkError("weight contains NaN or Inf", where=name)
        amax = w.abs().reshape(w.shape[0], -1).amax(1).clamp(min=1e-8)
        if config.weight_granularity == "tensor":
            amax = amax.max().reshape(1)
        self.weight_granularity = config.weight_granularity
        shape = [-1] + [1] * (w.ndim - 1)
        self.weight_step = nn.Parameter((amax / self.w_qmax).reshape(shape))   # starts at the min-max (PTQ) grid
        self.input_step = nn.Parameter(torch.ones(()))
        self.unsigned_input = False
        self.initialised = False

    def init_input(self, lo: float, hi: float) -> None:
        """Start the input step at the min-max grid of the calibrated range [lo, hi]."""
        self.unsigned_input = lo >= 0
        levels = (1 << self.act_bits) - 1 if self.unsigned_input else (1 << (self.act_bits - 1)) - 1
        top = hi if self.unsigned_input else max(abs(lo), abs(hi))
        with torch.no_grad():
            self.input_step.fill_(max(top, 1e-8) / levels)
        self.initialised = True

    def act_range(self) -> tuple[int, int]:
        """Integer range of the input codes."""
        if self.unsigned_input:
            return 0, (1 << self.act_bits) - 1
        return -(1 << (self.act_bits - 1)), (1 << (self.act_bits - 1)) - 1

    def fake_weight(self) -> torch.Tensor:
        return lsq_quantize(self.layer.weight, self.weight_step.abs(), -self.w_qmax, self.w_qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialised:
            raise NetshrinkError("QAT layer has no input range; pass calibration to prepare_qat", where=self.name)
        qmin, qmax = self.act_range()
        xq = lsq_quantize(x, self.input_step.abs(), qmin, qmax)
        if isinstance(self.layer, nn.Linear):
            return F.linear(xq, self.fake_weight(), self.layer.bias)
        return self.layer._conv_forward(xq, self.fake_weight(), self.layer.bias)


def _targets(model: nn.Module, config: QATConfig) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not name or any(fnmatch.fnmatchcase(name, p) for p in config.skip):
            continue
        if type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1
                                         and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
            names.append(name)
    return names


@torch.no_grad()
def prepare_qat(model: nn.Module, config: QATConfig | None = None, calibration: Any = None,
                inplace: bool = False) -> nn.Module:
    """Swap Linear / Conv2d layers for fake-quantized ones with learnable steps, initialised from `calibration`.

    `config.skip` patterns must each select a layer, and the weights and biases are checked for NaN / Inf before
    calibration; a call that fails leaves the input model as it was, also with `inplace=True`."""
    config = config or QATConfig()
    if calibration is None:
        raise NetshrinkError("prepare_qat needs calibration data to start the activation steps", where="prepare_qat",
                             hint="pass a batch or a few batches of training inputs")
    check_patterns(model, "QATConfig", config.skip)
    if not inplace:
        model = copy.deepcopy(model)
    with restored_on_error(model, inplace) as undo:
        model.eval()
        if config.fold_bn:
            fold_batchnorms(model, undo)
        names = _targets(model, config)
        check_finite(model, names)
        lows = {n: math.inf for n in names}
        highs = {n: -math.inf for n in names}

        def hook_for(name: str):
            def hook(_module, args):
                x = args[0]
                if x.numel() == 0:
                    return
                if not torch.isfinite(x).all():
                    raise NetshrinkError("calibration activations contain NaN or Inf at the input of this layer",
                                         where=name)
                lows[name] = min(lows[name], float(x.min()))
                highs[name] = max(highs[name], float(x.max()))
            return hook

        feed_calibration(model, {n: hook_for(n) for n in names}, calibration, where="prepare_qat")
        layers = {}
        for name in names:
            if lows[name] == math.inf:
                raise NetshrinkError("calibration never reached this layer", where=name, hint="add it to skip")
            layers[name] = _QATLayer(model.get_submodule(name), config, name)
            layers[name].init_input(lows[name], highs[name])
    for name, layer in layers.items():                 # swapped only once every layer is ready
        _set_module(model, name, layer)
    return model


def train_qat(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | Iterable, epochs: int = 1,
              lr: float = 1e-4, batch_size: int = 64, loss_fn: Callable = F.cross_entropy,
              train_step: Callable[[nn.Module, Any, torch.optim.Optimizer], torch.Tensor] | None = None,
              seed: int = 0) -> list[float]:
    """A small Adam training loop (works on a QAT-prepared or a float model); returns the mean loss per epoch.

    `data` is ``(x, y)`` tensors (shuffled into `batch_size` batches with `seed`) or an iterable of ``(x, y)``
    batches. `train_step(model, batch, optimizer) -> loss` replaces the built-in step (forward, loss, backward,
    step) when given: the hook for a user's own loop body.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for _ in range(epochs):
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
            x, y = data
            order = torch.randperm(len(x), generator=generator)
            batches = [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(x), batch_size)]
        else:
            batches = data
        losses = []
        for batch in batches:
            if train_step is not None:
                loss = train_step(model, batch, optimizer)
            else:
                inputs, targets = batch
                optimizer.zero_grad()
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                optimizer.step()
            losses.append(float(loss.detach()))
        if not losses:
            raise NetshrinkError("training data is empty", where="train_qat")
        history.append(sum(losses) / len(losses))
    model.eval()
    return history


@torch.no_grad()
def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every QAT layer by an int8 layer holding exactly the learned codes and steps (integer kernels)."""
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    report = QuantReport(config="QAT convert")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _QATLayer)]
    if not layers:
        raise NetshrinkError("no QAT layers found; call prepare_qat first", where="convert")
    for name, qat in layers:
        step_w = qat.weight_step.detach().abs()
        codes = torch.clamp(torch.round(qat.layer.weight / step_w), -qat.w_qmax, qat.w_qmax)
        qmin, qmax = qat.act_range()
        lo, hi = float(qmin) * qat.input_step.abs(), float(qmax) * qat.input_step.abs()
        kind = Int8Linear if isinstance(qat.layer, nn.Linear) else Int8Conv2d
        new = kind(qat.layer, mode="static", input_range=(lo, hi), act_symmetric=True, where=name)
        shift = -128 if qmax > 127 else 0           # unsigned 8-bit codes [0, 255] sit in int8 as u - 128
        new.set_codes(codes, step_w.reshape(-1).expand(codes.shape[0]), qat.input_step.detach().abs(), shift, (qmin + shift, qmax + shift))
        _set_module(model, name, new)
        note(model, name, method="qat", bits=qat.weight_bits, granularity=qat.weight_granularity, group_size=None,
             activations=f"int{qat.act_bits} per tensor, learned step", act_range=(qmin, qmax))
        report.quantized[name] = f"qat w{qat.weight_bits}a{qat.act_bits}"
    object.__setattr__(model, REPORT_ATTR, report)
    return model
