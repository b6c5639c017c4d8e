"""Shared fixtures: each real packaged model is loaded once per test session."""
from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def digit_cnn():
    from netshrink import zoo

    return zoo.load("digit-cnn")


@pytest.fixture(scope="session")
def minilm():
    from netshrink import zoo

    return zoo.load("minilm")


@pytest.fixture(scope="session")
def smollm2():
    from netshrink import zoo

    return zoo.load("smollm2")
