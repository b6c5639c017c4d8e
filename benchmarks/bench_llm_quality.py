"""Quality of LLM compression methods on SmolLM2-135M: perplexity on real prose and greedy agreement with FP32,
plus a peer GPTQ (Intel neural-compressor, when installed) on the same model, calibration and settings.

Calibration: random windows from the second half of gensim's lee_background.cor; evaluation: the first tokens
of its first half and of Jane Austen's *Pride and Prejudice* (both disjoint from calibration). One process,
every method on the same model and data; the peer rows print their wall time next to netshrink's.

    .venv/bin/python benchmarks/bench_llm_quality.py                      # full table (about an hour on 2 cores)
    .venv/bin/python benchmarks/bench_llm_quality.py --only "GPTQ W4 g128" --peer   # netshrink vs peer GPTQ
    .venv/bin/python benchmarks/bench_llm_quality.py --quick              # smoke check: 3 methods, small eval
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
import time

import torch

from netshrink.data.text import prose
from netshrink.eval.perplexity import perplexity
from netshrink.llm import AWQ, GPTQ, RTN, Magnitude, SmoothQuant, SparseGPT, Wanda, calibration_ids, compress_llm
from netshrink.llm.evaluate import greedy_agreement
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


def inc_gptq(model, ids: torch.Tensor, bits: int, group: int, act_order: bool):
    """Intel neural-compressor 3.x weight-only GPTQ (prepare -> calibrate -> convert) on the same token windows.

    Its `static_groups=True` fails on in_features that are not a multiple of the group (576 = 4.5 x 128: "Scale
    shape is mismatched"), so act-order runs with dynamic groups; `model_path` must name an existing folder or it
    tries to download one."""
    from neural_compressor.torch.quantization import GPTQConfig, convert, prepare

    config = GPTQConfig(bits=bits, group_size=group, use_sym=False, act_order=act_order, static_groups=False,
                        percdamp=0.01, block_size=128, true_sequential=True, model_path=tempfile.gettempdir())
    prepared = prepare(copy.deepcopy(model), config)
    with torch.no_grad():
        for row in ids:
            prepared(row[None])
    return convert(prepared)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated labels (substrings) of the rows to run")
    parser.add_argument("--peer", action="store_true", help="also run neural-compressor's GPTQ at W4 g128")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (ppl does not depend on it)")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--eval-tokens", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_samples = args.samples or (8 if args.quick else 32)
    seq_len = args.seq_len or (256 if args.quick else 512)
    eval_tokens = args.eval_tokens or (1024 if args.quick else 4096)
    zm = load("smollm2")
    model, tok = zm.model, zm.tokenizer
    lee = prose("lee")
    half = len(lee) // 2
    texts = {"austen": prose("austen"), "lee": lee[:half]}
    ids = calibration_ids(lee[half:], tok, n_samples, seq_len, seed=0)

    def score(m) -> dict[str, float]:
        row = {f"ppl_{k}": perplexity(m, tok, t, max_length=512, stride=512, max_tokens=eval_tokens)["perplexity"]
               for k, t in texts.items()}
        if not args.quick:
            row.update(greedy_agreement(m, model, tok, PROMPTS, new_tokens=24))
        return row

    results = [("FP32", score(model), 0.0)]
    print(f"FP32: {results[0][1]}", flush=True)
    rows = configs(args.quick)
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        rows = [(label, c) for label, c in rows if any(k in label for k in keys)]
    for label, config in rows:
        t0 = time.perf_counter()
        compressed = compress_llm(model, config, ids, batch_size=8)
        seconds = time.perf_counter() - t0
        results.append((label, score(compressed), seconds))
        print(f"{label}: {results[-1][1]} ({seconds:.0f} s)", flush=True)
        del compressed
    if args.peer:
        if importlib.util.find_spec("neural_compressor") is None:
            print("neural-compressor is not installed: pip install 'neural-compressor[pt]==3.10'")
        else:
            for act_order in (True, False):
                label = f"neural-compressor GPTQ W4 g128{' act-order' if act_order else ''}"
                t0 = time.perf_counter()
                compressed = inc_gptq(model, ids, 4, 128, act_order)
                seconds = time.perf_counter() - t0
                results.append((label, score(compressed), seconds))
                print(f"{label}: {results[-1][1]} ({seconds:.0f} s)", flush=True)
                del compressed
                if not act_order:
                    t0 = time.perf_counter()
                    compressed = compress_llm(model, GPTQ(4, 128, act_order=False, static_groups=False), ids)
                    seconds = time.perf_counter() - t0
                    results.append(("GPTQ W4 g128 no act-order", score(compressed), seconds))
                    print(f"{results[-1][0]}: {results[-1][1]} ({seconds:.0f} s)", flush=True)
    base = results[0][1]
    print(f"\ncalibration: {n_samples} x {seq_len} tokens from the second half of lee_background; eval: first "
          f"{eval_tokens} tokens of Pride and Prejudice and of lee_background's first half (windows of 512); "
          f"greedy agreement: {len(PROMPTS)} prompts x 24 tokens\n")
    cols = ["ppl_austen", "ppl_lee"] + ([] if args.quick else ["agreement", "matching_prefix"])
    print("| method | " + " | ".join(cols) + " | ppl_austen / FP32 | compress s |")
    print("|---" * (len(cols) + 3) + "|")
    for label, row, seconds in results:
        cells = " | ".join(f"{row[c]:.3f}" for c in cols)
        print(f"| {label} | {cells} | {row['ppl_austen'] / base['ppl_austen']:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
