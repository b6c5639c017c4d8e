"""More bad input for the LLM pipeline: wrong-shaped or NaN checkpoint tensors, N:M patterns that do not fit a layer,
bad calibration ids, broken index files, and config fields checked when a config is made."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from netshrink.errors import NetshrinkError
from netshrink.llm import (AWQ, GPTQ, RTN, Magnitude, SmoothQuant, SparseGPT, Wanda, compress_checkpoint,
                           compress_llm, write_synthetic_checkpoint)

NAN_LAYER = r"^model\.layers\.1\.self_attn\.q_proj: weight contains NaN or Inf"


@pytest.fixture()
def checkpoint(tmp_path, tiny_config):
    """The tiny Llama as a checkpoint folder: rest.safetensors (embedding, norm) and model-0000i.safetensors."""
    return write_synthetic_checkpoint(tmp_path / "src", tiny_config)


def edit_tensor(folder, shard, name, change):
    tensors = load_file(folder / shard)
    tensors[name] = change(tensors[name])
    save_file(tensors, str(folder / shard))


@pytest.mark.parametrize("shard, name, change, got, want", [
    ("model-00001.safetensors", "model.layers.1.self_attn.q_proj.weight", lambda t: t[:48], [48, 64], [64, 64]),
    ("rest.safetensors", "model.embed_tokens.weight", lambda t: t[:200], [200, 64], [256, 64]),
])
def test_wrong_tensor_shape_is_refused_before_any_block(checkpoint, tmp_path, shard, name, change, got, want):
    edit_tensor(checkpoint, shard, name, change)
    done = []
    with pytest.raises(NetshrinkError) as err:
        compress_checkpoint(checkpoint, tmp_path / "out", RTN(4, 32), on_block_done=lambda d, t: done.append(d))
    assert err.value.what == f"tensor {name} has shape {got}, expected {want}"
    assert err.value.where == str(checkpoint / shard)
    assert done == []
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("config", [RTN(4, 32), GPTQ(4, 32), AWQ(4, 32), SparseGPT(0.5), Wanda(0.5), Magnitude(0.5),
                                    SmoothQuant(0.5)], ids=lambda c: type(c).__name__)
def test_nan_weight_names_the_layer_in_memory(tiny_llama, calib_ids, config):
    broken = copy.deepcopy(tiny_llama)
    broken.model.layers[1].self_attn.q_proj.weight.data[3, 5] = float("nan")
    calibration = None if isinstance(config, (RTN, Magnitude)) else calib_ids
    with pytest.raises(NetshrinkError, match=NAN_LAYER):
        compress_llm(broken, config, calibration, inplace=True)


@pytest.mark.parametrize("config, pack", [(RTN(4, 32), True), (RTN(4, 32), False), (Magnitude(0.5), False),
                                          (GPTQ(4, 32), True)], ids=["rtn-packed", "rtn", "magnitude", "gptq"])
def test_nan_weight_names_the_layer_streamed(checkpoint, calib_ids, tmp_path, config, pack):
    edit_tensor(checkpoint, "model-00001.safetensors", "model.layers.1.self_attn.q_proj.weight",
                lambda t: t.index_put_((torch.tensor([3]), torch.tensor([5])), torch.tensor(float("nan"))))
    calibration = calib_ids if isinstance(config, GPTQ) else None
    with pytest.raises(NetshrinkError, match=NAN_LAYER):
        compress_checkpoint(checkpoint, tmp_path / "out", config, calibration, pack=pack)
    assert not (tmp_path / "out").exists()


def test_nm_pattern_that_does_not_divide_a_layer_names_it(tiny_llama, calib_ids):
    with pytest.raises(NetshrinkError, match="multiple of the pattern's M=3") as err:
        SparseGPT(pattern="2:3")                          # N:M groups would straddle SparseGPT's column blocks
    assert err.value.where == "SparseGPT.block_size"
    layer = r"^model\.layers\.0\.self_attn\.q_proj: 64 input features do not split into groups of 3 \(pattern '2:3'\)"
    for config in (SparseGPT(pattern="2:3", block_size=129), Wanda(pattern="2:3"), Magnitude(pattern="2:3")):
        with pytest.raises(NetshrinkError, match=layer):
            compress_llm(tiny_llama, config, calib_ids)


def test_calibration_ids_outside_the_vocabulary_same_error_in_memory_and_streamed(tiny_llama, checkpoint, tmp_path):
    for bad in (300, -1):
        ids = torch.full((2, 16), 7)
        ids[1, 4] = bad
        messages = []
        for run in (lambda: compress_llm(tiny_llama, GPTQ(4, 32), ids),
                    lambda: compress_checkpoint(checkpoint, tmp_path / "out", GPTQ(4, 32), ids)):
            with pytest.raises(NetshrinkError) as err:
                run()
            messages.append(str(err.value))
        assert messages == [f"calibration: token id {bad} is outside 'model.embed_tokens.weight', which has 256 rows "
                            "(calibration token ids must be smaller than the vocabulary size)"] * 2
        assert not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_calibration_ids_must_be_integers(tiny_llama, checkpoint, tmp_path, dtype):
    ids = torch.rand(2, 16).mul(255).to(dtype)
    with pytest.raises(NetshrinkError, match=rf"^calibration: calibration ids must be integer token ids, got {dtype}"):
        compress_llm(tiny_llama, Wanda(0.5), ids)
    with pytest.raises(NetshrinkError, match="must be integer token ids"):
        compress_checkpoint(checkpoint, tmp_path / "out", Wanda(0.5), ids)


@pytest.mark.parametrize("file, text, what", [
    ("model.safetensors.index.json", "{not json", "not valid JSON"),
    ("model.safetensors.index.json", json.dumps({"metadata": {}}), "index has no 'weight_map'"),
    ("model.safetensors.index.json", json.dumps({"weight_map": ["a", "b"]}), "index has no 'weight_map'"),
    ("config.json", "\x00\x01 garbage", "not valid JSON"),
])
def test_broken_index_or_config_names_the_file(checkpoint, tmp_path, file, text, what):
    (checkpoint / file).write_text(text)
    with pytest.raises(NetshrinkError, match=what) as err:
        compress_checkpoint(checkpoint, tmp_path / "out", RTN(4, 32))
    assert err.value.where == str(checkpoint / file)


@pytest.mark.parametrize("make, where", [
    (lambda: RTN(bits=9), "RTN.bits"),
    (lambda: RTN(bits=4.0), "RTN.bits"),
    (lambda: RTN(group_size=0), "RTN.group_size"),
    (lambda: GPTQ(bits=1), "GPTQ.bits"),
    (lambda: GPTQ(damp=0), "GPTQ.damp"),
    (lambda: GPTQ(block_size=0), "GPTQ.block_size"),
    (lambda: AWQ(group_size=-32), "AWQ.group_size"),
    (lambda: AWQ(n_grid=0), "AWQ.n_grid"),
    (lambda: AWQ(max_shrink=1.5), "AWQ.max_shrink"),
    (lambda: SparseGPT(bits=16), "SparseGPT.bits"),
    (lambda: SparseGPT(0.5, bits=4, group_size=0), "SparseGPT.group_size"),
    (lambda: SparseGPT(damp=-0.01), "SparseGPT.damp"),
    (lambda: SmoothQuant(alpha=1.5), "SmoothQuant.alpha"),
    (lambda: Wanda(sparsity="half"), "Wanda.sparsity"),
    (lambda: Magnitude(pattern=24), "Magnitude.pattern"),
])
def test_config_fields_are_checked_when_constructed(make, where):
    with pytest.raises(NetshrinkError) as err:
        make()
    assert err.value.where == where


def test_pack_with_bits_that_cannot_be_packed_is_refused_first(tiny_llama, calib_ids, checkpoint, tmp_path):
    done = []
    with pytest.raises(NetshrinkError, match=r"^RTN\.bits: pack=True cannot store 5-bit weights"):
        compress_llm(tiny_llama, RTN(5, 32), pack=True, progress=lambda d, t: done.append(d))
    with pytest.raises(NetshrinkError, match=r"^GPTQ\.bits: pack=True cannot store 2-bit weights"):
        compress_llm(tiny_llama, GPTQ(2, 32), calib_ids, pack=True, progress=lambda d, t: done.append(d))
    with pytest.raises(NetshrinkError, match=r"^RTN\.bits: pack=True cannot store 5-bit weights"):
        compress_checkpoint(checkpoint, tmp_path / "out", RTN(5, 32), on_block_done=lambda d, t: done.append(d))
    assert done == []
    assert not (tmp_path / ".out.partial").exists()
    assert compress_llm(tiny_llama, RTN(5, 32))._netshrink_record   # 5 bits is fine without packing
