"""Layer codecs: how each compressed module type is written as plain tensors and rebuilt without unpickling.

A checkpoint stores, for every layer a method changed, the name of its codec, a small JSON `meta` and a few
tensors. Loading looks the codec up by that name (an allowlist: nothing else is ever imported or constructed),
builds an empty module from `meta` and fills it from the tensors. New module types plug in with
`register_codec(Codec(...))`, next to the module they describe or in `netshrink.export.codecs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from netshrink.errors import NetshrinkError

Tensors = dict[str, torch.Tensor]
Encode = Callable[[nn.Module, dict[str, Any]], tuple[Tensors, dict[str, Any]]]
Decode = Callable[[Tensors, dict[str, Any]], nn.Module]


@dataclass(frozen=True)
class Codec:
    """`encode(module, layer_record) -> (tensors, meta)` and `decode(tensors, meta) -> module`, exact round trip."""

    name: str
    types: tuple[type, ...]
    encode: Encode
    decode: Decode


_BY_NAME: dict[str, Codec] = {}
_BY_TYPE: dict[type, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    """Add a codec (a later registration for the same name or type replaces the earlier one)."""
    _BY_NAME[codec.name] = codec
    for t in codec.types:
        _BY_TYPE[t] = codec
    return codec


def plain_type(module: nn.Module) -> type:
    """The module's own class, seeing through torch's parametrization subclass (e.g. a pruning mask)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls


def codec_for(module: nn.Module) -> Codec | None:
    """The codec registered for exactly this module class (subclasses may compute differently, so no isinstance)."""
    _load_builtin()
    return _BY_TYPE.get(plain_type(module))


def codec_named(name: str, where: str) -> Codec:
    """The codec a checkpoint names, refusing any name not registered (a checkpoint cannot make us import code)."""
    _load_builtin()
    if name not in _BY_NAME:
        raise NetshrinkError(f"checkpoint uses layer codec '{name}', which this netshrink does not know", where=where,
                             hint=f"known codecs: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]


def registered() -> list[str]:
    """Names of all registered codecs."""
    _load_builtin()
    return sorted(_BY_NAME)


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from netshrink.export import codecs  # noqa: F401  (registers the built-in codecs on import)
