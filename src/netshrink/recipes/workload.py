"""The data a recipe's stages need, derived from the model's kind and task: calibration inputs for PTQ, training
batches and a loss for fine-tuning and QAT, and text for the LLM methods. A user's own module brings its own."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import NetshrinkError

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class Workload:
    """What the handlers feed a model; each field is None when the model has no such data."""

    kind: str
    tokenizer: Any = None
    example_inputs: tuple | None = None
    calibration: Callable[[int], list[tuple]] | None = None  # n samples -> input tuples, batched
    training: Callable[..., list[Any]] | None = None  # (batch size, limit=None) -> batches that `loss` accepts
    loss: LossFn | None = None
    text: str | None = None  # LLM calibration text
    extra: dict[str, Any] = field(default_factory=dict)

    def need(self, what: str, where: str) -> Any:
        """The named field, or a clear error saying the stage at `where` needs it."""
        value = getattr(self, what)
        if value is None:
            raise NetshrinkError(f"this stage needs {what} data, and none is known for a {self.kind} model",
                                 where=where, hint=f"pass {what}= to netshrink.compress")
        return value


def _batches(tensors: tuple[torch.Tensor, ...], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    n = tensors[0].shape[0]
    return [tuple(t[i:i + batch_size] for t in tensors) for i in range(0, n, batch_size)]


def _image_workload(entry: Any) -> Workload:
    """Digit CNN: calibrate and train on the fixed 'train' split of scikit-learn digits (evaluation uses 'test')."""
    from netshrink import data

    loader = data.fashion_mnist if entry.task == "fashion" else data.digits
    split = "train"

    def calibration(n: int) -> list[tuple]:
        x, _ = loader(split, n=n)
        return _batches((x,), 64)

    def training(batch_size: int, limit: int | None = None) -> list[Any]:
        x, y = loader(split, n=None if loader is data.digits else 10000)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        return _batches((x[perm], y[perm]), batch_size)[:limit]

    def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return Workload(entry.kind, None, entry.example_inputs(batch=2), calibration, training, cross_entropy)


def _encoder_workload(entry: Any) -> Workload:
    """Sentence encoder: real sentences; training distils the original model's embeddings (1 - cosine)."""
    from netshrink import data

    tok = entry.tokenizer
    teacher = copy.deepcopy(entry.model).eval()

    def encode(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def calibration(n: int) -> list[tuple]:
        texts = data.sentences(n)
        return [encode(texts[i:i + 32]) for i in range(0, len(texts), 32)]

    def training(batch_size: int, limit: int | None = None) -> list[Any]:
        texts = data.sentences(None)
        batches = []
        for i in range(0, len(texts), batch_size)[:limit]:  # the teacher embeds only the batches used
            ids, mask = encode(texts[i:i + batch_size])
            with torch.no_grad():
                target = teacher(ids, mask)
            batches.append((ids, mask, target))
        return batches

    def distill(model: nn.Module, batch: Any) -> torch.Tensor:
        ids, mask, target = batch
        return (1.0 - F.cosine_similarity(model(ids, mask), target, dim=-1)).mean()

    return Workload(entry.kind, tok, entry.example_inputs(batch=2, seq_len=32), calibration, training, distill)


def _decoder_workload(entry: Any) -> Workload:
    """Decoder LLM: calibration windows cut from real prose (the same text as the perplexity task's default)."""
    from netshrink import data

    tok = entry.tokenizer

    def calibration(n: int) -> list[tuple]:
        ids = tok(data.prose("lee"), return_tensors="pt").input_ids[0]
        seq = 128
        windows = [ids[i:i + seq] for i in range(0, ids.numel() - seq, seq)][:n]
        return [(torch.stack(windows[i:i + 8]),) for i in range(0, len(windows), 8)]

    return Workload(entry.kind, tok, entry.example_inputs(batch=1, seq_len=32), calibration, None, None,
                    text=data.prose("lee"))


def workload_for(entry: Any | None, kind: str, calibration: Any = None, train_data: Any = None,
                 loss: LossFn | None = None, example_inputs: tuple | None = None) -> Workload:
    """The workload for a ZooModel (from its kind and task), overridden by whatever the caller passes."""
    if entry is not None and kind == "cnn":
        work = _image_workload(entry)
    elif entry is not None and kind == "encoder":
        work = _encoder_workload(entry)
    elif entry is not None and kind == "decoder":
        work = _decoder_workload(entry)
    else:
        work = Workload(kind, getattr(entry, "tokenizer", None))
        if entry is not None and getattr(entry, "input_shape", None) is not None:
            work.example_inputs = entry.example_inputs(batch=2)
    if calibration is not None:
        if isinstance(calibration, str):
            work.text = calibration
        else:
            batches = [b if isinstance(b, tuple) else (b,) for b in calibration]
            work.calibration = lambda n: batches
            if work.example_inputs is None and batches:
                work.example_inputs = batches[0]
    if train_data is not None:
        train = list(train_data)
        work.training = lambda batch_size, limit=None: train[:limit]
    if loss is not None:
        work.loss = loss
    if example_inputs is not None:
        work.example_inputs = example_inputs
    return work
