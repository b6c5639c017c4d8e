"""The checkpoint manifest: format version, base model, methods, per-layer record, tensor table and data hash."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from netshrink.errors import NetshrinkError

FORMAT = "netshrink-checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_NAME = "tensors.safetensors"


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of a layer record value (tensors become lists, unknown objects their repr)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return repr(value)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse and version-check the manifest of a checkpoint folder, with one-line errors naming the file."""
    if not folder.exists():
        raise NetshrinkError("checkpoint not found", where=str(folder))
    path = folder / MANIFEST_NAME if folder.is_dir() else folder
    if not path.is_file():
        raise NetshrinkError(f"not a netshrink checkpoint: {MANIFEST_NAME} is missing", where=str(folder))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NetshrinkError(f"manifest is not valid JSON ({exc.__class__.__name__} at {getattr(exc, 'pos', '?')})",
                             where=str(path)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NetshrinkError(f"manifest is not a {FORMAT} manifest", where=str(path))
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise NetshrinkError("manifest has no integer format_version", where=str(path))
    if version > FORMAT_VERSION:
        raise NetshrinkError(f"checkpoint format version {version} is newer than this netshrink reads "
                             f"({FORMAT_VERSION})", where=str(path), hint="upgrade netshrink")
    for key in ("data", "tensors", "modules", "layers"):
        if not isinstance(manifest.get(key), dict):
            raise NetshrinkError(f"manifest lacks its '{key}' table", where=str(path))
    return manifest


def verified_data(folder: Path, manifest: dict[str, Any]) -> bytes:
    """The tensor file's bytes after checking its size and SHA-256 against the manifest (truncation, tampering)."""
    data_info = manifest["data"]
    path = folder / str(data_info.get("file", DATA_NAME))
    if path.parent != folder:
        raise NetshrinkError("manifest names a data file outside the checkpoint folder", where=str(folder))
    if not path.is_file():
        raise NetshrinkError("tensor file is missing", where=str(path))
    size = path.stat().st_size
    if size != data_info.get("bytes"):
        raise NetshrinkError(f"tensor file is {size} bytes but the manifest says {data_info.get('bytes')}: "
                             f"truncated or replaced", where=str(path))
    data = path.read_bytes()
    if sha256_bytes(data) != data_info.get("sha256"):
        raise NetshrinkError("tensor file's SHA-256 does not match the manifest: it was modified or corrupted",
                             where=str(path))
    return data
