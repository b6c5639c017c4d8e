"""netshrink checkpoints: bit-exact round trips on the zoo models, compact layouts, and refused bad input."""
from __future__ import annotations

import errno
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.export import checkpoint as ckpt
from netshrink.export.checkpoint import load_checkpoint, save_checkpoint
from netshrink.export.manifest import DATA_NAME, MANIFEST_NAME
from netshrink.export.weight_layout import compress_int, compress_nm, decode_weight, decompress_nm, encode_weight
from netshrink.quant import BF16, FP8, Int8Dynamic, Int8Static, quantize_
from netshrink.record import layer_record

from export_fixtures import compressed_cnn, pack_layers


def _same(a: nn.Module, b: nn.Module, *inputs) -> bool:
    with torch.no_grad():
        out_a, out_b = a(*inputs), b(*inputs)
    if hasattr(out_a, "logits"):
        out_a, out_b = out_a.logits, out_b.logits
    return torch.equal(out_a, out_b)


def test_pruned_nm_and_fake_quantized_cnn_round_trip_bit_exact(digit_cnn, cnn_inputs, tmp_path):
    model = compressed_cnn(digit_cnn.model)
    path = save_checkpoint(digit_cnn.with_model(model), tmp_path / "cnn")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    layouts = {k: v["meta"]["weight"]["layout"] for k, v in manifest["modules"].items()}
    assert layouts == {"conv_layers.3": "dense", "fc_layers.0": "nm", "fc_layers.2": "int"}
    assert manifest["base"] == "digit-cnn" and manifest["methods"] == ["magnitude", "nm", "rtn"]
    assert manifest["data"]["bytes"] == (path / DATA_NAME).stat().st_size
    loaded = load_checkpoint(path)
    assert _same(model, loaded, *cnn_inputs)
    assert layer_record(loaded)["fc_layers.0"]["pattern"] == "2:4"
    # the compact layouts really are smaller than the dense weights they replace
    dense_bytes = sum(p.numel() * 4 for p in digit_cnn.model.parameters())
    assert manifest["data"]["bytes"] < dense_bytes


@pytest.mark.parametrize("config", [Int8Dynamic(), Int8Static(), BF16(), FP8()], ids=lambda c: type(c).__name__)
def test_quantized_cnn_round_trip_bit_exact(config, digit_cnn, cnn_inputs, tmp_path):
    calibration = [cnn_inputs] if isinstance(config, Int8Static) else None
    model = quantize_(digit_cnn.model, config, calibration=calibration)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "q", base="digit-cnn"))
    assert type(loaded.fc_layers[0]) is type(model.fc_layers[0])
    assert _same(model, loaded, *cnn_inputs)


def test_int8_encoder_round_trip_bit_exact(minilm, minilm_int8, minilm_inputs, tmp_path):
    path = save_checkpoint(minilm.with_model(minilm_int8), tmp_path / "minilm")
    loaded = load_checkpoint(path)
    assert _same(minilm_int8, loaded, *minilm_inputs)
    size = (path / DATA_NAME).stat().st_size
    fp32 = sum(p.numel() * 4 for p in minilm.model.parameters())
    linear = sum(m.weight.numel() * 4 for m in minilm.model.modules() if isinstance(m, nn.Linear))
    assert size < fp32 - 0.7 * linear  # int8 codes (a quarter of FP32) for every Linear; embeddings stay FP32


def test_packed_int4_llm_round_trip_bit_exact_with_tied_embeddings(smollm2, smollm2_ids, tmp_path):
    model = pack_layers(smollm2.model, symmetric=False)
    path = save_checkpoint(smollm2.with_model(model), tmp_path / "llm")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["aliases"] == {"state/lm_head.weight": "state/model.embed_tokens.weight"}
    assert manifest["modules"]["model.layers.0.self_attn.q_proj"]["codec"] == "llm.packed_linear"
    loaded = load_checkpoint(path, model=smollm2.model)
    assert _same(model, loaded, smollm2_ids)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), nm=st.sampled_from([(1, 4), (2, 4), (4, 8), (2, 8)]),
       seed=st.integers(0, 2**16))
def test_nm_layout_round_trips_exactly(rows, groups, nm, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups, m, generator=g)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter(-1, torch.rand(w.shape, generator=g).topk(n, -1).indices, True)
    w = (w * keep).reshape(rows, groups * m)
    packed = compress_nm(w, n, m)
    assert packed is not None and packed["values"].shape == (rows, groups * n)
    assert torch.equal(decompress_nm(packed, list(w.shape), n, m), w)
    dense = torch.randn(rows, groups * m, generator=g) + 10  # no zeros at all: not N:M, refused
    assert compress_nm(dense, n, m) is None


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([4, 8]), symmetric=st.booleans(), group=st.sampled_from([None, 8, 16]),
       seed=st.integers(0, 2**16))
def test_int_layout_is_lossless_or_declined(bits, symmetric, group, seed):
    from netshrink.quant.primitives import QScheme, fake_quantize

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 32, generator=g, dtype=torch.float64).float()
    scheme = QScheme(bits=bits, symmetric=symmetric, granularity="group" if group else "channel",
                     axis=1 if group else 0, group_size=group)
    on_grid = fake_quantize(w, scheme)
    record = {"bits": bits, "group_size": group, "symmetric": symmetric}
    tensors, meta = encode_weight(on_grid, record)
    assert meta["layout"] == "int"
    assert torch.equal(decode_weight(tensors, meta), on_grid)
    assert compress_int(w, record) is None  # off-grid weights are never approximated


def test_refuses_existing_path_and_leaves_it_alone(digit_cnn, tmp_path):
    target = tmp_path / "exists"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(NetshrinkError, match="already exists"):
        save_checkpoint(digit_cnn.model, target, base="digit-cnn")
    assert (target / "keep.txt").read_text() == "mine"


def test_disk_full_mid_write_leaves_nothing(digit_cnn, tmp_path, monkeypatch):
    calls = {"n": 0}

    def full(handle, data):
        calls["n"] += 1
        handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write", full)
    with pytest.raises(NetshrinkError, match="disk full") as info:
        save_checkpoint(digit_cnn.model, tmp_path / "ck", base="digit-cnn")
    assert "\n" not in str(info.value) and str(tmp_path / "ck") in str(info.value)
    assert calls["n"] == 1
    assert list(tmp_path.iterdir()) == []  # no partial folder, no temporary left behind


@pytest.fixture()
def saved(digit_cnn, tmp_path):
    return save_checkpoint(compressed_cnn(digit_cnn.model), tmp_path / "ck", base="digit-cnn")


def test_refuses_newer_format_version(saved):
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (saved / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(NetshrinkError, match="format version 99 is newer") as info:
        load_checkpoint(saved)
    assert str(saved / MANIFEST_NAME) in str(info.value)


def test_refuses_tampered_data(saved):
    data = bytearray((saved / DATA_NAME).read_bytes())
    data[-5] ^= 0x01
    (saved / DATA_NAME).write_bytes(bytes(data))
    with pytest.raises(NetshrinkError, match="SHA-256 does not match"):
        load_checkpoint(saved)


def test_refuses_truncated_data(saved):
    data = (saved / DATA_NAME).read_bytes()
    (saved / DATA_NAME).write_bytes(data[:-100])
    with pytest.raises(NetshrinkError, match="truncated"):
        load_checkpoint(saved)


@pytest.mark.parametrize("missing", [MANIFEST_NAME, DATA_NAME])
def test_refuses_missing_files(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(NetshrinkError, match="missing"):
        load_checkpoint(saved)
    with pytest.raises(NetshrinkError, match="not found"):
        load_checkpoint(saved.parent / "nowhere")


def test_refuses_unknown_codec_name(saved):
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    manifest["modules"]["fc_layers.0"]["codec"] = "os.system"
    (saved / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(NetshrinkError, match="codec 'os.system'"):
        load_checkpoint(saved)


class Mystery(nn.Module):
    """A layer type no codec describes, made by netshrink (so the base architecture cannot rebuild it)."""

    __module__ = "netshrink.quant.mystery"

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w


def test_refuses_layer_without_codec(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), Mystery())
    from netshrink.record import note

    note(model, "1", method="custom")
    with pytest.raises(NetshrinkError, match="Mystery cannot be expressed in the netshrink checkpoint format") as e:
        save_checkpoint(model, tmp_path / "m")
    assert str(e.value).startswith("1:")
    assert not (tmp_path / "m").exists()


def test_user_module_round_trip_with_skeleton(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].weight.data[:, ::2] = 0  # 50% unstructured zeros, kept as plain state
    path = save_checkpoint(model, tmp_path / "user")
    with pytest.raises(NetshrinkError, match="names no base model"):
        load_checkpoint(path)
    skeleton = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    loaded = load_checkpoint(path, model=skeleton)
    x = torch.randn(5, 8)
    assert torch.equal(model(x), loaded(x))
    wrong = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    with pytest.raises(NetshrinkError, match="do not fit the base architecture"):
        load_checkpoint(path, model=wrong)
