"""Batch-1 decode speed on CPU: FP32, BF16, netshrink INT8 and INT4 (g128) against the memory-bandwidth floor.

At batch 1 every weight byte is read once per token, so tokens/s <= bandwidth / weight bytes. The script measures
this machine's read bandwidth, then for each variant (interleaved rounds, median) the decode time per token with a
KV cache, the bytes it reads, and the share of its floor it reaches. What a shared host leaves free drifts between
about 48 and 90 GB/s within minutes, so the floor is given two ways: per round, from the higher of the readings
taken just before and just after that variant's timing (median over rounds), and from the highest reading of the
whole run (the most conservative). Models: SmolLM2-135M and a synthetic
Llama of ~0.6 B parameters (random weights: speed does not depend on them), where weight reading dominates the
per-layer Python overhead. Plus single Linears (4096x4096 and SmolLM2's shapes): the kernels alone.

The packed variants pack the LM head too (`pack_lm_head`): see `variants`. Where llama-cpp-python is installed,
llama.cpp decodes SmolLM2's own GGUF and netshrink's GGUF exports of both models in the same rounds (weight bytes:
the file's tensors, less the embedding table where the head is separate).

    .venv/bin/python benchmarks/bench_llm_decode.py [--quick] [--threads N] [--only linear|smollm2|synthetic]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from pathlib import Path
import statistics
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from netshrink.llm import RTN, PackedLinear, compress_llm, fuse_projections, pack_lm_head, quantize_weight
from netshrink.llm.bandwidth import measure_bandwidth, weight_bytes_per_token
from netshrink.llm.decode import LeanDecoder
from netshrink.llm.native import NativeDecoder, native_available


def variants(model, quick: bool) -> dict[str, torch.nn.Module]:
    """FP32, BF16, and netshrink INT8 / INT4 g128 blocks; the packed variants also pack the LM head (INT8 per
    channel: a tied 49152x576 FP32 head alone reads 113 MB a token, more than SmolLM2's 30 INT4 blocks). The last
    variant fuses each block's q/k/v and gate/up into one packed matmul each (`fuse_projections`), and the
    "LeanDecoder" rows decode four of the variants with `netshrink.llm.decode.LeanDecoder` instead of the model's
    own forward."""
    out = {"FP32": model, "BF16": copy.deepcopy(model).to(torch.bfloat16)}
    out["INT8 per-channel"] = pack_lm_head(compress_llm(model, RTN(8, None, symmetric=True), pack=True), 8)
    int4 = compress_llm(model, RTN(4, 128), pack=True)
    if not quick:
        out["INT4 g128, FP32 head"] = copy.deepcopy(int4)
        out["INT4 g128 + INT4 g128 head"] = pack_lm_head(copy.deepcopy(int4), 4, 128)
    out["INT4 g128 + INT8 head"] = pack_lm_head(int4, 8)
    out["INT4 g128 + INT8 head, q/k/v and gate/up fused"] = copy.deepcopy(out["INT4 g128 + INT8 head"])
    fuse_projections(out["INT4 g128 + INT8 head, q/k/v and gate/up fused"])
    for name in ("FP32", "BF16", "INT8 per-channel", "INT4 g128 + INT8 head"):
        out[f"{name}, netshrink LeanDecoder"] = Lean(out[name])
    if native_available():
        for name in ("INT8 per-channel", "INT4 g128 + INT8 head", "INT4 g128 + INT4 g128 head"):
            if name in out:
                out[f"{name}, netshrink NativeDecoder"] = Native(out[name])
    return out


class Native:
    """netshrink's NativeDecoder over one of the packed variants: the same grid, in its own layout (its bytes)."""

    def __init__(self, model):
        self.model, self.decoder = model, NativeDecoder(model, max_len=256)
        self.weight_bytes = self.decoder.weight_bytes

    def step_time(self, steps: int, prompt: int = 16) -> float:
        """Seconds per decoded token (greedy), after a prefill of `prompt` tokens: as `step_time`."""
        self.decoder.reset()
        token = int(self.decoder.forward(torch.randint(0, 1000, (prompt,))).argmax())
        t0 = time.perf_counter()
        for _ in range(steps):
            token = self.decoder.step(token)
        return (time.perf_counter() - t0) / steps


class Lean:
    """netshrink's LeanDecoder over one of the variants (same weights, so the same bytes per token)."""

    def __init__(self, model):
        self.model, self.decoder = model, LeanDecoder(model, max_len=256)

    @property
    def weight_bytes(self) -> int:
        return weight_bytes_per_token(self.model)   # read after the model's own row has built its kernel layouts

    @torch.inference_mode()
    def step_time(self, steps: int, prompt: int = 16) -> float:
        """Seconds per decoded token (greedy), after a prefill of `prompt` tokens: as `step_time`."""
        self.decoder.reset()
        logits = self.decoder.forward(torch.randint(0, 1000, (prompt,)))
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = self.decoder.forward(logits.argmax().reshape(1))
        return (time.perf_counter() - t0) / steps


@torch.inference_mode()
def step_time(model, steps: int, prompt: int = 16) -> float:
    """Seconds per decoded token (greedy, KV cache), after a prefill of `prompt` tokens."""
    ids = torch.randint(0, 1000, (1, prompt))
    out = model(ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps


class LlamaCpp:
    """llama.cpp (llama-cpp-python) decoding a GGUF file at batch 1, timed like `step_time`."""

    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        self.path = path
        self.weight_bytes = gguf_bytes_per_token(path)
        self.llm = Llama(model_path=str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads,
                         n_batch=64, verbose=False)

    def step_time(self, steps: int, prompt: int = 16) -> float:
        self.llm.reset()
        self.llm.eval(list(range(100, 100 + prompt)))
        token = 200
        t0 = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([token])
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
        return (time.perf_counter() - t0) / steps


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the GGUF tensors a decoded token reads: all of them, less the token-embedding table when the model
    has a separate output head (a token then reads one embedding row, not the table)."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    untied = "output.weight" in sizes
    return sum(n for name, n in sizes.items() if not (untied and name == "token_embd.weight"))


def gguf_variants(entry, folder: Path, tokenizer=None, package: bool = True) -> dict[str, LlamaCpp]:
    """llama.cpp on netshrink's GGUF exports (Q8_0, Q4_0) of `entry` (a ZooModel, or a model plus `tokenizer`),
    and with `package` on SmolLM2's own Q4_1 GGUF."""
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: no llama.cpp rows")
        return {}
    from netshrink.export import export
    from netshrink.zoo.builtin import smollm2_path

    threads = torch.get_num_threads()
    out = {"llama.cpp, package GGUF Q4_1": LlamaCpp(smollm2_path(), threads)} if package else {}
    for scheme in ("Q8_0", "Q4_0"):
        path = export(entry, "gguf", folder / f"{len(list(folder.iterdir()))}-{scheme}.gguf", scheme=scheme,
                      tokenizer=tokenizer)
        out[f"llama.cpp, netshrink GGUF {scheme}"] = LlamaCpp(path, threads)
    return out


def bench_models(name: str, model, bandwidths: list[float], rounds: int, steps: int, quick: bool,
                 extra: dict | None = None, text_ids: torch.Tensor | None = None) -> None:
    vs = variants(model, quick)
    vs.update(extra or {})
    for m in vs.values():
        timed(m, 2)  # builds kernel layouts, warms caches
    times: dict[str, list[float]] = {k: [] for k in vs}
    adjacent: dict[str, list[float]] = {k: [] for k in vs}   # per round: the higher reading just before / after
    reading_mib = 256 if quick else 1024
    for _ in range(rounds):
        for k, m in vs.items():
            time.sleep(0.2)  # let the previous variant's thread pool (llama.cpp's, OpenMP's) stop spinning first
            before = measure_bandwidth(reading_mib)
            times[k].append(timed(m, steps))
            adjacent[k].append(max(before, measure_bandwidth(reading_mib)))
            bandwidths.extend([before, adjacent[k][-1]])
    base = statistics.median(times["FP32"])
    bandwidth = max(bandwidths)
    print(f"\n### {name} (bandwidth: highest reading {bandwidth / 1e9:.1f} GB/s of {len(bandwidths)} so far, "
          f"lowest {min(bandwidths) / 1e9:.1f}; {torch.get_num_threads()} threads)\n")
    print("| variant | weight MB/token | tokens/s | % of floor, adjacent readings | % of floor, highest reading | "
          "speed-up vs FP32 |")
    print("|---|---|---|---|---|---|")
    for k, m in vs.items():
        t = statistics.median(times[k])
        wb = m.weight_bytes if isinstance(m, (LlamaCpp, Lean, Native)) else weight_bytes_per_token(m)
        paired = statistics.median(100 * wb / (ti * bw) for ti, bw in zip(times[k], adjacent[k]))
        print(f"| {k} | {wb / 1e6:.1f} | {1 / t:.1f} | {paired:.0f}% | {100 * wb / (t * bandwidth):.0f}% | "
              f"{base / t:.2f}x |")
    natives = {k: m for k, m in vs.items() if isinstance(m, Native)}
    if natives and text_ids is not None:
        # NativeDecoder rounds activations to int8 per block of 128: its perplexity next to the model's forward
        print("\n| variant | perplexity, model's forward | perplexity, NativeDecoder |\n|---|---|---|")
        for k, m in natives.items():
            with torch.inference_mode():
                logits = m.model(text_ids[None]).logits[0, :-1]
            forward = float(torch.exp(torch.nn.functional.cross_entropy(logits, text_ids[1:])))
            print(f"| {k.removesuffix(', netshrink NativeDecoder')} | {forward:.3f} | "
                  f"{m.decoder.perplexity(text_ids):.3f} |")


def timed(model, steps: int) -> float:
    return model.step_time(steps) if isinstance(model, (LlamaCpp, Lean, Native)) else step_time(model, steps)


@torch.inference_mode()
def bench_linear(n: int, k: int, bandwidths: list[float], rounds: int) -> None:
    """One Linear [n, k] at batch 1: FP32, BF16 and the packed kernels, interleaved."""
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    layers = {"FP32": torch.nn.Linear(k, n, bias=False), "BF16": None,
              "INT8": PackedLinear.from_quantized(quantize_weight(w, 8, None, True)),
              "INT4 g128": PackedLinear.from_quantized(quantize_weight(w, 4, 128, False))}
    layers["FP32"].weight.data.copy_(w)
    layers["BF16"] = copy.deepcopy(layers["FP32"]).to(torch.bfloat16)
    x32 = torch.randn(1, k)
    xs = {"BF16": x32.bfloat16()}
    calls = max(5, min(200, int(2e8 // (n * k))))

    def run(name):
        layer, x = layers[name], xs.get(name, x32)
        t0 = time.perf_counter()
        for _ in range(calls):
            layer(x)
        return (time.perf_counter() - t0) / calls

    for name in layers:
        run(name)
    times = {name: [] for name in layers}
    for _ in range(rounds):
        for name in layers:
            times[name].append(run(name))
        bandwidths.append(measure_bandwidth(256))
    bandwidth = max(bandwidths)
    print(f"\n### one {n}x{k} Linear, batch 1 (FP32 activations in and out for the packed layers; bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s, the highest of {len(bandwidths)} readings so far)\n")
    print("| variant | us | weight MB | floor us | % of floor | speed-up vs FP32 |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(times["FP32"])
    for name, layer in layers.items():
        t = statistics.median(times[name])
        wb = weight_bytes_per_token(layer) if name.startswith("INT") else w.numel() * (2 if name == "BF16" else 4)
        floor = wb / bandwidth
        print(f"| {name} | {t * 1e6:.1f} | {wb / 1e6:.2f} | {floor * 1e6:.1f} | {100 * floor / t:.0f}% | "
              f"{base / t:.2f}x |")


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers renames past_key_values -> cache
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=("linear", "smollm2", "synthetic"), default=None,
                        help="run one section (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, steps = (2, 8) if args.quick else (5, 32)
    bandwidths = [measure_bandwidth(256 if args.quick else 1024)]
    print(f"first read-bandwidth reading: {bandwidths[0] / 1e9:.1f} GB/s (each table uses the highest reading so far)")
    shapes = [(4096, 4096), (1536, 576), (49152, 576)]  # a 7B-class square, SmolLM2's up_proj and its head
    if not args.quick:
        shapes += [(576, 576), (576, 1536)]
    if args.only in (None, "linear"):
        for n, k in shapes:
            bench_linear(n, k, bandwidths, rounds)
    from netshrink.zoo import load
    smol = load("smollm2")
    with tempfile.TemporaryDirectory() as folder:
        if args.only in (None, "smollm2"):
            from netshrink.data.text import prose

            text_ids = smol.tokenizer(prose("lee"), return_tensors="pt").input_ids[0][:255]
            bench_models("SmolLM2-135M", smol.model, bandwidths, rounds, steps, args.quick,
                         gguf_variants(smol, Path(folder)), text_ids=text_ids)
        if not args.quick and args.only in (None, "synthetic"):
            # SmolLM2's vocabulary size, so that its tokenizer goes into the GGUF exports llama.cpp decodes
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                              num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
            synthetic = LlamaForCausalLM(cfg).eval()
            bench_models("synthetic Llama 0.6B (hidden 2048, 8 blocks, vocabulary 49152)", synthetic, bandwidths,
                         rounds, steps, args.quick,
                         gguf_variants(synthetic, Path(folder), tokenizer=smol.tokenizer, package=False))


if __name__ == "__main__":
    main()
