"""Batch-1 decode speed on CPU: FP32, BF16, netshrink INT8 and INT4 (g128) against the memory-bandwidth floor.

At batch 1 every weight byte is read once per token, so tokens/s <= bandwidth / weight bytes. The script measures
this machine's read bandwidth, then for each variant (interleaved rounds, median) the decode time per token with a
KV cache, the bytes it reads, and the share of its floor it reaches. Models: SmolLM2-135M and a synthetic
Llama of ~0.5 B parameters (random weights: speed does not depend on them), where weight reading dominates the
per-layer Python overhead. Plus single Linears (4096x4096 and SmolLM2's shapes): the kernels alone.

The packed variants pack the LM head too (`pack_lm_head`): see `variants`.

    .venv/bin/python benchmarks/bench_llm_decode.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from netshrink.llm import RTN, PackedLinear, compress_llm, pack_lm_head, quantize_weight
from netshrink.llm.bandwidth import floor_tokens_per_s, measure_bandwidth, weight_bytes_per_token


def variants(model, quick: bool) -> dict[str, torch.nn.Module]:
    """FP32, BF16, and netshrink INT8 / INT4 g128 blocks; the packed variants also pack the LM head (INT8 per
    channel: a tied 49152x576 FP32 head alone reads 113 MB a token, more than SmolLM2's 30 INT4 blocks)."""
    out = {"FP32": model, "BF16": copy.deepcopy(model).to(torch.bfloat16)}
    out["INT8 per-channel"] = pack_lm_head(compress_llm(model, RTN(8, None, symmetric=True), pack=True), 8)
    int4 = compress_llm(model, RTN(4, 128), pack=True)
    if not quick:
        out["INT4 g128, FP32 head"] = copy.deepcopy(int4)
        out["INT4 g128 + INT4 g128 head"] = pack_lm_head(copy.deepcopy(int4), 4, 128)
    out["INT4 g128 + INT8 head"] = pack_lm_head(int4, 8)
    return out


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


def bench_models(name: str, model, bandwidth: float, rounds: int, steps: int, quick: bool) -> None:
    vs = variants(model, quick)
    for m in vs.values():
        step_time(m, 2)  # builds kernel layouts, warms caches
    times: dict[str, list[float]] = {k: [] for k in vs}
    for _ in range(rounds):
        for k, m in vs.items():
            times[k].append(step_time(m, steps))
    base = statistics.median(times["FP32"])
    print(f"\n### {name} (bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads)\n")
    print("| variant | weight MB/token | tokens/s | floor tokens/s | % of floor | speed-up vs FP32 |")
    print("|---|---|---|---|---|---|")
    for k, m in vs.items():
        t = statistics.median(times[k])
        wb = weight_bytes_per_token(m)
        floor = floor_tokens_per_s(wb, bandwidth)
        print(f"| {k} | {wb / 1e6:.1f} | {1 / t:.1f} | {floor:.1f} | {100 / t / floor:.0f}% | {base / t:.2f}x |")


@torch.inference_mode()
def bench_linear(n: int, k: int, bandwidth: float, rounds: int) -> None:
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
    print(f"\n### one {n}x{k} Linear, batch 1 (FP32 activations in and out for the packed layers)\n")
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, steps = (2, 8) if args.quick else (5, 32)
    bandwidth = measure_bandwidth(256 if args.quick else 1024)
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    shapes = [(4096, 4096), (1536, 576), (49152, 576)]  # a 7B-class square, SmolLM2's up_proj and its head
    if not args.quick:
        shapes += [(576, 576), (576, 1536)]
    for n, k in shapes:
        bench_linear(n, k, bandwidth, rounds)
    from netshrink.zoo import load
    bench_models("SmolLM2-135M", load("smollm2").model, bandwidth, rounds, steps, args.quick)
    if not args.quick:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
        bench_models("synthetic Llama 0.5B (hidden 2048, 8 blocks)", LlamaForCausalLM(cfg).eval(), bandwidth,
                     rounds, steps, args.quick)


if __name__ == "__main__":
    main()
