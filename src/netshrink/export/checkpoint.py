"""netshrink checkpoints: a folder with `tensors.safetensors` (packed weights) and `manifest.json`.

Saving walks the model once. Every layer a method changed (it is in the layer record, is a netshrink module, or
carries a pruning parametrization) is written through its codec (`netshrink.export.registry`): packed INT4/INT8
codes, scales, zero points, N:M values and indices. Everything else is the plain state dict. Loading never
unpickles: it rebuilds the architecture from the base spec (`netshrink.zoo.load`) or a skeleton the caller
passes, swaps in the decoded layers and assigns the stored tensors, so the loaded model computes bit for bit what
the saved one did.
"""
from __future__ import annotations

import copy
import errno
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.nn.utils import parametrize

from netshrink.atomic import atomic_dir, refuse_existing
from netshrink.errors import NetshrinkError
from netshrink.export.manifest import (DATA_NAME, FORMAT, FORMAT_VERSION, MANIFEST_NAME, jsonable, read_manifest,
                                       sha256_bytes, verified_data)
from netshrink.export.registry import codec_for, codec_named, plain_type
from netshrink.record import RECORD_ATTR

CHUNK = 1 << 24


def _unwrap(model: Any) -> tuple[nn.Module, str | None]:
    """(module, default base spec) for a ZooModel or a bare module."""
    if isinstance(model, nn.Module):
        return model, None
    if hasattr(model, "model") and isinstance(model.model, nn.Module):
        return model.model, getattr(model, "name", None)
    raise NetshrinkError(f"cannot save a {type(model).__name__}; pass an nn.Module or a ZooModel", where="save_checkpoint")


def _needs_codec(name: str, module: nn.Module, record: dict[str, Any]) -> bool:
    cls = plain_type(module)
    netshrink_made = cls.__module__.startswith("netshrink.") and not cls.__module__.startswith("netshrink.zoo")
    pruned_hook = any(hasattr(module, f"{p}_orig") for p, _ in module.named_parameters(recurse=False))
    return netshrink_made or parametrize.is_parametrized(module) or pruned_hook or (
        name in record and codec_for(module) is not None)


def _encoded_modules(model: nn.Module, record: dict[str, Any]) -> dict[str, nn.Module]:
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") or p == "" for p in chosen):
            continue
        if _needs_codec(name, module, record):
            if codec_for(module) is None:
                raise NetshrinkError(f"layer of type {plain_type(module).__name__} cannot be expressed in the netshrink "
                                     f"checkpoint format", where=name or "<model>",
                                     hint="register a Codec for it with netshrink.export.register_codec")
            chosen[name] = module
    return chosen


def _hooks(model: nn.Module) -> dict[str, Any]:
    """The run-time behaviour outside the weights that a checkpoint must restore: netshrink's whole-model cast
    hooks (BF16/FP16 models take and return FP32), torch.compile and the native int8 encoder runtime. Any other
    netshrink hook is refused."""
    from netshrink.quant.native_encoder import uses_native_encoders

    found: dict[str, Any] = {"io_cast": None, "compiled": getattr(model, "_compiled_call_impl", None) is not None,
                             "native_encoders": uses_native_encoders(model)}
    for name, module in model.named_modules():
        for hook in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]:
            qual = getattr(hook, "__qualname__", type(hook).__name__)
            if not getattr(hook, "__module__", "").startswith("netshrink."):
                continue
            if name == "" and qual.startswith("cast_io."):
                dtype = _cast_dtype(hook)
                found["io_cast"] = dtype or found["io_cast"]
                continue
            raise NetshrinkError(f"forward hook {qual} cannot be expressed in the netshrink checkpoint format",
                                 where=name or "<model>")
    return found


def _cast_dtype(hook: Any) -> str | None:
    """The dtype a netshrink `cast_io` pre-hook casts floating inputs to (the post-hook holds none)."""
    for cell in hook.__closure__ or ():
        if isinstance(cell.cell_contents, torch.dtype):
            return str(cell.cell_contents).removeprefix("torch.")
    return None


def _under(key: str, prefixes: dict[str, Any]) -> bool:
    return any(p == "" or key.startswith(p + ".") for p in prefixes)


def _standalone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that each own their whole storage (what safetensors accepts), copying only when needed."""
    owners: dict[int, int] = {}
    for value in tensors.values():
        ptr = value.untyped_storage().data_ptr()
        owners[ptr] = owners.get(ptr, 0) + 1
    out = {}
    for key, value in tensors.items():
        value = value.detach()
        storage = value.untyped_storage()
        whole = value.is_contiguous() and value.numel() * value.element_size() == storage.nbytes()
        out[key] = value if whole and owners[storage.data_ptr()] == 1 else value.clone().contiguous()
    return out


def _write(handle: Any, data: memoryview) -> None:
    """Write one chunk (a seam tests use to simulate a full disk)."""
    handle.write(data)


def save_checkpoint(model: Any, path: str | os.PathLike, base: str | None = None) -> Path:
    """Save `model` (nn.Module or ZooModel) as a netshrink checkpoint folder at `path` (which must not exist).

    `base` is what rebuilds the uncompressed architecture at load time: a zoo name or a Hugging Face folder
    (default: the ZooModel's name). The model itself is not modified.
    """
    module, default_base = _unwrap(model)
    base = base if base is not None else default_base
    path = refuse_existing(path, "checkpoint folder")
    record = getattr(module, RECORD_ATTR, None) or {}
    runtime = _hooks(module)
    encoded = _encoded_modules(module, record)
    tensors: dict[str, torch.Tensor] = {}
    modules_meta: dict[str, Any] = {}
    for name, sub in encoded.items():
        codec = codec_for(sub)
        parts, meta = codec.encode(sub, record.get(name, {}))
        modules_meta[name] = {"codec": codec.name, "meta": jsonable(meta), "tensors": sorted(parts)}
        for key, value in parts.items():
            tensors[f"module/{name}/{key}"] = value
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    state = module.state_dict()
    persistent = set(state)
    extra = {k: v for k, v in module.named_buffers() if k not in persistent and not _under(k, encoded)}
    for prefix, table in (("state", state), ("buffer", extra)):
        for key, value in table.items():
            if prefix == "state" and _under(key, encoded):
                continue
            ident = (value.data_ptr(), value.dtype, tuple(value.shape), tuple(value.stride()))
            if value.numel() and ident in seen:
                aliases[f"{prefix}/{key}"] = seen[ident]
                continue
            seen[ident] = f"{prefix}/{key}"
            tensors[f"{prefix}/{key}"] = value
    blob = st_save(_standalone(tensors), metadata={"format": FORMAT})
    methods = sorted({str(r.get("method")) for r in record.values() if isinstance(r, dict) and r.get("method")})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": base,
        "model_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "methods": methods,
        "layers": jsonable(record),
        "modules": modules_meta,
        "aliases": aliases,
        "runtime": runtime,
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in tensors.items()},
        "data": {"file": DATA_NAME, "bytes": len(blob), "sha256": sha256_bytes(blob)},
    }
    import json

    try:
        with atomic_dir(path) as tmp:
            view = memoryview(blob)
            with open(tmp / DATA_NAME, "wb") as handle:
                for start in range(0, len(view), CHUNK):
                    _write(handle, view[start:start + CHUNK])
                handle.flush()
                os.fsync(handle.fileno())
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    except OSError as exc:
        what = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise NetshrinkError(f"could not write the checkpoint ({what}); nothing was left at the path",
                             where=str(path)) from None
    return path


def _skeleton(manifest: dict[str, Any], model: nn.Module | None, where: str) -> nn.Module:
    if model is not None:
        return copy.deepcopy(model)
    base = manifest.get("base")
    if not base:
        raise NetshrinkError("checkpoint names no base model; pass model= with the uncompressed architecture",
                             where=where)
    from netshrink.zoo import load

    return load(str(base)).model


def _set_module(root: nn.Module, name: str, new: nn.Module, where: str) -> nn.Module:
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:
        raise NetshrinkError(f"checkpoint layer '{name}' does not exist in the base architecture", where=where) from None
    setattr(parent, child, new)
    return root


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a netshrink checkpoint folder: verify it, rebuild the base architecture (or copy `model`), fill it in.

    Refuses a missing, newer-format, truncated or modified checkpoint with a one-line NetshrinkError.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    folder = folder if folder.is_dir() else folder.parent
    where = str(folder)
    tensors = st_load(verified_data(folder, manifest))
    for key, info in manifest["tensors"].items():
        t = tensors.get(key)
        if t is None or list(t.shape) != info.get("shape") or str(t.dtype).removeprefix("torch.") != info.get("dtype"):
            raise NetshrinkError(f"tensor '{key}' does not match the manifest's tensor table", where=where)
    root = _skeleton(manifest, model, where)
    for name, entry in manifest["modules"].items():
        codec = codec_named(str(entry.get("codec")), where)
        parts = {k[len(f"module/{name}/"):]: v for k, v in tensors.items() if k.startswith(f"module/{name}/")}
        try:
            decoded = codec.decode(parts, entry.get("meta", {}))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise NetshrinkError(f"layer '{name}' cannot be rebuilt by codec '{codec.name}' ({exc})", where=where) from None
        root = _set_module(root, name, decoded, where)
    state = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
    buffers = {k[len("buffer/"):]: v for k, v in tensors.items() if k.startswith("buffer/")}
    for alias, target in manifest.get("aliases", {}).items():
        kind, _, key = alias.partition("/")
        (state if kind == "state" else buffers)[key] = tensors[target]
    try:
        result = root.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise NetshrinkError(f"stored tensors do not fit the base architecture: {str(exc).splitlines()[-1].strip()}",
                             where=where) from None
    missing = [k for k in result.missing_keys if not _under(k, manifest["modules"])]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise NetshrinkError(f"checkpoint and base architecture disagree on tensor '{bad}' "
                             f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected)", where=where)
    for key, value in buffers.items():
        owner, _, leaf = key.rpartition(".")
        root.get_submodule(owner)._buffers[leaf] = value
    object.__setattr__(root, RECORD_ATTR, manifest["layers"])
    _restore_runtime(root, manifest.get("runtime") or {}, where)
    return root.eval()


def _restore_runtime(model: nn.Module, runtime: dict[str, Any], where: str) -> None:
    """Re-register the whole-model cast hooks and re-compile, as the saved model ran."""
    if runtime.get("io_cast"):
        from netshrink.quant.api import cast_io

        dtype = getattr(torch, str(runtime["io_cast"]), None)
        if not isinstance(dtype, torch.dtype):
            raise NetshrinkError(f"unknown input cast dtype {runtime['io_cast']!r}", where=where)
        pre, post = cast_io(dtype)
        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(post)
    if runtime.get("compiled"):
        model.compile(options={"freezing": True})
    if runtime.get("native_encoders"):
        from netshrink.quant.native_encoder import native_available, use_native_encoders

        if native_available():
            use_native_encoders(model)
        else:
            warnings.warn(f"{where}: saved with the native int8 encoder runtime, which this machine cannot run "
                          "(needs AVX-512 VNNI + BF16 and a C++ compiler): running the eager int8 layers", stacklevel=3)


def load_checkpoint_entry(path: str | os.PathLike) -> Any:
    """The checkpoint as a ZooModel: the base entry (tokenizer, task, kind) around the loaded compressed model."""
    manifest = read_manifest(Path(path))
    if not manifest.get("base"):
        raise NetshrinkError("checkpoint names no base model, so its tokenizer and task are unknown", where=str(path))
    from netshrink.zoo import load

    entry = load(str(manifest["base"]))
    return entry.with_model(load_checkpoint(path, model=entry.model), name=entry.name)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a netshrink checkpoint folder (has a manifest naming the format)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_NAME).is_file() and f'"{FORMAT}"' in (p / MANIFEST_NAME).read_text(errors="ignore")[:200]
