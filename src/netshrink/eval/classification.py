"""Top-1 accuracy of an image classifier on real labelled images."""
from __future__ import annotations

import torch
from torch import nn

from netshrink.errors import NetshrinkError


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Fraction of samples whose arg-max logit equals the label."""
    if x.shape[0] != y.shape[0]:
        raise NetshrinkError(f"{x.shape[0]} images but {y.shape[0]} labels", where="accuracy")
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(-1) == y[start : start + batch_size]).sum())
    return {"accuracy": correct / max(1, x.shape[0]), "samples": float(x.shape[0])}


def evaluate_digits(model: nn.Module, n: int | None = None, split: str = "all") -> dict[str, float]:
    """Accuracy on scikit-learn's digits, prepared as the digit CNN expects (28x28, MNIST normalisation)."""
    from netshrink.data import digits

    x, y = digits(split=split, n=n)
    return accuracy(model, x, y)


def evaluate_fashion(model: nn.Module, n: int | None = None) -> dict[str, float]:
    """Accuracy on Fashion-MNIST's test split."""
    from netshrink.data import fashion_mnist

    x, y = fashion_mnist("test", n=n)
    return accuracy(model, x, y)
