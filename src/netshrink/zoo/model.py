"""ZooModel: a loaded model plus what netshrink needs to feed, evaluate and describe it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netshrink.errors import NetshrinkError


class SentenceEncoder(nn.Module):
    """A transformers encoder with mean pooling and L2 normalisation, as sentence-transformers runs all-MiniLM-L6-v2."""

    def __init__(self, backbone: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = pooled.float()
        return nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


@dataclass
class ZooModel:
    """A model ready for netshrink: fp32, eval mode, CPU, with its tokenizer and default evaluation task."""

    name: str
    kind: str  # "cnn" | "encoder" | "decoder" | "onnx" | "module"
    model: nn.Module
    tokenizer: Any | None = None
    task: str = "none"  # "digits" | "fashion" | "similarity" | "perplexity" | "none"
    source: str = ""
    input_shape: tuple[int, ...] | None = None  # per-sample shape for image models
    extra: dict[str, Any] = field(default_factory=dict)

    def with_model(self, model: nn.Module, name: str | None = None) -> "ZooModel":
        """The same entry around another (e.g. compressed) module."""
        return ZooModel(name or self.name, self.kind, model, self.tokenizer, self.task, self.source, self.input_shape, dict(self.extra))

    def example_inputs(self, batch: int = 1, seq_len: int = 128) -> tuple[torch.Tensor, ...]:
        """Real inputs of the given batch size: digits images, or real sentences tokenised to exactly seq_len tokens."""
        from netshrink import data

        if self.kind == "cnn" or (self.input_shape is not None and self.tokenizer is None):
            if self.input_shape in (None, (1, 28, 28)):
                x, _ = data.digits(n=min(batch, 1797))
                reps = -(-batch // x.shape[0])
                return (x.repeat(reps, 1, 1, 1)[:batch],)
            return (torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(0)),)
        if self.tokenizer is None:
            raise NetshrinkError("no tokenizer or input shape known; pass inputs explicitly", where=self.name)
        if self.kind == "decoder":
            ids = self.tokenizer(data.prose("lee"), return_tensors="pt").input_ids[0]
            need = batch * seq_len
            ids = ids.repeat(-(-need // ids.numel()))[:need]
            return (ids.view(batch, seq_len),)
        text = " ".join(data.sentences(400))
        enc = self.tokenizer([text] * batch, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        # Shift each row so the batch is not 32 copies of one sequence.
        ids = enc["input_ids"].clone()
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        for row in range(batch):
            start = (row * 37) % max(1, len(body) - seq_len)
            ids[row, 1 : seq_len - 1] = torch.tensor(body[start : start + seq_len - 2])
        return ids, enc["attention_mask"]
