"""The model zoo: built-in models that ship in packages, and loaders for users' own models."""
from __future__ import annotations

import difflib
from pathlib import Path

from netshrink.errors import NetshrinkError
from netshrink.zoo.builtin import ALIASES, BUILTIN, DigitCNN, quiet_transformers
from netshrink.zoo.model import SentenceEncoder, ZooModel

__all__ = ["load", "ZooModel", "SentenceEncoder", "DigitCNN", "BUILTIN"]


def load(spec: str, weights: str | None = None) -> ZooModel:
    """Load a built-in name (minilm, smollm2, digit-cnn), a netshrink checkpoint or HF folder, a .gguf/.pt/.ts/.onnx
    file, or module:attr."""
    from netshrink.zoo import user

    quiet_transformers()
    name = ALIASES.get(spec.lower(), spec.lower())
    if name in BUILTIN and not Path(spec).exists():
        return BUILTIN[name]()
    path = Path(spec)
    if path.is_dir():
        from netshrink.export.checkpoint import is_checkpoint, load_checkpoint_entry

        if is_checkpoint(path):
            return load_checkpoint_entry(path)
        if not (path / "config.json").exists():
            raise NetshrinkError("folder has no config.json, so it is not a Hugging Face model folder", where=spec)
        return user.load_hf_dir(path)
    if path.exists():
        if not path.is_file():
            raise NetshrinkError("not a regular file", where=spec)
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return user.load_gguf(path)
        if suffix == ".onnx":
            return user.load_onnx(path)
        if suffix in (".pt", ".ts", ".pth", ".jit"):
            return user.load_torchscript(path)
        raise NetshrinkError(f"unknown model file type '{suffix}' (.gguf, .onnx, .pt/.ts TorchScript)", where=spec)
    if ":" in spec and not spec.startswith((".", "/")):
        return user.load_module_attr(spec, weights)
    close = difflib.get_close_matches(name, list(BUILTIN) + list(ALIASES), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"built-in models: {', '.join(BUILTIN)}"
    raise NetshrinkError("unknown model: not a built-in name, an existing path, or module:attribute", where=spec, hint=hint)
