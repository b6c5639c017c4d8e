"""Recovery study: how close can distillation bring the half-cut all-MiniLM-L6-v2 back to the original?

The cut of bench_pruning_structured.py (50% of the FFN neurons and of the heads removed, spread over the layers by
a measured scan, `activation` importance, bias compensation, least-squares refit of the cut layers), then
distillation from the original on unlabelled real prose: the Lee background
sentences not held out plus the Wikipedia articles of gensim's test dump and Jane Austen's six novels (sentences of
6 to 60 words), with the word-embedding table
frozen (11.7 M of the 17.4 M parameters; training it only overfits). Prints the held-out mean cosine every 150 steps,
then the mean / min cosine on 200 held-out Lee sentences and the human-similarity correlation (gensim lee.cor).

    .venv/bin/python benchmarks/bench_pruning_recovery.py [--steps 1500] [--lr 3e-4] [--threads 1] [--uniform]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_pruning_structured import netshrink_minilm_cut, text_batches, unlabelled_sentences  # noqa: E402

from netshrink import zoo  # noqa: E402
from netshrink.data import sentences  # noqa: E402
from netshrink.eval import human_similarity  # noqa: E402
from netshrink.eval.embedding import embed  # noqa: E402
from netshrink.sparsity.recovery import Distill, distill  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=float, default=0.05, help="share of the steps with a linear warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", type=int, default=50000,
                        help="at most this many Wikipedia + Austen sentences (0: Lee only)")
    parser.add_argument("--uniform", action="store_true", help="the same share in every layer (no scan)")
    parser.add_argument("--allocation", default=None, help="JSON of per-group ratios (read, or written after the scan)")
    parser.add_argument("--refit-batches", type=int, default=96, help="batches for the least-squares refit (0: none)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    entry = zoo.load("minilm")
    original, tok = entry.model.eval(), entry.tokenizer
    pool = sentences()
    held_out, lee_train = pool[-200:], pool[:-200]
    extra = unlabelled_sentences(args.extra) if args.extra else []
    print(f"training sentences: {len(lee_train)} Lee + {len(extra)} Wikipedia and Austen; "
          f"held out: {len(held_out)} Lee", flush=True)
    batches = text_batches(tok, lee_train + extra)
    probe = embed(original, tok, held_out[:100])
    student, _ = netshrink_minilm_cut(original, tok, lee_train, extra, allocate=not args.uniform,
                                      refit_batches=args.refit_batches, allocation=args.allocation)
    with torch.no_grad():
        cos = torch.cosine_similarity(embed(student, tok, held_out), embed(original, tok, held_out))
    print(f"before distillation: held-out mean / min cosine {cos.mean():.4f} / {cos.min():.4f}", flush=True)
    t0 = time.time()

    def watch(step: int, loss: float) -> None:
        if (step + 1) % 150 == 0 or step + 1 == args.steps:
            with torch.no_grad():
                cos = torch.cosine_similarity(embed(student, tok, held_out[:100]), probe).mean().item()
            print(f"step {step + 1}: loss {loss:.4f}, mean cosine {cos:.4f} on 100 held-out, "
                  f"{time.time() - t0:.0f} s", flush=True)

    config = Distill(steps=args.steps, lr=args.lr, warmup=args.warmup, cache_teacher=False,
                     frozen=("*word_embeddings*",))
    with torch.enable_grad():
        distill(student, original, batches, config, on_step=watch)
    with torch.no_grad():
        cos = torch.cosine_similarity(embed(student, tok, held_out), embed(original, tok, held_out))
        mine, base = human_similarity(student, tok), human_similarity(original, tok)
    print(f"\nheld-out mean / min cosine: {cos.mean():.4f} / {cos.min():.4f}")
    print(f"human similarity Spearman {mine['spearman']:.4f} (original {base['spearman']:.4f}, "
          f"{mine['spearman'] - base['spearman']:+.4f}); Pearson {mine['pearson']:.4f} (original {base['pearson']:.4f})")


if __name__ == "__main__":
    main()
