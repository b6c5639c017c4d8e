"""`netshrink.export.export` and the `netshrink export` command."""
from __future__ import annotations

import pytest
import torch

from netshrink.cli import main
from netshrink.errors import NetshrinkError
from netshrink.export.api import export
from netshrink.export.checkpoint import load_checkpoint


def test_export_every_small_format_from_a_zoo_model(digit_cnn, cnn_inputs, tmp_path):
    written = {fmt: export(digit_cnn, fmt, tmp_path / f"cnn.{fmt}") for fmt in ("netshrink", "onnx", "torchscript")}
    assert all(p.exists() for p in written.values())
    with torch.no_grad():
        assert torch.equal(load_checkpoint(written["netshrink"])(*cnn_inputs), digit_cnn.model(*cnn_inputs))
    with pytest.raises(NetshrinkError, match="option 'scheme' does not apply to the torchscript format"):
        export(digit_cnn, "torchscript", tmp_path / "t.pt", scheme="int8")
    with pytest.raises(NetshrinkError, match="unknown export format"):
        export(digit_cnn, "tflite", tmp_path / "t.tflite")


def test_cli_export_from_checkpoint_and_errors(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["export", "digit-cnn", "--format", "netshrink", "--out", str(ck)]) == 0
    out = tmp_path / "from-ck.onnx"
    assert main(["export", str(ck), "--format", "onnx", "--scheme", "int8-dynamic", "--out", str(out)]) == 0
    assert out.exists() and str(out) in capsys.readouterr().out
    assert main(["export", "digit-cnn", "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and str(out) in err
    assert main(["export", "digit-cnn", "--format", "gguf", "--out", str(tmp_path / "c.gguf")]) == 2
    assert "cannot be expressed by this GGUF exporter" in capsys.readouterr().err


def test_cli_quantizes_an_onnx_input(digit_cnn, tmp_path, capsys):
    float_path = tmp_path / "float.onnx"  # stands in for a tf2onnx output
    assert main(["export", "digit-cnn", "--format", "onnx", "--out", str(float_path)]) == 0
    q = tmp_path / "q.onnx"
    assert main(["export", str(float_path), "--format", "onnx", "--scheme", "int8-dynamic", "--out", str(q)]) == 0
    import onnx

    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert "MatMulInteger" in ops and q.stat().st_size < 0.5 * float_path.stat().st_size
