"""TorchScript: quantized and pruned CNNs and encoders traced, saved, reloaded and compared with the live model."""
from __future__ import annotations

import torch
import pytest

from netshrink.errors import NetshrinkError
from netshrink.export.torchscript import export_torchscript
from netshrink.quant import Int8Static, quantize_

from export_fixtures import compressed_cnn


def test_pruned_and_int8_cnn(digit_cnn, cnn_inputs, tmp_path):
    model = quantize_(compressed_cnn(digit_cnn.model), Int8Static(), calibration=[cnn_inputs])
    result = export_torchscript(digit_cnn.with_model(model), tmp_path / "cnn.pt")
    assert result.identical and result.max_abs_diff == 0.0
    loaded = torch.jit.load(str(result.path))
    x, = digit_cnn.example_inputs(batch=3)  # a batch size the trace did not see
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_int8_encoder(minilm, minilm_int8, tmp_path):
    result = export_torchscript(minilm.with_model(minilm_int8), tmp_path / "enc.pt")
    assert result.identical
    # int8 codes (held twice: as stored and in the kernel layout) instead of FP32 Linear weights
    assert result.size_bytes < 0.8 * sum(p.numel() * 4 for p in minilm.model.parameters())


def test_refuses_existing_and_untraceable(digit_cnn, tmp_path):
    out = tmp_path / "x.pt"
    out.write_text("mine")
    with pytest.raises(NetshrinkError, match="already exists"):
        export_torchscript(digit_cnn, out)
    assert out.read_text() == "mine"

    class Dicty(torch.nn.Module):
        def forward(self, x):
            return {"a": x.tolist()}  # python lists of floats: not a traceable output

    with pytest.raises(NetshrinkError, match="cannot be expressed in TorchScript"):
        export_torchscript(Dicty(), tmp_path / "d.pt", example_inputs=(torch.ones(2),))
    assert not (tmp_path / "d.pt").exists()
