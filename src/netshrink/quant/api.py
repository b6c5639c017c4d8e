"""`quantize_(model, config, calibration=None, inplace=False)`: post-training quantization with one call.

Steps: check that every `skip` / `overrides` pattern selects a layer, copy the model (unless `inplace`), fold
Conv -> BatchNorm pairs, decide each layer's format (config, per-layer `overrides` by glob pattern, `skip`
patterns), check the weights and biases of those layers for NaN / Inf, calibrate activation ranges when a static
config needs them, swap in the quantized layers, record what happened per layer, and optionally compile the result
in place. Layers that have no quantized kernel are left in float and listed in the report (`quant_report(model)`).
A call that fails leaves the input model as it was, also with `inplace=True` (folds are undone).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.patterns import has_own_params, layer_names, no_match
from netshrink.quant.configs import BF16, CONFIGS, FP8, FP16, Int8Dynamic, Int8Static
from netshrink.quant.fold import fold_batchnorms
from netshrink.quant.modules import CastLayer, FP8Linear, Int8Conv2d, Int8Linear
from netshrink.quant.observers import ObserverSpec
from netshrink.quant.primitives import QScheme
from netshrink.record import note

REPORT_ATTR = "_netshrink_quant_report"
Config = Int8Dynamic | Int8Static | BF16 | FP16 | FP8


@dataclass
class QuantReport:
    """What quantize_ did: the format of each quantized layer, each layer left in float and why, folded convs."""

    config: str
    backend: str = "eager"
    quantized: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per fact."""
        out = [f"config: {self.config}", f"backend: {self.backend}",
               f"quantized layers: {len(self.quantized)}", f"layers left in float: {len(self.skipped)}"]
        out += [f"  {name}: {why}" for name, why in self.skipped.items()]
        if self.folded:
            out.append(f"BatchNorm folded into: {', '.join(self.folded)}")
        return out


def quant_report(model: nn.Module) -> QuantReport | None:
    """The QuantReport quantize_ attached to `model` (None if it was not quantized by netshrink)."""
    return getattr(model, REPORT_ATTR, None)


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def _layer_config(name: str, config: Config) -> tuple[Config | None, str | None]:
    """The config that applies to layer `name` (None: keep float) and, when kept float, why."""
    pattern = _matches(name, config.overrides)
    if pattern is not None:
        chosen = config.overrides[pattern]
        if chosen is None:
            return None, f"kept in float by override {pattern!r}"
        if not isinstance(chosen, CONFIGS):
            raise NetshrinkError(f"override for {pattern!r} is not a quantization config: {chosen!r}",
                                 where="config.overrides")
        return chosen, None
    pattern = _matches(name, config.skip)
    if pattern is not None:
        return None, f"skipped by pattern {pattern!r}"
    return config, None


def check_patterns(model: nn.Module, label: str, skip: Iterable[str], overrides: Iterable[str] = ()) -> None:
    """Every `skip` / `overrides` pattern of a config must select at least one layer of `model`, by the rule that
    applies them (fnmatch on `layer_names`); a typo would otherwise silently do nothing. `label` names the config
    in the error, e.g. ``Int8Dynamic.skip[0]`` or ``Int8Static.overrides['*.fc']``."""
    names = layer_names(model)
    fields = [(f"{label}.skip[{i}]", pattern) for i, pattern in enumerate(skip)]
    fields += [(f"{label}.overrides[{pattern!r}]", pattern) for pattern in overrides]
    for where, pattern in fields:
        if not isinstance(pattern, str):
            raise NetshrinkError(f"pattern {pattern!r} is not a string", where=where,
                                 hint="patterns are module-name globs such as '*.classifier'")
        if not _matches_any(pattern, names):
            raise no_match(pattern, names, where)


def _matches_any(pattern: str, names: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in names)


def check_finite(model: nn.Module, layers: Iterable[str], whole_model_except: Collection[str] | None = None) -> None:
    """NaN / Inf in a parameter (weight, bias, ...) of a layer about to be quantized is an error naming that layer.

    Run before calibration, which would otherwise report it as bad activations at the input of a later layer.
    `layers` are checked with all their parameters; with `whole_model_except` (a whole-model cast), every other layer
    with its own parameters is checked too, except those names and the layers inside them."""
    layers = set(layers)
    inside = tuple(f"{name}." for name in (*layers, *(whole_model_except or ())))
    for name, module in model.named_modules():
        if name in layers:
            params = module.named_parameters()
        elif whole_model_except is not None and name and name not in whole_model_except \
                and not name.startswith(inside):
            params = module.named_parameters(recurse=False)
        else:
            continue
        for param_name, param in params:
            if not torch.isfinite(param.detach()).all():
                raise NetshrinkError(f"{param_name} contains NaN or Inf", where=name,
                                     hint="fix or retrain the layer first")


def _plan(model: nn.Module, config: Config) -> tuple[dict[str, Config], dict[str, str]]:
    """Decide per layer: {name: config} for layers to quantize, {name: reason} for layers left in float."""
    todo: dict[str, Config] = {}
    skipped: dict[str, str] = {}
    whole_model_cast = isinstance(config, (BF16, FP16))
    for name, module in model.named_modules():
        if not name or not has_own_params(module):
            continue
        if any(name.startswith(done + ".") for done in todo):
            continue
        chosen, why = _layer_config(name, config)
        if chosen is None:
            skipped[name] = why
            continue
        if isinstance(chosen, (Int8Dynamic, Int8Static)):
            if type(module) is nn.Linear:
                todo[name] = chosen
            elif type(module) is nn.Conv2d:
                if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                    skipped[name] = "no int8 kernel for grouped, non-zero-padded or 'same'-padded Conv2d"
                else:
                    todo[name] = chosen
            else:
                skipped[name] = f"no int8 kernel for {type(module).__name__}; kept in float"
        elif isinstance(chosen, FP8):
            if type(module) is nn.Linear:
                todo[name] = chosen
            else:
                skipped[name] = f"FP8 weight storage covers nn.Linear only, not {type(module).__name__}"
        elif chosen is not config or not whole_model_cast:
            todo[name] = chosen                                      # a per-layer BF16 / FP16 override
    return todo, skipped


def _batches(calibration: Any) -> Iterable[Any]:
    """A tensor or a tuple of tensors is one batch; a list or any other iterable yields batches."""
    if isinstance(calibration, (torch.Tensor, tuple, dict)):
        return [calibration]
    return calibration


def _is_empty(batch: Any) -> bool:
    """A batch whose tensors all have no elements (e.g. ``torch.empty(0, 8)``): running it would observe nothing."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else (batch,)
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    return bool(tensors) and all(t.numel() == 0 for t in tensors)


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def feed_calibration(model: nn.Module, pre_hooks: dict[str, Callable], calibration: Any, where: str) -> None:
    """Run every calibration batch through `model` with forward pre-hooks on the named layers (removed after).

    Batches with no rows are left out; an empty calibration set (none left) is an error, since nothing would have
    been observed."""
    handles = [model.get_submodule(name).register_forward_pre_hook(hook) for name, hook in pre_hooks.items()]
    seen = empty = 0
    try:
        for batch in _batches(calibration):
            if _is_empty(batch):
                empty += 1
                continue
            _run(model, batch)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        what = "the calibration set is empty"
        if empty:
            what += ": its one batch has 0 rows" if empty == 1 else f": all {empty} batches have 0 rows"
        raise NetshrinkError(what, where=where, hint="pass at least one batch of real inputs")


def calibrate(model: nn.Module, layers: dict[str, Int8Static], calibration: Any) -> dict[str, tuple]:
    """Run `calibration` batches through `model` and return each layer's observed input range (min, max)."""
    if calibration is None:
        raise NetshrinkError("static quantization needs calibration data", where="quantize_",
                             hint="pass calibration=[batch, ...] (a few hundred real samples)")
    observers = {name: ObserverSpec(cfg.observer, percentile=cfg.percentile).build(QScheme(), name)
                 for name, cfg in layers.items()}

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0]
            if not torch.isfinite(x).all():
                raise NetshrinkError("calibration activations contain NaN or Inf at the input of this layer",
                                     where=name, hint="check the calibration data and the layers before it")
            observers[name].update(x)
        return hook

    feed_calibration(model, {name: hook_for(name) for name in layers}, calibration, where="quantize_")
    ranges = {}
    for name, obs in observers.items():
        if obs.batches == 0:
            raise NetshrinkError("calibration never reached this layer, so it has no activation range",
                                 where=name, hint="skip it or use Int8Dynamic for it")
        ranges[name] = obs.min_max()
    return ranges


def _cpu_has_fast_fp16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_fp16" in flags or "amx_fp16" in flags


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def cast_io(dtype: torch.dtype):
    """Root hooks for a whole-model cast: floating inputs cast to `dtype`, floating outputs back to FP32."""

    def cast(value: Any, to: torch.dtype) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(to)
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(cast(v, to) for v in value)
        if isinstance(value, list):
            return [cast(v, to) for v in value]
        return value

    def pre(_module, args, kwargs):
        return cast(args, dtype), {k: cast(v, dtype) for k, v in kwargs.items()}

    def post(_module, _args, output):
        if hasattr(output, "to_tuple") and hasattr(output, "keys"):      # transformers ModelOutput
            for key in list(output.keys()):
                output[key] = cast(output[key], torch.float32)
            return output
        return cast(output, torch.float32)

    return pre, post


def _build(name: str, module: nn.Module, cfg: Config, ranges: dict[str, tuple]) -> tuple[nn.Module, dict]:
    """The replacement layer for `module` under `cfg`, and the fields recorded for it."""
    if isinstance(cfg, (Int8Dynamic, Int8Static)):
        static = isinstance(cfg, Int8Static)
        kind = Int8Linear if isinstance(module, nn.Linear) else Int8Conv2d
        new = kind(module, mode="static" if static else "dynamic", per_channel=cfg.per_channel,
                   input_range=ranges.get(name), act_symmetric=getattr(cfg, "act_symmetric", True), where=name)
        fields = dict(method="int8_static" if static else "int8_dynamic", bits=8,
                      granularity="channel" if cfg.per_channel else "tensor", group_size=None,
                      activations=f"int8 per tensor, {cfg.observer} calibration" if static
                      else "int8 per token, dynamic")
        return new, fields
    if isinstance(cfg, FP8):
        compute = torch.bfloat16 if cfg.compute == "bf16" else torch.float32
        return FP8Linear(module, cfg.fmt, compute, where=name), dict(method="fp8", bits=8, format=cfg.fmt,
                                                                      granularity="channel", group_size=None)
    dtype = torch.bfloat16 if isinstance(cfg, BF16) else torch.float16
    return CastLayer(module, dtype), dict(method="bf16" if dtype == torch.bfloat16 else "fp16", bits=16)


def _use_native(model: nn.Module, config: Config, required: bool) -> bool:
    """Route the model's BERT-style encoders through NativeEncoder; False (or, if required, an error) when it cannot."""
    from netshrink.quant.native_encoder import bert_style_encoders, native_available, use_native_encoders

    if not isinstance(config, Int8Dynamic):
        if required:
            raise NetshrinkError(f"the native backend runs Int8Dynamic models only, not {type(config).__name__}",
                                 where="config.backend", hint='use backend="compile" or "eager"')
        return False
    if not bert_style_encoders(model):
        if required:
            raise NetshrinkError("no BERT-style encoder (an *Encoder module with a .layer list) in this model",
                                 where="config.backend", hint='use backend="compile" or "eager"')
        return False
    if not native_available():
        if required:
            from netshrink.quant.native_encoder import load_library

            load_library()  # raises the reason: a missing CPU feature or a failed build
        return False
    try:
        use_native_encoders(model)
    except NetshrinkError:
        if required:
            raise
        return False
    return True


def _is_transformers(model: nn.Module) -> bool:
    return any(hasattr(m, "config") and hasattr(m, "set_attn_implementation") for m in model.modules())


@contextlib.contextmanager
def restored_on_error(model: nn.Module, inplace: bool) -> Iterator[list[Callable[[], None]] | None]:
    """For an in-place call: if the block raises, undo what it did to `model` before the error propagates (the
    BatchNorm folds registered in the yielded undo list, and the train / eval mode of every module). A copy needs
    no undo, so None is yielded then."""
    if not inplace:
        yield None
        return
    undo: list[Callable[[], None]] = []
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield undo
    except BaseException:
        for restore in reversed(undo):
            restore()
        for module, training in modes:
            module.training = training
        raise


def quantize_(model: nn.Module, config: Config, calibration: Any = None, inplace: bool = False) -> nn.Module:
    """Quantize `model` as `config` says and return it (a copy unless `inplace=True`).

    `calibration` (needed by Int8Static): a batch (tensor, tuple of tensors, or dict of keyword tensors) or a list
    / iterable of batches, fed to `model` as ``model(*batch)``.
    """
    if not isinstance(config, CONFIGS):
        raise NetshrinkError(f"not a quantization config: {config!r}", where="quantize_",
                             hint="use Int8Dynamic(), Int8Static(), BF16(), FP16() or FP8()")
    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"expected a torch.nn.Module, got {type(model).__name__}", where="quantize_")
    if quant_report(model) is not None:
        raise NetshrinkError("this model is already quantized by netshrink", where="quantize_",
                             hint="quantize the original float model")
    check_patterns(model, type(config).__name__, config.skip, config.overrides)
    if not inplace:
        model = copy.deepcopy(model)
    report = QuantReport(config=repr(config))
    with restored_on_error(model, inplace) as undo:
        model.eval()
        if config.fold_bn:
            report.folded = fold_batchnorms(model, undo)
        todo, skipped = _plan(model, config)
        check_finite(model, todo, skipped if isinstance(config, (BF16, FP16)) else None)
        static = {name: cfg for name, cfg in todo.items() if isinstance(cfg, Int8Static)}
        ranges = calibrate(model, static, calibration) if static else {}
        # BF16 / FP16 layers are cast in place, so they are built after every layer whose build could still fail
        order = sorted(todo, key=lambda name: isinstance(todo[name], (BF16, FP16)))
        made = {name: _build(name, model.get_submodule(name), todo[name], ranges) for name in order}
        built = {name: made[name] for name in todo}
    report.skipped.update(skipped)
    for name in report.folded:
        note(model, name, batchnorm_folded=True)

    if isinstance(config, (BF16, FP16)):
        dtype = torch.bfloat16 if isinstance(config, BF16) else torch.float16
        kept = {name: model.get_submodule(name) for name in skipped}
        model.to(dtype)
        for name, module in kept.items():                        # skipped layers stay FP32 behind casts
            _set_module(model, name, CastLayer(module.float(), torch.float32))
        pre, post = cast_io(dtype)
        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(post)
        label = "bf16" if dtype == torch.bfloat16 else "fp16"
        for name, module in model.named_modules():
            if name and name not in todo and name not in skipped and has_own_params(module) \
                    and not isinstance(module, CastLayer):
                note(model, name, method=label, bits=16)
                report.quantized[name] = label
    for name, (new, fields) in built.items():
        _set_module(model, name, new)
        note(model, name, **fields)
        report.quantized[name] = fields["method"]

    if isinstance(config, FP16) and not _cpu_has_fast_fp16():
        warnings.warn("this CPU has no fast FP16 arithmetic (no AVX-512 FP16 / AMX-FP16): FP16 layers are converted "
                      "and run slowly; use BF16() for speed", stacklevel=2)
    backend = config.backend
    if backend == "native":
        _use_native(model, config, required=True)
    elif backend == "auto" and isinstance(config, Int8Dynamic) and _is_transformers(model) \
            and _use_native(model, config, required=False):
        backend = "native"
    if backend == "auto":
        backend = "compile" if _is_transformers(model) and not isinstance(config, FP16) else "eager"
    if isinstance(config, Int8Dynamic) and (config.attention == "bf16"
                                            or (config.attention == "auto" and backend == "compile")):
        from netshrink.quant.attention import use_bf16_attention

        use_bf16_attention(model)
    if backend == "compile" and isinstance(config, Int8Dynamic) and config.fold_gelu:
        from netshrink.quant.ffn import fold_gelu_into_int8

        fold_gelu_into_int8(model)
    if backend == "compile":
        # torch.compile keys its cache on the forward's code object, which every model of one class shares: a few
        # quantized variants in one process (the demo, a sweep) each add their own entries, and the default limit
        # of 8 then silently sends the later ones back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        model.compile(options={"freezing": True})
    report.backend = backend
    object.__setattr__(model, REPORT_ATTR, report)
    return model
