"""Users' own models: a Hugging Face folder, a GGUF, TorchScript or ONNX file, or `module:attribute` plus weights."""
from __future__ import annotations

import importlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.zoo.model import SentenceEncoder, ZooModel


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a plain `torch.save`d state dict, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise NetshrinkError("weights file not found" if not path.exists() else "not a file", where=str(path))
    if path.stat().st_size == 0:
        raise NetshrinkError("weights file is empty", where=str(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise NetshrinkError(f"corrupt or truncated safetensors file ({exc})", where=str(path)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise NetshrinkError(
            "refusing to load: the file is a pickle holding code or objects, not plain weights "
            f"({str(exc).splitlines()[0][:120]})", where=str(path), hint="save a state_dict or use safetensors"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise NetshrinkError(f"corrupt or truncated checkpoint ({str(exc).splitlines()[0][:120]})", where=str(path)) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NetshrinkError("expected a dict of tensors (a state_dict)", where=str(path))
    return state


def load_state_dict(model: nn.Module, path: str | Path) -> None:
    """Load weights into `model`, naming missing/unexpected/mis-shaped tensors on failure."""
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise NetshrinkError(f"weights do not match the architecture: {detail}", where=str(path)) from None


def load_hf_dir(path: Path) -> ZooModel:
    """A local transformers folder: causal LMs load as decoders, encoders as mean-pooled sentence encoders."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise NetshrinkError(f"not a readable Hugging Face model folder ({str(exc).splitlines()[0][:160]})", where=str(path)) from None
    archs = " ".join(getattr(config, "architectures", None) or [])
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        tokenizer = None
    try:
        if "CausalLM" in archs:
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
            return ZooModel(path.name, "decoder", model, tokenizer, task="perplexity", source=str(path))
        backbone = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    except OSError as exc:
        raise NetshrinkError(f"cannot load the model weights ({str(exc).splitlines()[0][:160]})", where=str(path)) from None
    if getattr(config, "is_encoder_decoder", False) or "CausalLM" in archs:
        return ZooModel(path.name, "module", backbone, tokenizer, source=str(path))
    return ZooModel(path.name, "encoder", SentenceEncoder(backbone).eval(), tokenizer, task="similarity", source=str(path))


def load_gguf(path: Path) -> ZooModel:
    """A GGUF decoder (llama.cpp's format), de-quantised to an fp32 transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from netshrink.zoo.builtin import quiet_transformers

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    except Exception as exc:
        raise NetshrinkError(f"cannot load GGUF file ({str(exc).splitlines()[0][:160]})", where=str(path)) from None
    return ZooModel(path.stem, "decoder", model.eval(), tokenizer, task="perplexity", source=str(path))


def load_torchscript(path: Path) -> ZooModel:
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise NetshrinkError(f"not a readable TorchScript file ({str(exc).splitlines()[0][:160]})", where=str(path)) from None
    return ZooModel(path.stem, "module", model.eval(), source=str(path))


class OnnxModule(nn.Module):
    """An ONNX model run by onnxruntime behind the nn.Module call convention, so eval and bench treat it alike."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise NetshrinkError(f"onnxruntime cannot load the model ({str(exc).splitlines()[0][:160]})", where=str(path)) from None
        self.path = path
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        outputs = self.session.run(None, feeds)
        return torch.from_numpy(outputs[0])


def load_onnx(path: Path) -> ZooModel:
    module = OnnxModule(path)
    shape = module.session.get_inputs()[0].shape
    per_sample = tuple(d for d in shape[1:]) if all(isinstance(d, int) for d in shape[1:]) else None
    return ZooModel(path.stem, "onnx", module, source=str(path), input_shape=per_sample)


def load_module_attr(spec: str, weights: str | None) -> ZooModel:
    """`package.module:attribute`: a class or factory returning an nn.Module (or a module instance), plus a weights file."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NetshrinkError(f"cannot import module '{module_name}' ({exc})", where=spec) from None
    target: Any = getattr(module, attr, None)
    if target is None:
        raise NetshrinkError(f"module '{module_name}' has no attribute '{attr}'", where=spec)
    model = target() if not isinstance(target, nn.Module) else target
    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"'{attr}' did not give a torch.nn.Module (got {type(model).__name__})", where=spec)
    if weights:
        load_state_dict(model, weights)
    return ZooModel(spec, "module", model.eval(), source=weights or spec)


def describe_dir(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())[:8]
    return json.dumps(names)
