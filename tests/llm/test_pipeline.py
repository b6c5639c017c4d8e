"""The block-by-block pipeline on a tiny random Llama: every method, streaming from shards, resume, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from netshrink.errors import NetshrinkError
from netshrink.llm import (AWQ, GPTQ, RTN, Magnitude, PackedLinear, SmoothQuant, SparseGPT, W8A8Linear, Wanda,
                           compress_checkpoint, compress_llm, load_compressed, pack_model,
                           write_synthetic_checkpoint)
from netshrink.llm.arch import LINEARS

METHODS = [RTN(4, 32), RTN(4, None), GPTQ(4, 32), GPTQ(3, None, act_order=False), AWQ(4, 32), SmoothQuant(0.5),
           SparseGPT(0.5), SparseGPT(pattern="2:4", bits=4, group_size=32), Wanda(0.5), Wanda(pattern="2:4"),
           Magnitude(0.5)]


@pytest.mark.parametrize("config", METHODS, ids=lambda c: f"{type(c).__name__}")
def test_every_method_runs_and_records(tiny_llama, calib_ids, config):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    model = compress_llm(tiny_llama, config, calib_ids)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())  # user's model untouched
    logits = model(calib_ids).logits
    ref = tiny_llama(calib_ids).logits
    assert torch.isfinite(logits).all()
    rel = float((logits - ref).pow(2).mean() / ref.pow(2).mean())
    assert 0 < rel < 0.5
    record = model._netshrink_record
    assert set(record) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    assert all(r["method"] == config.method for r in record.values())
    if getattr(config, "pattern", None) == "2:4":
        w = model.model.layers[1].mlp.down_proj.weight
        assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2)


def test_pack_model_matches_fake_quant(tiny_llama, calib_ids):
    fake = compress_llm(tiny_llama, GPTQ(4, 32), calib_ids)
    packed = pack_model(compress_llm(tiny_llama, GPTQ(4, 32), calib_ids))
    assert isinstance(packed.model.layers[0].self_attn.q_proj, PackedLinear)
    a, b = fake(calib_ids).logits, packed(calib_ids).logits
    assert float((a - b).abs().max() / a.abs().max()) < 0.05  # BF16 activations inside the kernel


def test_gptq_pipeline_beats_rtn_on_the_model(tiny_llama, calib_ids):
    ref = tiny_llama(calib_ids).logits
    err = {}
    for name, config in (("rtn", RTN(3, 32)), ("gptq", GPTQ(3, 32))):
        err[name] = float((compress_llm(tiny_llama, config, calib_ids)(calib_ids).logits - ref).pow(2).mean())
    assert err["gptq"] < err["rtn"]


def test_calibration_text_shorter_than_seq_len(tiny_llama, byte_tokenizer):
    with pytest.raises(NetshrinkError, match="fewer than seq_len"):
        compress_llm(tiny_llama, GPTQ(), "too short", tokenizer=byte_tokenizer, seq_len=64)
    model = compress_llm(tiny_llama, Wanda(), "long enough calibration text " * 20, tokenizer=byte_tokenizer,
                         seq_len=64, n_samples=4)
    assert model._netshrink_record


def test_calibration_required(tiny_llama):
    with pytest.raises(NetshrinkError, match="needs calibration"):
        compress_llm(tiny_llama, GPTQ())


def test_nan_hidden_states_name_the_block(tiny_llama, calib_ids):
    import copy
    broken = copy.deepcopy(tiny_llama)
    broken.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(NetshrinkError, match=r"model\.layers\.1"):
        compress_llm(broken, Wanda(), calib_ids, inplace=True)


def test_layer_no_token_reaches(tiny_llama, calib_ids):
    import copy
    model = copy.deepcopy(tiny_llama)
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: mlp.up_proj(x) [..., : x.shape[-1]] * 0  # down_proj never runs
    with pytest.raises(NetshrinkError, match=r"model\.layers\.0\.mlp\.(gate|down)_proj"):
        compress_llm(model, GPTQ(4, 32), calib_ids, inplace=True)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NetshrinkError, match="supported: llama, mistral, qwen2, qwen3"):
        compress_llm(model, RTN())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "src"
    from transformers import LlamaConfig  # noqa: F401  (same tiny shape as the in-memory fixture, 3 blocks)
    tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return write_synthetic_checkpoint(folder, tiny)


def test_stream_matches_in_memory_and_loads(checkpoint, calib_ids, tmp_path):
    out = compress_checkpoint(checkpoint, tmp_path / "out", GPTQ(4, 32), calib_ids)
    files = sorted(os.listdir(out))
    assert "netshrink.json" in files and "state.json" not in files and not any("hidden" in f for f in files)
    manifest = json.loads((out / "netshrink.json").read_text())
    assert manifest["layers"]["model.layers.2.mlp.down_proj"]["bits"] == 4
    block = load_file(out / "block-00001.safetensors")
    assert block["model.layers.1.self_attn.q_proj.qweight"].dtype == torch.uint8
    assert block["model.layers.1.self_attn.q_proj.qweight"].shape == (64, 32)
    assert block["model.layers.1.self_attn.q_proj.scales"].shape == (64, 2)
    model = load_compressed(out)
    assert isinstance(model.model.layers[2].mlp.down_proj, PackedLinear)
    # the same pipeline in memory on the same weights gives the same codes
    from netshrink.llm.stream import load_block, read_config  # noqa: F401
    from transformers import LlamaForCausalLM
    src_model = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    mem = compress_llm(src_model, GPTQ(4, 32), calib_ids, pack=True)
    a = mem.model.layers[2].mlp.down_proj.qweight
    b = model.model.layers[2].mlp.down_proj.qweight
    assert (a == b).float().mean() > 0.99
    logits = model(calib_ids).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, mem(calib_ids).logits, atol=0.05, rtol=0.05)


def test_resume_after_crash_gives_identical_output(checkpoint, calib_ids, tmp_path):
    reference = compress_checkpoint(checkpoint, tmp_path / "ref", SparseGPT(0.5, bits=4, group_size=32), calib_ids)

    class Crash(Exception):
        pass

    def crash_after_two(done, total):
        if done == 2:
            raise Crash

    with pytest.raises(Crash):
        compress_checkpoint(checkpoint, tmp_path / "out", SparseGPT(0.5, bits=4, group_size=32), calib_ids,
                            on_block_done=crash_after_two)
    assert not (tmp_path / "out").exists()  # nothing that looks complete
    state = json.loads((tmp_path / ".out.partial" / "state.json").read_text())
    assert state["next_block"] == 2
    with pytest.raises(NetshrinkError, match="different settings"):
        compress_checkpoint(checkpoint, tmp_path / "out", GPTQ(4, 32), calib_ids)
    done = []
    out = compress_checkpoint(checkpoint, tmp_path / "out", SparseGPT(0.5, bits=4, group_size=32), calib_ids,
                              on_block_done=lambda d, t: done.append(d))
    assert done == [3]  # only the last block was redone
    for f in os.listdir(reference):
        if f.endswith(".safetensors"):
            a, b = load_file(reference / f), load_file(out / f)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_resume_after_sigkill(checkpoint, calib_ids, tmp_path):
    ids_path = tmp_path / "ids.pt"
    torch.save(calib_ids, ids_path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from netshrink.llm import compress_checkpoint, Wanda
        def kill(done, total):
            if done == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        compress_checkpoint({str(checkpoint)!r}, {str(tmp_path / 'out')!r}, Wanda(0.5),
                            torch.load({str(ids_path)!r}), on_block_done=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    done = []
    out = compress_checkpoint(checkpoint, tmp_path / "out", Wanda(0.5), calib_ids,
                              on_block_done=lambda d, t: done.append(d))
    assert done == [2, 3]
    model = load_compressed(out)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01


def test_missing_shard_and_wrong_names(checkpoint, calib_ids, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model-00001.safetensors").unlink()
    with pytest.raises(NetshrinkError, match="missing: model-00001.safetensors"):
        compress_checkpoint(broken, tmp_path / "o1", RTN())
    renamed = tmp_path / "renamed"
    shutil.copytree(checkpoint, renamed)
    index = json.loads((renamed / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    wm["model.layers.0.attn.q.weight"] = wm.pop("model.layers.0.self_attn.q_proj.weight")
    (renamed / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NetshrinkError, match="do not match the llama architecture"):
        compress_checkpoint(renamed, tmp_path / "o2", RTN())
    gpt = tmp_path / "gpt"
    shutil.copytree(checkpoint, gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (gpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NetshrinkError, match="unsupported architecture 'gpt2'"):
        compress_checkpoint(gpt, tmp_path / "o3", RTN())


def test_smoothquant_stream_writes_int8(checkpoint, calib_ids, tmp_path):
    out = compress_checkpoint(checkpoint, tmp_path / "sq", SmoothQuant(0.5), calib_ids)
    model = load_compressed(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, W8A8Linear)
    assert torch.isfinite(model(calib_ids).logits).all()


def test_pack_lm_head(tiny_llama, calib_ids):
    import copy

    from netshrink.llm import pack_lm_head

    model = compress_llm(tiny_llama, RTN(4, 32), pack=True)
    ref = model(calib_ids).logits
    embed = model.model.embed_tokens.weight.clone()
    for bits, group in ((8, None), (4, 32)):
        packed = pack_lm_head(copy.deepcopy(model), bits, group)
        assert isinstance(packed.lm_head, PackedLinear) and packed.lm_head.bits == bits
        assert torch.equal(packed.model.embed_tokens.weight, embed)  # the input embedding keeps its float table
        assert packed._netshrink_record["lm_head"]["bits"] == bits
        rel = float((packed(calib_ids).logits - ref).pow(2).mean() / ref.pow(2).mean())
        assert 0 < rel < (0.001 if bits == 8 else 0.05), rel
    with pytest.raises(NetshrinkError, match="not a Linear"):
        pack_lm_head(packed)


def test_copy_to_is_byte_exact_across_shards_and_chunks(tmp_path):
    """Non-block tensors are copied by plain reads (no memory map); the copy must equal the source exactly."""
    from safetensors.torch import save_file

    from netshrink.llm.safetensors_io import ShardedCheckpoint

    src = tmp_path / "src"
    src.mkdir()
    a = {"embed.weight": torch.randn(37, 5), "norm.weight": torch.randn(5).bfloat16()}
    b = {"codes": torch.randint(-128, 127, (3, 7), dtype=torch.int8), "scalar": torch.tensor(2.5)}
    save_file(a, str(src / "a.safetensors"))
    save_file(b, str(src / "b.safetensors"))
    ckpt = ShardedCheckpoint(src)
    ckpt.copy_to(["scalar", "embed.weight", "codes", "norm.weight"], tmp_path / "rest.safetensors", chunk_bytes=24)
    got = load_file(tmp_path / "rest.safetensors")
    for name, tensor in {**a, **b}.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_calibration_ids_outside_the_vocabulary_are_named(checkpoint, tmp_path):
    ids = torch.full((1, 16), 300)                                  # the tiny checkpoint has 256 embedding rows
    with pytest.raises(NetshrinkError, match="outside 'model.embed_tokens.weight', which has 256 rows"):
        compress_checkpoint(checkpoint, tmp_path / "out", GPTQ(4, 32), ids)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", [RTN(4, 32), RTN(8, None, symmetric=True), Magnitude(sparsity=0.5)])
def test_weight_only_streaming_equals_whole_block(checkpoint, tmp_path, config):
    """Without calibration each Linear is loaded, compressed and packed on its own: same tensors as the whole block."""
    from netshrink.llm.pipeline import compress_block
    from netshrink.llm.safetensors_io import ShardedCheckpoint
    from netshrink.llm.stream import load_block, read_config

    out = compress_checkpoint(checkpoint, tmp_path / "out", config)
    arch, hf_config, _ = read_config(checkpoint)
    ckpt = ShardedCheckpoint(checkpoint)
    for i in range(hf_config.num_hidden_layers):
        where = f"model.layers.{i}"
        block = load_block(ckpt, arch, hf_config, i)
        compress_block(block, None, None, config, where, True)
        want = {f"{where}.{k}": v for k, v in block.state_dict().items()}
        got = load_file(out / f"block-{i:05d}.safetensors")
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_streamed_rtn_never_builds_the_dense_copy_it_would_discard(checkpoint, tmp_path, monkeypatch):
    """Packed right after, a quantized Linear needs no FP32 dequantized copy (one largest-Linear copy less per step);
    unpacked output still gets it."""
    from netshrink.llm.packing import QuantizedWeight

    calls = []
    original = QuantizedWeight.dequantize
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    compress_checkpoint(checkpoint, tmp_path / "packed", RTN(4, 32))
    assert calls == []
    compress_checkpoint(checkpoint, tmp_path / "dense", RTN(4, 32), pack=False)
    assert len(calls) > 0


def test_read_rows_is_byte_exact_and_refuses_rows_outside(tmp_path):
    from safetensors.torch import save_file

    from netshrink.llm.safetensors_io import ShardedCheckpoint

    tensors = {"w": torch.randn(37, 5), "h": torch.randn(9, 4, 3).bfloat16(), "s": torch.tensor(1.5)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    ckpt = ShardedCheckpoint(tmp_path)
    for start, stop in ((0, 37), (3, 4), (10, 37), (5, 5)):
        assert torch.equal(ckpt.read_rows("w", start, stop), tensors["w"][start:stop])
    assert torch.equal(ckpt.read_rows("h", 2, 7), tensors["h"][2:7])
    assert torch.equal(ckpt.read("s"), tensors["s"]) and torch.equal(ckpt.read("h"), tensors["h"])
    with pytest.raises(NetshrinkError, match=r"rows \[30, 40\) are outside 'w'"):
        ckpt.read_rows("w", 30, 40)
    index = torch.tensor([36, 0, 5, 5, 12])                 # any order, repeats allowed
    assert torch.equal(ckpt.rows("w", index), tensors["w"][index])
    assert torch.equal(ckpt.rows("h", torch.tensor([8, 1])), tensors["h"][[8, 1]].float())
    with pytest.raises(NetshrinkError, match="index 37 is outside 'w'"):
        ckpt.rows("w", torch.tensor([2, 37]))


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("config", [RTN(4, 32), RTN(3, None), RTN(8, 16, symmetric=True)])
def test_rtn_in_row_chunks_equals_rtn_on_the_whole_weight(chunk_rows, config):
    from netshrink.llm.grid import quantize_weight
    from netshrink.llm.rtn import quantize_in_row_chunks

    w = torch.randn(45, 64, generator=torch.Generator().manual_seed(chunk_rows)) * torch.rand(45, 1) * 3
    got = quantize_in_row_chunks(lambda a, b: w[a:b], w.shape[0], config, chunk_rows)
    want = quantize_weight(w, config.bits, config.group_size, config.symmetric)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert torch.equal(got.zeros, want.zeros) and (got.bits, got.group_size) == (want.bits, want.group_size)
