"""Export test fixtures: small real inputs of the zoo models (the models themselves come from tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cnn_inputs(digit_cnn):
    return digit_cnn.example_inputs(batch=8)


@pytest.fixture(scope="session")
def minilm_inputs(minilm):
    return minilm.example_inputs(batch=2, seq_len=16)


@pytest.fixture(scope="session")
def smollm2_ids(smollm2):
    return smollm2.example_inputs(batch=1, seq_len=24)[0]


@pytest.fixture(scope="session")
def minilm_int8(minilm):
    """all-MiniLM-L6-v2 with netshrink's dynamic INT8 Linear layers (eager, so outputs are reproducible)."""
    from netshrink.quant import Int8Dynamic, quantize_

    return quantize_(minilm.model, Int8Dynamic(backend="eager"))
