"""Image classification data: scikit-learn's digits as the digit CNN expects them, and Fashion-MNIST."""
from __future__ import annotations

import gzip
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from netshrink.data.paths import FASHION_MNIST_DIR, require
from netshrink.errors import NetshrinkError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
Split = Literal["all", "train", "test"]


def _take(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if n is not None:
        if n <= 0:
            raise NetshrinkError(f"sample size must be positive, got {n}", where="n")
        x, y = x[:n], y[:n]
    return x.contiguous(), y.contiguous()


def digits_to_mnist(images: np.ndarray) -> torch.Tensor:
    """8x8 digits (values 0..16) -> [N,1,28,28] MNIST-normalised: pad 2 pixels each side, bicubic resize to 28x28."""
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.pad(x, (2, 2, 2, 2))
    x = F.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return (x - MNIST_MEAN) / MNIST_STD


def digits(split: Split = "all", n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits; 'train'/'test' is a fixed stratified 70/30 split (same for every run)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x, y = digits_to_mnist(bunch.images), torch.tensor(bunch.target, dtype=torch.int64)
    if split != "all":
        if split not in ("train", "test"):
            raise NetshrinkError(f"unknown split '{split}' (all, train, test)", where="split")
        idx_train, idx_test = train_test_split(
            np.arange(len(y)), test_size=0.3, random_state=seed, stratify=bunch.target
        )
        idx = torch.tensor(idx_train if split == "train" else idx_test)
        x, y = x[idx], y[idx]
    return _take(x, y, n)


def _read_idx(path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): magic, dims, then unsigned bytes."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise NetshrinkError("truncated IDX file", where=str(path))
    return array.reshape(dims)


def fashion_mnist(split: Literal["train", "test"] = "test", n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from Debian's dataset-fashion-mnist: [N,1,28,28] in [0,1] standardised, labels 0..9."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise NetshrinkError(f"unknown split '{split}' (train, test)", where="split")
    hint = "apt-get install dataset-fashion-mnist"
    images = _read_idx(require(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", hint))
    labels = _read_idx(require(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz", hint))
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    x = (x - 0.2860) / 0.3530
    return _take(x, torch.tensor(labels, dtype=torch.int64), n)
