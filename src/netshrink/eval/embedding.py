"""Sentence-embedding quality: fidelity to the original model's embeddings, and agreement with human ratings."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


@torch.inference_mode()
def embed(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """Embeddings [N, hidden] of `texts` (the model maps input_ids, attention_mask to pooled vectors)."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        chunks.append(model(enc["input_ids"], enc["attention_mask"]).float())
    return torch.cat(chunks)


def embedding_fidelity(model: nn.Module, reference: nn.Module | torch.Tensor, tokenizer: Any, sentences: list[str]) -> dict[str, float]:
    """Cosine similarity of each sentence's embedding to the reference model's (1.0 = identical direction)."""
    got = embed(model, tokenizer, sentences)
    want = reference if isinstance(reference, torch.Tensor) else embed(reference, tokenizer, sentences)
    cos = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "sentences": float(len(sentences))}


def human_similarity(model: nn.Module, tokenizer: Any, max_length: int = 256) -> dict[str, float]:
    """Pearson and Spearman correlation of cosine similarities with Lee et al.'s human ratings of 50 news documents."""
    from scipy.stats import pearsonr, spearmanr

    from netshrink.data import similarity_pairs

    docs, human = similarity_pairs()
    vectors = torch.nn.functional.normalize(embed(model, tokenizer, docs, max_length=max_length).double(), dim=-1)
    cosine = (vectors @ vectors.T).numpy()
    upper = np.triu_indices(len(docs), k=1)
    return {
        "pearson": float(pearsonr(cosine[upper], human[upper])[0]),
        "spearman": float(spearmanr(cosine[upper], human[upper])[0]),
        "pairs": float(len(upper[0])),
    }
