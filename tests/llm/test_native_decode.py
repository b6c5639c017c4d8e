"""NativeDecoder and its kernel: the tiled layout round-trips, the VNNI matvec equals a float64 reference of the same
arithmetic, and whole decodes match a float64 re-implementation of the native step and stay close to the model's
own forward (the only difference there is int8 activation rounding and a float16 KV cache)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.errors import NetshrinkError
from netshrink.llm import RTN, compress_llm, fuse_projections, pack_lm_head
from netshrink.llm.decode import LeanDecoder
from netshrink.llm.native import NativeDecoder, native_available
from netshrink.llm.native.layout import (BLOCK, native_matrix, native_matvec, quantize_activation, reference_matvec,
                                         thread_tile_groups, tile_codes, tile_groups, untile_codes, untile_groups)
from netshrink.llm.packing import QuantizedWeight

from test_decode import FAMILIES, family_model, lean_decode

needs_native = pytest.mark.skipif(not native_available(), reason="CPU lacks AVX-512 VNNI")


def random_grid(rows: int, cols: int, bits: int, group: int, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    levels = 1 << bits
    groups = -(-cols // group)
    return QuantizedWeight(torch.randint(0, levels, (rows, cols), dtype=torch.uint8, generator=g),
                           torch.rand(rows, groups, generator=g) * 0.02 + 1e-3,
                           torch.randint(0, levels, (rows, groups), dtype=torch.uint8, generator=g), bits, group)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 200), chunks=st.integers(1, 12), bits=st.sampled_from([4, 8]), threads=st.integers(1, 3),
       seed=st.integers(0, 99))
def test_tiled_codes_and_groups_round_trip(rows, chunks, bits, threads, seed):
    cols = 8 * chunks
    codes = torch.randint(0, 1 << bits, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    tiled = tile_codes(codes, bits, threads)
    assert tiled.shape == (-(-rows // 16), 16 * cols * bits // 8)
    assert torch.equal(untile_codes(tiled, bits, rows, cols, threads), codes)
    groups = thread_tile_groups(rows, threads)                 # every tile in exactly one group of 1-4
    assert sorted(t for first, n in groups for t in range(first, first + n)) == list(range(-(-rows // 16)))
    assert all(1 <= n <= 4 for _, n in groups)
    groups = torch.rand(rows, 3)
    assert torch.equal(untile_groups(tile_groups(groups), rows), groups)


def test_a_group_of_tiles_is_interleaved_chunk_by_chunk():
    codes = torch.zeros(64, 8, dtype=torch.uint8)
    codes[16:32] = 1                                             # tile 1 of the group of 4
    tiled = tile_codes(codes, 8).reshape(-1)                    # 4 tiles x 2 chunks of 64 bytes
    assert thread_tile_groups(64, 1) == [(0, 4)]
    assert [int(tiled[64 * i: 64 * (i + 1)].max()) for i in range(8)] == [0, 1, 0, 0, 0, 1, 0, 0]
    assert thread_tile_groups(96, 2) == [(0, 3), (3, 3)]         # 48 rows a thread: one group of 3 each


def test_tiled_layout_puts_four_columns_of_a_row_in_each_lane():
    codes = torch.arange(16 * 16, dtype=torch.int32).reshape(16, 16).remainder(16).to(torch.uint8)  # code = column
    codes[3] = 15 - codes[3]
    tiled = tile_codes(codes, 4)[0]
    # chunk 0 covers columns 0..7: row 3's bytes 12..15 hold columns 0..3 (low nibbles) and 4..7 (high nibbles)
    assert tiled[12:16].tolist() == [(15 - c) | ((15 - c - 4) << 4) for c in range(4)]
    assert tiled[0:4].tolist() == [c | ((c + 4) << 4) for c in range(4)]
    int8 = tile_codes(codes, 8)[0]
    assert int8[12:16].tolist() == [15, 14, 13, 12] and int8[64:68].tolist() == [4, 5, 6, 7]


def test_activation_quantization_matches_hand_computed_values():
    x = torch.zeros(192)
    x[:4] = torch.tensor([1.0, -0.5, 0.25, 0.0039])
    x[130] = -3.0
    q, scale = quantize_activation(x)
    assert scale.tolist() == pytest.approx([1 / 127, 0, 3 / 127])   # blocks of 64
    assert q[:4].tolist() == [127, -64, 32, 0]       # -63.5 rounds half to even; 0.495 rounds to 0
    assert q[130] == -127 and q[128:].abs().sum() == 127


@needs_native
@pytest.mark.parametrize("rows,cols,bits,group", [(48, 576, 4, 128), (40, 576, 4, 576), (33, 1536, 4, 256),
                                                  (64, 640, 8, 640), (17, 192, 3, 128), (16, 64, 4, 64),
                                                  (50, 384, 8, 128), (1, 128, 4, 128)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_a_float64_reference_of_the_same_arithmetic(rows, cols, bits, group, threads):
    qw = random_grid(rows, cols, bits, group)
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(1))
    m = native_matrix(qw, bias, threads=threads)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(2))
    x[5] = 20.0                                          # an outlier: its block gets a coarse scale
    want = reference_matvec(m, x)
    assert torch.allclose(native_matvec(m, x).double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # and the reference is the grid's own matvec up to the activation rounding, block by block
    exact = qw.dequantize().double() @ x.double() + bias.double()
    _, scale = quantize_activation(x)
    blocks = torch.arange(cols) // BLOCK
    bound = (qw.dequantize().double().abs() * (scale[blocks] / 2)).sum(1)
    assert bool(((want - exact).abs() <= bound + 1e-9).all())


@needs_native
@settings(max_examples=25, deadline=None)
@given(tiles=st.integers(1, 12), extra_rows=st.integers(0, 15), blocks=st.integers(1, 5), tail=st.booleans(),
       bits=st.sampled_from([3, 4, 8]), per_channel=st.booleans(), threads=st.integers(1, 3), seed=st.integers(0, 999))
def test_kernel_property(tiles, extra_rows, blocks, tail, bits, per_channel, threads, seed):
    rows, cols = 16 * tiles - (16 - extra_rows) % 16, 128 * blocks + (64 if tail else 0)
    qw = random_grid(rows, cols, bits, cols if per_channel else (64 if tail else 128), seed)
    m = native_matrix(qw, threads=threads)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(seed)) * 3
    want = reference_matvec(m, x)
    assert torch.allclose(native_matvec(m, x).double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-7)


def test_layouts_the_kernel_cannot_read_are_refused_with_the_layer_named():
    with pytest.raises(NetshrinkError, match="group size 96 is not a multiple of 64"):
        native_matrix(random_grid(16, 192, 4, 96), where="model.layers.0.mlp.up_proj")
    with pytest.raises(NetshrinkError, match="in_features=96 is not a multiple of 64"):
        native_matrix(random_grid(16, 96, 4, 96))
    with pytest.raises(NetshrinkError, match="2-bit"):
        native_matrix(random_grid(16, 128, 2, 128))


# ---- whole decodes -------------------------------------------------------------------------------------------

def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean() + norm.variance_epsilon) * norm.weight.double()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def native_reference(decoder: NativeDecoder, model, ids: list[int]) -> torch.Tensor:
    """The native step re-written in float64, shard by shard as the threads run it: the same int8 activation
    blocks and float16 KV cache, each thread's rows of q/k/v and gate/up, and the partial sums of its columns of
    o_proj and down_proj; the last token's logits. Only float32 rounding inside the kernel separates it from
    NativeDecoder."""
    H, KV, D = decoder.heads, decoder.kv_heads, decoder.head_dim
    blocks = model.model.layers
    keys = [[] for _ in blocks]
    values = [[] for _ in blocks]
    for pos, token in enumerate(ids):
        x = model.model.embed_tokens.weight[token].double()
        cos, sin = decoder.cos[pos].double(), decoder.sin[pos].double()
        for i, block in enumerate(blocks):
            attn = block.self_attn
            normed = _rms(x, block.input_layernorm).float()
            q, k, v = torch.zeros(H, D, dtype=torch.float64), torch.zeros(KV, D, dtype=torch.float64), \
                torch.zeros(KV, D, dtype=torch.float64)
            for sh, mats in zip(decoder.shards, decoder.shard_matrices):
                if sh.h1 == sh.h0:
                    continue
                out = reference_matvec(mats[i][0], normed)
                nh, nkv = sh.h1 - sh.h0, sh.j1 - sh.j0
                q[sh.h0: sh.h1] = out[: nh * D].view(nh, D)
                k[sh.j0: sh.j1] = out[nh * D: (nh + nkv) * D].view(nkv, D)
                v[sh.j0: sh.j1] = out[(nh + nkv) * D:].view(nkv, D)
            if getattr(attn, "q_norm", None) is not None:
                q = torch.stack([_rms(h, attn.q_norm) for h in q])
                k = torch.stack([_rms(h, attn.k_norm) for h in k])
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys[i].append(k.float().half().double())
            values[i].append(v.float().half().double())
            K, V = torch.stack(keys[i], 1), torch.stack(values[i], 1)          # [KV, T, D]
            heads = torch.stack([torch.softmax(K[h // (H // KV)] @ q[h] * float(attn.scaling), 0) @ V[h // (H // KV)]
                                 for h in range(H)])
            update = torch.zeros_like(x)
            for sh, mats in zip(decoder.shards, decoder.shard_matrices):
                if sh.h1 > sh.h0:
                    update += reference_matvec(mats[i][1], heads[sh.h0: sh.h1].reshape(-1).float())
            x = x + update
            normed = _rms(x, block.post_attention_layernorm).float()
            update = torch.zeros_like(x)
            for sh, mats in zip(decoder.shards, decoder.shard_matrices):
                if sh.i1 > sh.i0:
                    gu = reference_matvec(mats[i][2], normed)
                    n = sh.i1 - sh.i0
                    update += reference_matvec(mats[i][3], (torch.nn.functional.silu(gu[:n]) * gu[n:]).float())
            x = x + update
    return reference_matvec(decoder.head_matrix, _rms(x, model.model.norm).float())


def packed(model, bits=4, group=128):
    return pack_lm_head(compress_llm(model, RTN(bits, group, symmetric=bits == 8 and group is None), pack=True), 8)


@needs_native
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_matches_its_float64_reference_and_the_model(family):
    model = packed(family_model(family))
    decoder = NativeDecoder(model, max_len=32, threads=2)
    prompt = torch.randint(0, 256, (4,), generator=torch.Generator().manual_seed(1))
    tokens = decoder.generate(prompt, 6)
    ids = prompt.tolist() + tokens[:-1]
    errors = []
    for n in range(1, len(ids) + 1):
        decoder.reset()
        got = decoder.forward(torch.tensor(ids[:n]))
        want = native_reference(decoder, model, ids[:n])
        errors.append(float((got.double() - want).abs().max() / want.abs().max()))
    # float32 rounding only; except that, rarely, an activation a few 1e-4 of a step from a rounding boundary
    # lands on the other side of it in float32 (one int8 code off by one: about 1% here), so most must be exact
    assert sum(e < 1e-5 for e in errors) >= len(errors) - 1 and max(errors) < 0.03, errors
    assert int(got.argmax()) == tokens[-1]
    # against the model's own kernels (BF16 activations, float32 cache): close, as activation rounding allows
    lean = LeanDecoder(model, max_len=32).forward(torch.tensor(ids))
    assert torch.nn.functional.cosine_similarity(got, lean, dim=0) > 0.999


@needs_native
def test_thread_count_does_not_change_the_result_and_the_model_is_untouched(tiny_llama):
    model = packed(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(2))
    one, two = NativeDecoder(model, max_len=32, threads=1), NativeDecoder(model, max_len=32, threads=2)
    want = one.forward(prompt)
    # the threads' partial sums of o_proj and down_proj are added in another order than one thread's: float32
    # rounding apart, the same logits
    assert float((two.forward(prompt) - want).abs().max() / want.abs().max()) < 1e-3
    three = NativeDecoder(model, max_len=32, threads=3)              # more threads than this machine's cores
    assert float((three.forward(prompt) - want).abs().max() / want.abs().max()) < 1e-3
    assert one.generate(prompt, 6) == two.generate(prompt, 6)
    plain = NativeDecoder(model, max_len=32, threads=2, huge_pages=False)     # weights in ordinary pages
    two.reset()
    assert torch.equal(plain.forward(prompt), two.forward(prompt))
    if two._arena is not None:                                  # every matrix now lives in the 2 MiB-page buffer
        lo, hi = two._arena.data_ptr(), two._arena.data_ptr() + two._arena.numel()
        assert all(lo <= m.codes.data_ptr() < hi and lo <= m.scales.data_ptr() < hi for m in two.matrices)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


@needs_native
def test_incremental_forward_equals_generate_and_fused_models_decode_the_same(tiny_llama):
    model = packed(tiny_llama, 8, None)
    prompt = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(3))
    decoder = NativeDecoder(model, max_len=16)
    tokens = decoder.generate(prompt, 6)
    decoder.reset()
    logits = decoder.forward(prompt[:2])
    logits = decoder.forward(prompt[2:])
    stepped = []
    for _ in range(6):
        stepped.append(int(logits.argmax()))
        logits = decoder.forward(torch.tensor([stepped[-1]]))
    assert stepped == tokens and decoder.pos == 11
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    assert NativeDecoder(fused, max_len=16).generate(prompt, 6) == tokens
    assert lean_decode(LeanDecoder(model, max_len=16), prompt, 6)[0][:2] == tokens[:2]


@needs_native
@pytest.mark.timeout(120, method="thread")   # the hang is inside C: only the thread method can stop it
def test_a_token_posted_right_after_construction_is_not_lost(tiny_llama):
    """Regression: a worker that started after the first job was posted took that job's generation as already
    seen and slept, leaving the caller spinning at the barrier forever."""
    model = packed(tiny_llama)
    prompt = torch.tensor([1, 2, 3])
    a = torch.randn(256, 256)
    torch.set_num_threads(2)
    for _ in range(50):
        a @ a                          # OpenMP threads left spinning on both cores delay the worker's start
        assert len(NativeDecoder(model, max_len=8, threads=2).forward(prompt)) == 256


@needs_native
def test_clear_errors(tiny_llama):
    with pytest.raises(NetshrinkError, match=r"model.layers.0.self_attn.[qo]_proj is a Linear, not a packed layer"):
        NativeDecoder(tiny_llama)
    blocks_only = compress_llm(tiny_llama, RTN(4, 128), pack=True)
    with pytest.raises(NetshrinkError, match="lm_head is a Linear"):
        NativeDecoder(blocks_only)
    decoder = NativeDecoder(packed(tiny_llama), max_len=8)
    with pytest.raises(NetshrinkError, match="exceeds the decoder's cache of 8"):
        decoder.forward(torch.arange(9))
    with pytest.raises(NetshrinkError, match="outside the vocabulary of 256"):
        decoder.forward(torch.tensor([256]))
    with pytest.raises(NetshrinkError, match="threads >= 1, got 8 and 0"):
        NativeDecoder(packed(tiny_llama), max_len=8, threads=0)
    with pytest.raises(NetshrinkError, match="no tokens"):
        decoder.forward(torch.tensor([], dtype=torch.long))
    assert decoder.pos == 0
    with pytest.raises(NetshrinkError, match="token id 256 outside the vocabulary of 256"):    # step's own checks
        decoder.step(256)
    decoder.forward(torch.arange(8))
    with pytest.raises(NetshrinkError, match="exceeds the decoder's cache of 8"):
        decoder.step(1)
    assert decoder.pos == 8
    model = packed(family_model("mistral"))
    model.config.sliding_window = 4
    with pytest.raises(NetshrinkError, match="sliding window of 4"):
        NativeDecoder(model, max_len=16).forward(torch.arange(6))


@needs_native
def test_decode_speed_takes_the_native_runtime_for_packed_models(tiny_llama):
    from netshrink.bench import decode_tokens_per_second

    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    auto = decode_tokens_per_second(packed(tiny_llama), prompt, new_tokens=4, num_threads=1)
    assert auto["native"] == 1.0 and auto["lean"] == 0.0 and auto["tokens_per_s"] > 0
    blocks_only = compress_llm(tiny_llama, RTN(4, 128), pack=True)      # float head: not native, lean instead
    lean = decode_tokens_per_second(blocks_only, prompt, new_tokens=4, num_threads=1)
    assert lean["native"] == 0.0 and lean["lean"] == 1.0
    with pytest.raises(NetshrinkError, match="lm_head is a Linear"):
        decode_tokens_per_second(blocks_only, prompt, new_tokens=4, num_threads=1, runtime="native")


@needs_native
def test_the_kernel_builds_into_the_cache_named_by_its_source(tmp_path, monkeypatch):
    from netshrink.llm.native import build

    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path))
    build.load_library.cache_clear()
    try:
        lib = build.load_library()
        built = list((tmp_path / "native").glob("decode-*.so"))
        assert len(built) == 1 and lib._name == str(built[0])
        assert not list((tmp_path / "native").glob("tmp*"))       # the temporary name was renamed, not left
    finally:
        build.load_library.cache_clear()


@needs_native
def test_a_failed_build_is_named_and_auto_decoding_falls_back_to_lean(tmp_path, monkeypatch, tiny_llama):
    from netshrink.bench import decode_tokens_per_second
    from netshrink.llm.native import build

    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")                            # a "compiler" that always fails
    build.load_library.cache_clear()
    try:
        with pytest.raises(NetshrinkError, match="compiling decode.cpp failed"):
            build.load_library()
        prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(5))
        with pytest.warns(UserWarning, match="native decoding unavailable"):
            speed = decode_tokens_per_second(packed(tiny_llama), prompt, new_tokens=3, num_threads=1)
        assert speed["native"] == 0.0 and speed["lean"] == 1.0
    finally:
        build.load_library.cache_clear()


@needs_native
def test_eval_perplexity_scores_the_native_runtime_like_a_model(tiny_llama, byte_tokenizer):
    from netshrink.eval.perplexity import perplexity

    model = packed(tiny_llama)
    decoder = NativeDecoder(model, max_len=64)
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(6))
    every = decoder(ids[None])
    assert every.shape == (1, 9, 256)
    decoder.reset()
    assert torch.equal(every[0, -1], decoder.forward(ids))        # position by position = one forward
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune."
    native = perplexity(decoder, byte_tokenizer, text, max_length=64, stride=32)["perplexity"]
    forward = perplexity(model, byte_tokenizer, text, max_length=64, stride=32)["perplexity"]
    assert abs(native / forward - 1) < 0.02
