"""Quality of LLM compression methods on SmolLM2-135M: perplexity on real prose and greedy agreement with FP32.

Calibration: random windows of Jane Austen's *Emma*; evaluation: *Pride and Prejudice* and gensim's
lee_background.cor (disjoint from calibration). One process, every method on the same model and data.

    .venv/bin/python benchmarks/bench_llm_quality.py            # full table (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/bench_llm_quality.py --quick    # smoke check: 3 methods, small eval
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import time

import torch

from netshrink.data.text import austen, prose
from netshrink.llm import AWQ, GPTQ, RTN, Magnitude, SmoothQuant, SparseGPT, Wanda, compress_llm
from netshrink.llm.evaluate import greedy_agreement
from netshrink.eval.perplexity import perplexity
from netshrink.zoo import load

PROMPTS = ["It is a truth universally acknowledged that", "The bushfires near Sydney",
           "Once upon a time, in a small village,", "The most important lesson I learned"]


def configs(quick: bool) -> list[tuple[str, object]]:
    if quick:
        return [("RTN W4 g128", RTN(4, 128)), ("GPTQ W4 g128", GPTQ(4, 128)), ("Wanda 50%", Wanda(0.5))]
    rows = []
    for label, g, bits in (("W4 per-channel", None, 4), ("W4 g128", 128, 4), ("W3 g128", 128, 3)):
        rows += [(f"RTN {label}", RTN(bits, g)), (f"GPTQ {label}", GPTQ(bits, g)), (f"AWQ {label}", AWQ(bits, g))]
    rows.append(("SmoothQuant W8A8 a=0.5", SmoothQuant(0.5)))
    for label, kw in (("50%", dict(sparsity=0.5)), ("2:4", dict(pattern="2:4"))):
        rows += [(f"magnitude {label}", Magnitude(**kw)), (f"Wanda {label}", Wanda(**kw)),
                 (f"SparseGPT {label}", SparseGPT(**kw))]
    rows.append(("SparseGPT 50% + W4 g128", SparseGPT(0.5, bits=4, group_size=128)))
    return rows


def peer_gptq_status() -> str:
    """Which peer GPTQ implementation is importable here (they are optional; see docs/llm.md for why none is)."""
    for mod in ("gptqmodel", "llmcompressor", "neural_compressor"):
        if importlib.util.find_spec(mod) is not None:
            return mod
    return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--eval-tokens", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    n_samples = args.samples or (8 if args.quick else 64)
    seq_len = args.seq_len or (256 if args.quick else 512)
    eval_tokens = args.eval_tokens or (1024 if args.quick else 4096)
    zm = load("smollm2")
    model, tok = zm.model, zm.tokenizer
    texts = {"austen": prose("austen"), "lee": prose("lee")}
    calib = austen("emma")

    def score(m) -> dict[str, float]:
        row = {f"ppl_{k}": perplexity(m, tok, t, max_length=512, stride=256, max_tokens=eval_tokens)["perplexity"]
               for k, t in texts.items()}
        if not args.quick:
            row.update(greedy_agreement(m, model, tok, PROMPTS, new_tokens=32))
        return row

    results = [("FP32", score(model), 0.0)]
    print(f"FP32: {results[0][1]}", flush=True)
    for label, config in configs(args.quick):
        t0 = time.perf_counter()
        compressed = compress_llm(model, config, calib, tokenizer=tok, n_samples=n_samples, seq_len=seq_len)
        seconds = time.perf_counter() - t0
        results.append((label, score(compressed), seconds))
        print(f"{label}: {results[-1][1]} ({seconds:.0f} s)", flush=True)
        del compressed
    peer = peer_gptq_status()
    base = results[0][1]
    print(f"\ncalibration: {n_samples} x {seq_len} tokens of Emma; eval: {eval_tokens} tokens each; "
          f"peer GPTQ: {peer or 'none installed (see docs/llm.md)'}\n")
    cols = ["ppl_austen", "ppl_lee"] + ([] if args.quick else ["agreement", "matching_prefix"])
    print("| method | " + " | ".join(cols) + " | ppl_austen / FP32 | compress s |")
    print("|---" * (len(cols) + 3) + "|")
    for label, row, seconds in results:
        cells = " | ".join(f"{row[c]:.3f}" for c in cols)
        print(f"| {label} | {cells} | {row['ppl_austen'] / base['ppl_austen']:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
