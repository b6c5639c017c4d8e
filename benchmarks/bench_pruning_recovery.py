"""Recovery study: how close can distillation bring the half-cut all-MiniLM-L6-v2 back to the original?

The cut of bench_pruning_structured.py (50% of the FFN neurons and of the heads removed, spread over the layers by
a measured scan, `activation` importance, bias compensation, least-squares refit of the cut layers), then
distillation from the original on unlabelled real prose: the Lee background
sentences not held out plus the Wikipedia articles of gensim's test dump and Jane Austen's six novels (sentences of
6 to 60 words), with the word-embedding table
frozen (11.7 M of the 17.4 M parameters; training it only overfits). Prints the held-out mean cosine every 150 steps,
then the mean / min cosine on 200 held-out Lee sentences and the human-similarity correlation (gensim lee.cor).
`--passages N` adds N passages of 80 to 180 words (consecutive Wikipedia or Austen sentences, in batches of 16):
the Lee documents that the human ratings compare are 100 to 250 tokens long, longer than any training sentence.
`--pooled` and `--relation` weight the distillation terms on the mean-pooled embeddings (see `Distill`).

    .venv/bin/python benchmarks/bench_pruning_recovery.py [--steps 1500] [--lr 3e-4] [--threads 1] [--uniform]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from bench_pruning_structured import netshrink_minilm_cut, text_batches, unlabelled_sentences  # noqa: E402

from netshrink import zoo  # noqa: E402
from netshrink.data import sentences, similarity_pairs  # noqa: E402
from netshrink.eval import human_similarity  # noqa: E402
from netshrink.eval.embedding import embed  # noqa: E402
from netshrink.sparsity.recovery import Distill, distill  # noqa: E402


def passages(limit: int, seed: int = 0, min_words: int = 80, max_words: int = 180) -> list[str]:
    """Runs of consecutive sentences from gensim's Wikipedia articles and Austen's novels, 80 to 180 words each."""
    import random

    from netshrink.data import wiki_sentences
    from netshrink.data.text import AUSTEN_BOOKS, austen, split_sentences

    sources = [list(wiki_sentences())] + [split_sentences(austen(book)) for book in AUSTEN_BOOKS]
    found = []
    for source in sources:
        run: list[str] = []
        for sentence in source:
            run.append(sentence)
            words = sum(len(s.split()) for s in run)
            if words > max_words:
                run = []
            elif words >= min_words:
                found.append(" ".join(run))
                run = []
    random.Random(seed).shuffle(found)
    return found[:limit]


class Reached(Exception):
    """Raised from the step hook to end distillation once the fidelity criterion is met."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


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
    parser.add_argument("--passages", type=int, default=0, help="add this many 80-180 word passages")
    parser.add_argument("--pooled", type=float, default=0.0, help="weight of the pooled-embedding cosine term")
    parser.add_argument("--relation", type=float, default=0.0, help="weight of the pairwise-similarity term")
    parser.add_argument("--refit-batches", type=int, default=96, help="batches for the least-squares refit (0: none)")
    parser.add_argument("--track-every", type=int, default=0,
                        help="every N steps also print the held-out mean / min cosine (200 sentences) and the human "
                             "Spearman: the whole trajectory, not just the end point")
    parser.add_argument("--stop-at-cosine", type=float, default=None,
                        help="with --track-every: stop at the first tracked step whose held-out mean cosine reaches "
                             "this (a fidelity criterion, decided before training; the human ratings play no part)")
    args = parser.parse_args()
    if args.stop_at_cosine is not None and not args.track_every:
        parser.error("--stop-at-cosine needs --track-every")
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
    if args.passages:
        long = passages(args.passages)
        print(f"+ {len(long)} passages of 80 to 180 words", flush=True)
        batches = batches + text_batches(tok, long, size=16, max_length=256)
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(1)).tolist()
        batches = [batches[i] for i in order]
    probe = embed(original, tok, held_out[:100])
    student, _ = netshrink_minilm_cut(original, tok, lee_train, extra, allocate=not args.uniform,
                                      refit_batches=args.refit_batches, allocation=args.allocation)
    with torch.no_grad():
        cos = torch.cosine_similarity(embed(student, tok, held_out), embed(original, tok, held_out))
    print(f"before distillation: held-out mean / min cosine {cos.mean():.4f} / {cos.min():.4f}", flush=True)
    t0 = time.time()
    if args.track_every:
        with torch.no_grad():
            reference_held_out = embed(original, tok, held_out)
            base_rho = human_similarity(original, tok)["spearman"]

    def watch(step: int, loss: float) -> None:
        if (step + 1) % 150 == 0 or step + 1 == args.steps:
            with torch.no_grad():
                cos = torch.cosine_similarity(embed(student, tok, held_out[:100]), probe).mean().item()
            print(f"step {step + 1}: loss {loss:.4f}, mean cosine {cos:.4f} on 100 held-out, "
                  f"{time.time() - t0:.0f} s", flush=True)
        if args.track_every and ((step + 1) % args.track_every == 0 or step + 1 == args.steps):
            with torch.no_grad():
                cos = torch.cosine_similarity(embed(student, tok, held_out), reference_held_out)
                rho = human_similarity(student, tok)["spearman"]
            print(f"  track {step + 1}: held-out mean / min cosine {cos.mean():.4f} / {cos.min():.4f}, human "
                  f"Spearman {rho:.4f} ({rho - base_rho:+.4f})", flush=True)
            if args.stop_at_cosine is not None and cos.mean().item() >= args.stop_at_cosine:
                raise Reached(step + 1)

    config = Distill(steps=args.steps, lr=args.lr, warmup=args.warmup, cache_teacher=False,
                     frozen=("*word_embeddings*",), pooled_weight=args.pooled, relation_weight=args.relation)
    with torch.enable_grad():
        try:
            distill(student, original, batches, config, on_step=watch)
        except Reached as reached:
            print(f"stopped after step {reached.step} of {args.steps}: held-out mean cosine reached "
                  f"{args.stop_at_cosine}", flush=True)
    with torch.no_grad():
        cos = torch.cosine_similarity(embed(student, tok, held_out), embed(original, tok, held_out))
        mine, base = human_similarity(student, tok), human_similarity(original, tok)
    print(f"\nheld-out mean / min cosine: {cos.mean():.4f} / {cos.min():.4f}")
    print(f"human similarity Spearman {mine['spearman']:.4f} (original {base['spearman']:.4f}, "
          f"{mine['spearman'] - base['spearman']:+.4f}); Pearson {mine['pearson']:.4f} (original {base['pearson']:.4f})")
    docs, _ = similarity_pairs()
    with torch.no_grad():
        mine_docs, base_docs = embed(student, tok, docs, max_length=256), embed(original, tok, docs, max_length=256)
    upper = torch.triu_indices(len(docs), len(docs), offset=1)
    sims = [(F.normalize(e, dim=-1) @ F.normalize(e, dim=-1).T)[upper[0], upper[1]] for e in (mine_docs, base_docs)]
    print(f"the {len(docs)} Lee documents: mean / min cosine to the original's embeddings "
          f"{F.cosine_similarity(mine_docs, base_docs).mean():.4f} / {F.cosine_similarity(mine_docs, base_docs).min():.4f}; "
          f"Spearman of their {len(sims[0])} pairwise similarities with the original's {spearmanr(*sims)[0]:.4f}")


if __name__ == "__main__":
    main()
