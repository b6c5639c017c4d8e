"""ONNX export: every scheme runs in onnxruntime and matches PyTorch within its tolerance; PTQ of ONNX files."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.export.onnx import export_onnx, quantize_onnx, session
from netshrink.export.onnx_graph import int4_grid, nbits_tensors
from netshrink.quant import Int8Static, quantize_

from export_fixtures import compressed_cnn, pack_layers

# Minimum cosine to the PyTorch output, per scheme (the export itself also refuses anything below MIN_COSINE).
TOLERANCE = {"fp32": 0.999999, "bf16": 0.9999, "int8-dynamic": 0.99, "int8-static": 0.99, "int4": 0.97}


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("scheme", ["fp32", "bf16", "int8-dynamic", "int8-static", "int4"])
def test_digit_cnn_every_scheme(scheme, digit_cnn, tmp_path):
    model = compressed_cnn(digit_cnn.model)
    result = export_onnx(digit_cnn.with_model(model), tmp_path / f"{scheme}.onnx", scheme=scheme)
    assert result.cosine >= TOLERANCE[scheme]
    x, = digit_cnn.example_inputs(batch=5)  # another batch size than traced: the batch axis is dynamic
    got = session(str(result.path)).run(None, {"input_0": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.8
    ops = _ops(result.path)
    expected = {"fp32": "Gemm", "bf16": "Cast", "int8-dynamic": "MatMulInteger", "int8-static": "QuantizeLinear",
                "int4": "MatMulNBits"}[scheme]
    assert expected in ops
    if scheme == "fp32":
        assert result.max_abs_diff < 1e-4
    if scheme == "int4":
        assert set(result.kept_float) == {"/conv_layers/conv_layers.0/Conv", "/conv_layers/conv_layers.3/Conv",
                                          "/conv_layers/conv_layers.6/Conv"}


@pytest.mark.parametrize("scheme", ["fp32", "int4"])  # int8 on MiniLM: test_minilm_int8_model_exports_its_own_codes
def test_minilm_schemes_and_sizes(scheme, minilm, tmp_path):
    result = export_onnx(minilm, tmp_path / "m.onnx", scheme=scheme)
    assert result.cosine >= TOLERANCE[scheme]
    sizes = {"fp32": (85e6, 95e6), "int8-dynamic": (20e6, 26e6), "int4": (15e6, 22e6)}[scheme]
    assert sizes[0] < result.size_bytes < sizes[1]  # int8/int4 Linear weights and an int8 embedding table
    ids, mask = minilm.example_inputs(batch=3, seq_len=9)  # other batch and sequence length than traced
    got = session(str(result.path)).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = minilm.model(ids, mask).numpy()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= TOLERANCE[scheme] - 0.01


def test_netshrink_int8_grids_are_exported_exactly(digit_cnn, cnn_inputs, tmp_path):
    model = quantize_(digit_cnn.model, Int8Static(), calibration=[cnn_inputs])
    result = export_onnx(digit_cnn.with_model(model), tmp_path / "s.onnx", scheme="int8-static")
    graph = onnx.load(str(result.path)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    codes = model.fc_layers[0].weight_int8.numpy()
    assert any(v.dtype == np.int8 and v.shape == codes.shape and np.array_equal(v, codes) for v in inits.values())
    scale = float(model.fc_layers[0].input_scale)
    assert any(v.shape == () and v.dtype == np.float32 and float(v) == scale for v in inits.values())
    assert result.max_abs_diff < 0.05  # same integer grids and activation ranges as the PyTorch int8 kernels


def test_minilm_int8_model_exports_its_own_codes(minilm, minilm_int8, tmp_path):
    result = export_onnx(minilm.with_model(minilm_int8), tmp_path / "q.onnx", scheme="int8-dynamic")
    assert result.cosine >= 0.99 and len(result.quantized) == 37  # 36 Linear layers + the word embeddings


def test_matmulnbits_layout_matches_float64_reference(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(24, 80, dtype=torch.float64).float()  # K = 80 is not a multiple of the block: padded
    grid = int4_grid(w.numpy(), 32)
    b, scales, zp = nbits_tensors(grid, 32)
    assert b.shape == (24, 3, 16) and scales.shape == (72,) and zp.shape == (24 * 2,)
    x = torch.randn(5, 80, dtype=torch.float64)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=80, N=24, bits=4,
                               block_size=32)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 80])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 24])],
        [onnx.numpy_helper.from_array(b, "b"), onnx.numpy_helper.from_array(scales, "s"),
         onnx.numpy_helper.from_array(zp, "z")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                        onnx.helper.make_opsetid("com.microsoft", 1)])
    y = session(model.SerializeToString()).run(None, {"x": x.float().numpy()})[0]
    reference = (x @ grid.dequantize(torch.float64).T).numpy()  # float64 maths on the same grid
    assert np.abs(y - reference).max() < 1e-4 * np.abs(reference).max()


def test_quantize_onnx_input_file(digit_cnn, cnn_inputs, tmp_path):
    float_path = export_onnx(digit_cnn, tmp_path / "f.onnx").path  # stands in for a tf2onnx output
    feeds = [{"input_0": x.numpy()} for x in cnn_inputs[0].split(4)]
    for scheme in ("int8-dynamic", "int8-static", "int4", "bf16"):
        result = quantize_onnx(float_path, tmp_path / f"{scheme}.onnx", scheme=scheme, calibration=feeds)
        assert result.cosine >= TOLERANCE[scheme], scheme
        assert result.size_bytes < float_path.stat().st_size
    with pytest.raises(NetshrinkError, match="needs calibration inputs"):
        quantize_onnx(float_path, tmp_path / "nocal.onnx", scheme="int8-static")
    with pytest.raises(NetshrinkError, match="not found"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(NetshrinkError, match="not a readable ONNX model"):
        quantize_onnx(tmp_path / "junk.onnx", tmp_path / "y.onnx")
    assert not (tmp_path / "nocal.onnx").exists()


class Eigen(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvalsh(x @ x.transpose(-1, -2))


def test_unsupported_operator_is_named(tmp_path):
    with pytest.raises(NetshrinkError, match=r"operator .*eigvalsh.* cannot be expressed in ONNX") as info:
        export_onnx(Eigen(), tmp_path / "e.onnx", example_inputs=(torch.randn(2, 3, 3),))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "e.onnx").exists()


def test_existing_output_is_refused(digit_cnn, tmp_path):
    out = tmp_path / "taken.onnx"
    out.write_bytes(b"keep")
    with pytest.raises(NetshrinkError, match="already exists"):
        export_onnx(digit_cnn, out)
    assert out.read_bytes() == b"keep"


def test_packed_llm_layers_keep_their_int4_grid(smollm2, tmp_path):
    """Packed INT4 layers are written to MatMulNBits with their own codes (no re-quantization)."""
    from netshrink.export.lowering import float_twin

    model = pack_layers(smollm2.model, symmetric=False, blocks=(0,))
    _, grids = float_twin(model.model.layers[0])
    assert len(grids) == 3 and all(g.int4 is not None for g in grids.values())
    qw = model.model.layers[0].self_attn.q_proj.quantized_weight()
    b, scales, zp = nbits_tensors(qw, 32)
    assert np.array_equal(scales.reshape(qw.scales.shape), qw.scales.numpy())
    from netshrink.quant.primitives import unpack_int4

    assert torch.equal(unpack_int4(torch.from_numpy(b), signed=False).reshape(qw.codes.shape), qw.codes)


def test_disk_full_while_writing_leaves_no_file(digit_cnn, tmp_path, monkeypatch):
    import errno

    def full(model, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(model.SerializeToString()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    with pytest.raises(NetshrinkError, match="No space left on device"):
        export_onnx(digit_cnn, tmp_path / "full.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bound_runner_gives_the_plain_run_outputs(digit_cnn, cnn_inputs, tmp_path):
    from netshrink.export.onnx import bound_runner

    path = export_onnx(digit_cnn, tmp_path / "cnn.onnx", scheme="fp32").path
    sess = session(str(path), threads=1)
    name = sess.get_inputs()[0].name
    for x in (cnn_inputs[0][:1].numpy(), cnn_inputs[0].numpy()):
        run = bound_runner(sess, {name: x})
        first = run()[0].copy()
        assert np.array_equal(first, sess.run(None, {name: x})[0])
        assert np.array_equal(run()[0], first)          # the same buffers, refilled on every call
        with torch.no_grad():
            assert np.allclose(first, digit_cnn.model(torch.from_numpy(x)).numpy(), atol=1e-4)
