"""Least-squares reconstruction after a structured cut: refit every layer whose inputs were cut.

After heads or neurons go, the layer that consumed them (BERT's attention/FFN output `dense`, Llama's `o_proj` and
`down_proj`, a CNN's first Linear after the convolutions) still has the weights it learnt for the full input.
Following Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for Transformers", mask tuning), each such
layer is refitted on calibration inputs by ridge regression, in forward order, so later layers see the already
refitted earlier ones:

    W', b' = argmin_W,b  sum_tokens || W x_student + b - y ||^2 + ridge * mean(diag(X^T X)) * ||W||^2

`x_student` is the layer's input in the pruned model. The target `y` is, by default, the residual-aware one:
when the layer's output is added to a residual stream that then enters a norm (BERT: the sibling LayerNorm;
Llama: the next input/post-attention norm), y = (the student's output) + (teacher's norm input - student's norm
input), so the refit also absorbs the error that earlier layers left in the residual stream. Without a norm it
is the original layer's output on the original model's input.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity.recovery import _call as call_model
from netshrink.sparsity.recovery import _first_tensor


@dataclass
class Reconstruct:
    """ridge: Tikhonov weight relative to the mean input energy; residual: use the residual-aware target;
    max_batches: use at most this many calibration batches (None: all)."""

    ridge: float = 1e-4
    residual: bool = True
    max_batches: int | None = None
    min_tokens_per_input: float = 4.0  # fewer calibration tokens than this x the layer's inputs: skip (overfits)


@dataclass
class RefitResult:
    """Relative squared error of one refitted layer on its calibration target, before and after the refit."""

    layer: str
    norm: str | None
    tokens: int
    error_before: float
    error_after: float
    skipped: str = ""  # why the layer kept its weights (too few tokens, or no gain on held-out tokens)


class _Stop(Exception):
    """Raised from a hook once everything a pass needs has been captured (saves the rest of the forward)."""


def cut_consumers(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Linear layers of `student` whose input width is smaller than the same-named layer of `teacher`."""
    found = []
    for name, m in student.named_modules():
        if not isinstance(m, nn.Linear) or not name:
            continue
        try:
            t = teacher.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(t, nn.Linear) and m.in_features < t.in_features and m.out_features == t.out_features:
            found.append(name)
    return found


def residual_norm(model: nn.Module, layer: str) -> str | None:
    """The norm whose input is `layer`'s output plus a residual, for BERT- and Llama-style blocks; else None."""
    parent, _, leaf = layer.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if leaf == "dense" and isinstance(getattr(owner, "LayerNorm", None), nn.Module):
        return f"{parent}.LayerNorm" if parent else "LayerNorm"
    match = re.match(r"^(.*\.)?layers\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)$", layer)
    if not match:
        return None
    prefix, index, which = match.group(1) or "", int(match.group(2)), match.group(3)
    names = dict(model.named_modules())
    if which == "self_attn.o_proj":
        name = f"{prefix}layers.{index}.post_attention_layernorm"
        return name if name in names else None
    for name in (f"{prefix}layers.{index + 1}.input_layernorm", f"{prefix}norm"):
        if name in names:
            return name
    return None


def _call(model: nn.Module, batch: Any) -> None:
    try:
        call_model(model, batch)
    except _Stop:
        pass


def _token_mask(batch: Any, rows: int) -> torch.Tensor | None:
    """The attention mask of a text batch as a flat bool vector of `rows` entries (padding rows dropped)."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None and isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        mask = batch[1]
    if mask is None or mask.numel() != rows:
        return None
    if mask.dtype.is_floating_point and not torch.all((mask == 0) | (mask == 1)):
        return None
    return mask.reshape(-1).bool()


def _hook(module: nn.Module, store: dict[str, torch.Tensor], key: str, when: str, stop: bool) -> Any:
    """Capture the module's first input (when='in') or its output (when='out') into store[key]."""
    if when == "in":
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            store[key] = (args[0] if args else next(iter(kwargs.values()))).detach()
            if stop:
                raise _Stop
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_m: nn.Module, _args: tuple, out: Any) -> None:
        store[key] = _first_tensor(out).detach()
        if stop:
            raise _Stop
    return module.register_forward_hook(post)


@torch.no_grad()
def refit_layer(student: nn.Module, teacher: nn.Module, layer: str, batches: list[Any],
                config: Reconstruct) -> RefitResult:
    """Refit one cut Linear of `student` in place (see the module docstring); returns its target errors."""
    lin_s, lin_t = student.get_submodule(layer), teacher.get_submodule(layer)
    norm = residual_norm(student, layer) if config.residual else None
    if norm is not None and norm not in dict(teacher.named_modules()):
        norm = None
    s, t = {}, {}
    hooks = [_hook(lin_s, s, "x", "in", False)]
    if norm is None:
        hooks += [_hook(lin_s, s, "y", "out", True), _hook(lin_t, t, "y", "out", True)]
    else:
        hooks += [_hook(lin_s, s, "y", "out", False), _hook(student.get_submodule(norm), s, "n", "in", True),
                  _hook(teacher.get_submodule(norm), t, "n", "in", True)]
    bias = lin_s.bias is not None
    d_in, d_out = lin_s.in_features, lin_s.out_features
    size = d_in + int(bias)
    # Statistics of two parts: every 5th batch (every 5th token with fewer than 5 batches) is held out to check
    # that the refit generalises; the fit that is applied uses all of them.
    stats = [[torch.zeros(size, size, dtype=torch.float64), torch.zeros(size, d_out, dtype=torch.float64), 0.0]
             for _ in range(2)]
    tokens = 0
    try:
        for index, batch in enumerate(batches):
            s.clear(), t.clear()
            _call(student, batch)
            _call(teacher, batch)
            if "x" not in s or ("n" if norm else "y") not in t:
                raise NetshrinkError("a calibration batch never reached this layer", where=layer)
            x = s["x"].reshape(-1, d_in).double()
            y = (s["y"] + (t["n"] - s["n"]) if norm else t["y"]).reshape(-1, d_out).double()
            keep = _token_mask(batch, x.shape[0])
            if keep is not None:
                x, y = x[keep], y[keep]
            if bias:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
            held = (torch.full((x.shape[0],), index % 5 == 4) if len(batches) >= 5
                    else torch.arange(x.shape[0]) % 5 == 4)
            for part, rows in ((stats[0], ~held), (stats[1], held)):
                xs, ys = x[rows], y[rows]
                part[0] += xs.T @ xs
                part[1] += xs.T @ ys
                part[2] += float(ys.pow(2).sum())
            tokens += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
    gram, cross, energy = stats[0][0] + stats[1][0], stats[0][1] + stats[1][1], stats[0][2] + stats[1][2]
    if not torch.isfinite(gram).all() or not torch.isfinite(cross).all():
        raise NetshrinkError("NaN or Inf in the calibration activations", where=layer)
    if tokens < config.min_tokens_per_input * size:
        why = (f"{tokens} calibration tokens for {size} inputs: a refit would overfit; kept the weights "
               f"(give at least {int(config.min_tokens_per_input * size)} tokens)")
        warnings.warn(f"{layer}: {why}", stacklevel=2)
        return RefitResult(layer, norm, tokens, float("nan"), float("nan"), why)
    old = lin_s.weight.detach().double().T
    if bias:
        old = torch.cat([old, lin_s.bias.detach().double()[None]], 0)

    def error(w: torch.Tensor, g: torch.Tensor, c: torch.Tensor, e: float) -> float:
        """Relative sum ||X w - y||^2, from the sufficient statistics."""
        return float((w * (g @ w)).sum() - 2 * (w * c).sum() + e) / max(e, 1e-30)

    def solve(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        damped = g.clone()
        diag = torch.arange(d_in)
        damped[diag, diag] += config.ridge * float(g.diagonal()[:d_in].mean())
        factor, info = torch.linalg.cholesky_ex(damped)
        return torch.cholesky_solve(c, factor) if int(info) == 0 else torch.linalg.lstsq(damped, c).solution

    check = stats[1]
    if check[2] > 0:
        trial = solve(stats[0][0], stats[0][1])
        held_before, held_after = error(old, *check), error(trial, *check)
        if held_after >= held_before:   # the refit does not generalise to tokens it was not fitted on
            why = (f"the refit raised the error on held-out calibration tokens ({held_before:.4f} -> "
                   f"{held_after:.4f}); kept the weights (give more calibration data)")
            warnings.warn(f"{layer}: {why}", stacklevel=2)
            return RefitResult(layer, norm, tokens, error(old, gram, cross, energy), float("nan"), why)
    solution = solve(gram, cross)
    before, after = error(old, gram, cross, energy), error(solution, gram, cross, energy)
    if after <= before:   # never make a layer worse on its own objective
        lin_s.weight.copy_(solution[:d_in].T.to(lin_s.weight.dtype))
        if bias:
            lin_s.bias.copy_(solution[d_in].to(lin_s.bias.dtype))
    return RefitResult(layer, norm, tokens, before, min(before, after))


def reconstruct_(student: nn.Module, teacher: nn.Module, calibration: Iterable[Any],
                 config: Reconstruct | None = None, layers: list[str] | None = None) -> list[RefitResult]:
    """Refit, in place and in forward order, each Linear of `student` whose inputs were cut (or `layers`)."""
    config = config or Reconstruct()
    batches = list(calibration)[: config.max_batches]
    if not batches:
        raise NetshrinkError("reconstruction needs calibration batches (model inputs, no labels)",
                             where="calibration")
    layers = cut_consumers(student, teacher) if layers is None else layers
    for name in layers:
        if not isinstance(student.get_submodule(name), nn.Linear):
            raise NetshrinkError("only Linear layers can be refitted", where=name)
    order = _execution_order(student, layers, batches[0])
    modes = (student.training, teacher.training)
    student.eval(), teacher.eval()
    try:
        return [refit_layer(student, teacher, name, batches, config) for name in order]
    finally:
        student.train(modes[0]), teacher.train(modes[1])


def _execution_order(model: nn.Module, layers: list[str], batch: Any) -> list[str]:
    seen: list[str] = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, _a, n=n: seen.append(n)) for n in layers]
    try:
        with torch.no_grad():
            _call(model, batch)
    finally:
        for h in hooks:
            h.remove()
    order = list(dict.fromkeys(seen))
    return order + [n for n in layers if n not in order]
