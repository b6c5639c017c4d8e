"""Datasets are real, deterministic and shaped as documented; each evaluation against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from netshrink import data
from netshrink import eval as evaluation


def test_digits_splits_are_disjoint_stratified_and_deterministic():
    x_train, y_train = data.digits("train")
    x_test, y_test = data.digits("test")
    assert x_train.shape[0] + x_test.shape[0] == 1797
    assert torch.equal(data.digits("test")[1], y_test)
    assert set(y_test.tolist()) == set(range(10))
    flat = {tuple(v.flatten()[::37].tolist()) for v in x_test}
    assert not any(tuple(v.flatten()[::37].tolist()) in flat for v in x_train[:200])


def test_fashion_mnist_test_split():
    x, y = data.fashion_mnist("test", n=1000)
    assert x.shape == (1000, 1, 28, 28) and y.max() == 9
    full_x, full_y = data.fashion_mnist("test")
    assert full_x.shape[0] == 10000 and torch.equal(full_y[:1000], y)


def test_prose_and_similarity_data():
    assert "truth universally acknowledged" in data.prose("austen")
    assert len(data.prose("lee")) > 300_000
    docs, human = data.similarity_pairs()
    assert len(docs) == 50 and human.shape == (50, 50) and np.allclose(np.diag(human), 1.0)
    assert all(len(s.split()) >= 6 for s in data.sentences(50))


def test_wiki_sentences_are_clean_prose():
    wiki = data.wiki_sentences()
    assert len(wiki) > 10_000 and len(set(wiki)) > 0.95 * len(wiki)
    assert wiki[0].startswith("Anarchism is a political philosophy that advocates self-governed societies")
    assert all(6 <= len(s.split()) <= 60 for s in wiki)
    assert not any(mark in s for s in wiki for mark in ("[[", "]]", "{{", "&quot;", "<ref", "''", "#REDIRECT"))


class Constant(nn.Module):
    """A 'classifier' that always predicts class 3."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 10)
        out[:, 3] = 1.0
        return out


def test_accuracy_matches_label_frequency():
    _, y = data.digits()
    assert math.isclose(evaluation.evaluate_digits(Constant())["accuracy"], int((y == 3).sum()) / len(y))


class UniformLM(nn.Module):
    """Every token equally likely: perplexity must equal the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(ids.shape[0], ids.shape[1], self.vocab)


class CharTokenizer:
    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[ord(c) % 50 for c in text]])
        return type("Enc", (), {"input_ids": ids})()


def test_perplexity_of_uniform_model_is_vocab_size_and_counts_each_token_once():
    scores = evaluation.perplexity(UniformLM(50), CharTokenizer(), "x" * 1000, max_length=128, stride=50, max_tokens=None)
    assert math.isclose(scores["perplexity"], 50.0, rel_tol=1e-6)
    assert scores["tokens"] == 999


def test_fidelity_of_a_model_with_itself_is_one(minilm):
    sentences = data.sentences(8)
    scores = evaluation.embedding_fidelity(minilm.model, minilm.model, minilm.tokenizer, sentences)
    assert scores["min_cosine"] > 0.99999


def test_human_similarity_correlation_of_minilm(minilm):
    scores = evaluation.human_similarity(minilm.model, minilm.tokenizer)
    assert scores["pairs"] == 1225
    assert 0.4 < scores["spearman"] < 0.8 and 0.5 < scores["pearson"] < 0.85
