"""Structured pruning with physical removal, side by side with Torch-Pruning and torch.nn.utils.prune.

all-MiniLM-L6-v2 with 50% of FFN neurons and half the attention heads removed, and the digit CNN with 50% of
filters removed: latency against the unpruned model at batch 1 and 32, FLOPs, and quality before and after
recovery by distillation from the original (unlabelled real text: gensim's lee_background.cor sentences;
unlabelled digit images). torch.nn.utils.prune only masks, so it shows what masking alone buys.

Run: .venv/bin/python benchmarks/bench_pruning_structured.py [--quick] [--steps N] [--threads T]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.utils.prune as tprune
from torch import nn

from netshrink import zoo
from netshrink.bench import compare, count_flops
from netshrink.data import digits, sentences
from netshrink.eval import embed, embedding_fidelity, human_similarity
from netshrink.sparsity import (Distill, Structured, allocate_groups, distill, prune_, reconstruct_, scan_groups,
                                structured_prune)


def torch_pruning_minilm(encoder: nn.Module, inputs: tuple) -> nn.Module:
    """Torch-Pruning's MetaPruner on the same setting: 50% of FFN neurons and of heads, hidden size kept."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = copy.deepcopy(encoder)
    bert = model.backbone
    heads = {}
    for m in bert.modules():
        if isinstance(m, BertSelfAttention):
            heads[m.query] = heads[m.key] = heads[m.value] = m.num_attention_heads
    ignored = [bert.pooler, bert.embeddings] + [m for m in bert.modules() if isinstance(m, nn.LayerNorm)]
    pruner = tp.pruner.MetaPruner(bert, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=ignored, num_heads=heads, prune_head_dims=False,
                                  prune_num_heads=True, head_pruning_ratio=0.5,
                                  output_transform=lambda out: out.last_hidden_state.sum())
    pruner.step()
    for m in bert.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
    return model.eval()


def torch_pruning_cnn(model: nn.Module, inputs: tuple) -> nn.Module:
    """Torch-Pruning's MetaPruner removing 50% of channels (the classifier output kept)."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(model, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[model.fc_layers[2]])
    pruner.step()
    return model.eval()


def masked_with_torch_prune(model: nn.Module, config: Structured, inputs: tuple | None = None,
                            calibration: list | None = None) -> nn.Module:
    """torch.nn.utils.prune.custom_from_mask with exactly the units netshrink cuts (and the same bias
    compensation): same outputs as the cut model before recovery, same shapes as the original."""
    from netshrink.sparsity.masks import get_mask, make_permanent, masked_modules

    twin = prune_(model, dataclasses.replace(config, physical=False), example_inputs=inputs, calibration=calibration)
    masks = {(name, t): get_mask(module, t).clone() for name, module in masked_modules(twin).items()
             for t in ("weight", "bias") if get_mask(module, t) is not None}
    out = make_permanent(twin)
    for (name, tensor), mask in masks.items():
        tprune.custom_from_mask(out.get_submodule(name), tensor, mask)
    return out.eval()


def text_batches(tok, texts: list[str], size: int = 32, seed: int = 0,
                 max_length: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sentences grouped by length (little padding), batches in a fixed shuffled order."""
    texts = sorted(texts, key=len)
    batches = []
    for i in range(0, len(texts), size):
        enc = tok(texts[i:i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"]))
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order]


def austen_sentences(limit: int, seed: int = 0) -> list[str]:
    """Sentences of 6 to 60 words from Jane Austen's six novels (Debian r-cran-janeaustenr), shuffled."""
    import random

    from netshrink.data.text import AUSTEN_BOOKS, austen, split_sentences

    found = [s for book in AUSTEN_BOOKS for s in split_sentences(austen(book)) if 6 <= len(s.split()) <= 60]
    random.Random(seed).shuffle(found)
    return found[:limit]


def unlabelled_sentences(limit: int, seed: int = 0) -> list[str]:
    """Unlabelled training text for distillation: gensim's Wikipedia articles plus Jane Austen, shuffled."""
    import random

    from netshrink.data import wiki_sentences

    found = list(wiki_sentences()) + austen_sentences(10 ** 6)
    random.Random(seed).shuffle(found)
    return found[:limit]


def netshrink_minilm_cut(original: nn.Module, tok, lee_train: list[str], extra: list[str], allocate: bool = True,
                         refit_batches: int = 96, allocation: str | None = None,
                         ratios: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
                         ) -> tuple[nn.Module, Structured]:
    """netshrink's half cut of MiniLM: 50% of FFN neurons and of heads overall, spread over layers by a measured
    scan (`scan_groups` with the refit + `allocate_groups`), activation importance, bias compensation, then a
    least-squares refit of each cut layer against the original (`reconstruct_`).

    allocation: a JSON file with the per-group ratios; read if it exists, else written after the scan.
    Returns the cut and the config (for a masked twin)."""
    import json

    config = Structured(ratio=0.5, head_ratio=0.5, importance="activation", compensate=True)
    calibration = text_batches(tok, lee_train)[:16]
    if allocate and allocation and Path(allocation).exists():
        per_group = json.loads(Path(allocation).read_text())
        print(f"  allocation read from {allocation}", flush=True)
    elif allocate:
        val = lee_train[-128:]
        with torch.no_grad():
            ref = embed(original, tok, val)

            def evaluate(m: nn.Module) -> float:
                return float(torch.cosine_similarity(embed(m, tok, val), ref).mean())

            t = time.time()
            scans = scan_groups(original, dataclasses.replace(config, reconstruct=True), evaluate,
                                ratios=ratios, calibration=calibration)
            per_group = allocate_groups(scans, config)
        print(f"  scan of {len(scans)} groups x {len(ratios)} ratios, each cut alone and refitted: "
              f"{time.time() - t:.0f} s; "
              "quality lost (1 - mean cosine on 128 training sentences) per ratio:", flush=True)
        for scan in scans:
            print(f"    {scan.name}: " + " ".join(f"{x:.3f}" for x in scan.loss), flush=True)
        if allocation:
            Path(allocation).write_text(json.dumps(per_group, indent=1))
    if allocate:
        print("  allocation: " + ", ".join(f"{k.replace('backbone.encoder.layer.', 'L')}={v:g}"
                                           for k, v in per_group.items()), flush=True)
        config = dataclasses.replace(config, per_group=per_group)
    cut = prune_(original, config, calibration=calibration)
    if refit_batches:
        t = time.time()
        reconstruct_(cut, original, text_batches(tok, lee_train + extra[:4000])[:refit_batches])
        print(f"  least-squares refit of the 12 cut layers: {time.time() - t:.0f} s", flush=True)
    return cut.eval(), config


def latency_rows(variants: dict[str, nn.Module], inputs: tuple, rounds: int, threads: int | None, batch: int):
    calls = {name: (lambda m=m: m(*inputs)) for name, m in variants.items()}
    return compare(calls, baseline=next(iter(variants)), rounds=rounds, calls_per_round=1, warmup=1,
                   num_threads=threads, batch=batch)


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def minilm_section(args: argparse.Namespace) -> str:
    entry = zoo.load("minilm")
    original, tok = entry.model.eval(), entry.tokenizer
    pool = sentences()
    held_out = pool[-200:]
    train = pool[: len(pool) - 200][: 640 if args.quick else None]
    extra = unlabelled_sentences(200 if args.quick else 50000)
    batches = text_batches(tok, train + extra)
    steps = args.steps or (20 if args.quick else 800)
    tiny = entry.example_inputs(batch=2, seq_len=32)

    calibration = text_batches(tok, train)[:16]
    pruned, config = netshrink_minilm_cut(original, tok, train, extra, allocate=not args.uniform,
                                          refit_batches=8 if args.quick else 96, allocation=args.allocation,
                                          **({"ratios": (0.25, 0.5, 0.75)} if args.quick else {}))
    recovered = copy.deepcopy(pruned)
    torch.set_num_threads(args.train_threads)
    t0 = time.time()
    probe = held_out[:100]
    probe_ref = embed(original, tok, probe)
    trajectory = [(0, float(torch.cosine_similarity(embed(recovered, tok, probe), probe_ref).mean()))]
    paused = [0.0]

    def watch(step: int, _loss: float) -> None:
        if (step + 1) % max(1, steps // 8) == 0 or step + 1 == steps:
            t = time.time()
            cos = float(torch.cosine_similarity(embed(recovered, tok, probe), probe_ref).mean())
            trajectory.append((step + 1, cos))
            paused[0] += time.time() - t
            print(f"  distillation step {step + 1}: mean cosine {cos:.4f} on 100 held-out sentences", flush=True)

    distill(recovered, original, batches, Distill(steps=steps, lr=args.lr, warmup=0.05, cache_teacher=False,
                                                          frozen=("*word_embeddings*",)),
            on_step=watch)
    recovery_s = time.time() - t0 - paused[0]
    tp_model = torch_pruning_minilm(original, tiny)
    tp_recovered = None
    if args.tp_recovery:
        tp_recovered = copy.deepcopy(tp_model)
        distill(tp_recovered, original, batches, Distill(steps=steps, lr=args.lr, warmup=0.05, cache_teacher=False,
                                                          frozen=("*word_embeddings*",)))
    masked = masked_with_torch_prune(original, config, calibration=calibration)
    variants = {"original": original, "netshrink cut": pruned, "netshrink cut + distilled": recovered,
                "Torch-Pruning": tp_model}
    if tp_recovered is not None:
        variants["Torch-Pruning + our distillation"] = tp_recovered
    variants["same units masked (torch.nn.utils.prune)"] = masked

    base_h = human_similarity(original, tok)
    quality = {}
    for name, m in variants.items():
        fid = embedding_fidelity(m, original, tok, held_out)
        hs = human_similarity(m, tok) if name != "original" else base_h
        quality[name] = (fid["mean_cosine"], fid["min_cosine"], hs["pearson"], hs["spearman"])
        print(f"  quality of {name}: mean cosine {fid['mean_cosine']:.4f}, human spearman {hs['spearman']:.4f} "
              f"(original {base_h['spearman']:.4f})", flush=True)
    out = [f"### all-MiniLM-L6-v2: 50% of the FFN neurons and 36 of the 72 heads removed\n",
           f"netshrink: {'uniform' if args.uniform else 'per-layer budget from a measured scan'}, activation "
           f"importance on {len(calibration)} calibration batches, bias compensation, least-squares refit\n",
           f"recovery: {steps} distillation steps (batch 32, lr {args.lr}, word embeddings frozen) on {len(train)} "
           f"lee_background + {len(extra)} Wikipedia and Austen sentences, "
           f"{recovery_s / 60:.1f} min on {args.train_threads} thread(s); fidelity on {len(held_out)} held-out "
           "sentences; human similarity = gensim lee.cor ratings\n",
           "recovery trajectory (step: mean cosine on 100 held-out sentences): "
           + ", ".join(f"{k}: {c:.3f}" for k, c in trajectory) + "\n"]
    seq = 128
    flops = {}
    for batch in (1, 32):
        inputs = entry.example_inputs(batch=batch, seq_len=seq)
        if batch == 32:
            flops = {n: count_flops(m, inputs)["flops"] for n, m in variants.items()}
        rows = latency_rows(variants, inputs, args.rounds, args.threads, batch)
        out.append(f"\nlatency, batch {batch}, {seq} tokens:\n")
        out.append(table(["variant", "median ms", "speedup"],
                         [[r.name, f"{r.stats.median_ms:.1f}", f"{r.speedup:.2f}x"] for r in rows]))
        if batch == 32:
            speed = {r.name: r.speedup for r in rows}
    out.append("\nquality and cost:\n")
    rows = []
    for name in variants:
        cos, cmin, pear, spear = quality[name]
        reduction = flops["original"] / flops[name]
        rows.append([name, f"{cos:.4f}", f"{cmin:.4f}", f"{pear:.4f}", f"{spear:.4f}", f"{spear - base_h['spearman']:+.4f}",
                     f"{flops[name] / 1e9:.1f}", f"{reduction:.2f}x", f"{speed[name]:.2f}x",
                     "yes" if speed[name] >= 0.8 * reduction else "no"])
    out.append(table(["variant", "mean cos", "min cos", "human pearson", "human spearman", "spearman vs orig",
                      "GFLOPs (b32)", "FLOP reduction", "speedup b32", ">= 0.8 x FLOP red."], rows))
    return "\n".join(out)


def cnn_section(args: argparse.Namespace) -> str:
    entry = zoo.load("digit-cnn")
    original = entry.model.eval()
    xtr, _ = digits("train")
    xte, yte = digits("test")
    steps = args.steps or (20 if args.quick else 600)
    batches = [(xtr[i:i + 64],) for i in range(0, len(xtr), 64)]
    config = Structured(ratio=0.5, importance=args.importance)
    pruned = structured_prune(original, 0.5, importance=args.importance, example_inputs=(xte[:2],),
                              calibration=batches[:4])
    recovered = copy.deepcopy(pruned)
    torch.set_num_threads(args.train_threads)
    distill(recovered, original, batches, Distill(steps=steps, lr=1e-3))
    tp_model = torch_pruning_cnn(original, (xte[:2],))
    masked = masked_with_torch_prune(original, config, (xte[:2],), calibration=batches[:4])
    variants = {"original": original, "netshrink cut": pruned, "netshrink cut + distilled": recovered,
                "Torch-Pruning": tp_model, "same units masked (torch.nn.utils.prune)": masked}
    with torch.no_grad():
        acc = {n: float((m(xte).argmax(1) == yte).float().mean()) for n, m in variants.items()}
    out = [f"### digit CNN: 50% of filters / neurons removed\n",
           f"recovery: {steps} distillation steps on unlabelled sklearn digits (train split); accuracy on the "
           f"{len(xte)}-image test split\n"]
    for batch in (1, 32):
        inputs = entry.example_inputs(batch=batch)
        if batch == 32:
            flops = {n: count_flops(m, inputs)["flops"] for n, m in variants.items()}
        rows = latency_rows(variants, inputs, args.rounds * 4, args.threads, batch)
        out.append(f"\nlatency, batch {batch}:\n")
        out.append(table(["variant", "median ms", "speedup"],
                         [[r.name, f"{r.stats.median_ms:.3f}", f"{r.speedup:.2f}x"] for r in rows]))
        if batch == 32:
            speed = {r.name: r.speedup for r in rows}
    runtime_ms: dict = {}
    timed = ["original", "netshrink cut + distilled", "Torch-Pruning"]
    ort_speed = onnxruntime_rows(variants, timed, entry, args, out, runtime_ms)
    from netshrink.native.cnn import native_available

    if native_available():
        native_rows(variants, timed, entry, args, runtime_ms)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in variants.items()}
    out.append("\nquality and cost:\n")
    out.append(table(["variant", "accuracy", "params", "MFLOPs (b32)", "FLOP reduction", "speedup b32",
                      ">= 0.8 x FLOP red."],
                     [[n, f"{acc[n]:.4f}", f"{params[n]:,}", f"{flops[n] / 1e6:.1f}",
                       f"{flops['original'] / flops[n]:.2f}x", f"{speed[n]:.2f}x",
                       "yes" if speed[n] >= 0.8 * flops["original"] / flops[n] else "no"] for n in variants]))
    out.append("\nin onnxruntime (each model exported to ONNX, FP32, IO binding), speedup against the original "
               "there: both at 2 threads, both at 1 thread, and each model at its fastest thread count:\n")
    modes = (("same", "2 threads"), ("one", "1 thread"), ("fastest", "fastest threads"))
    red = {n: flops["original"] / flops[n] for n in ort_speed[("same", 32)]}
    out.append(table(["variant", "FLOP reduction"] + [f"{label} b1 / b32" for _, label in modes]
                     + [">= 0.8 x FLOP red. at b1 and b32 (" + " / ".join(label for _, label in modes) + ")"],
                     [[n, f"{red[n]:.2f}x"]
                      + [f"{ort_speed[(m, 1)][n]:.2f}x / {ort_speed[(m, 32)][n]:.2f}x" for m, _ in modes]
                      + [" / ".join("yes" if min(ort_speed[(m, 1)][n], ort_speed[(m, 32)][n]) >= 0.8 * red[n] else "no"
                                    for m, _ in modes)] for n in red]))
    if any(r == "NativeCNN" for r, *_ in runtime_ms):
        out.append("\nonnxruntime and netshrink's NativeCNN (`netshrink.native.cnn`: the whole forward in one native "
                   "call, an OpenMP team splitting each layer at batch 1), same timing protocol; latency in ms:\n")
        out.append(runtime_table(runtime_ms, timed, red, args.threads))
    return "\n".join(out)


def block_medians(keys: list[tuple[str, int]], runner, rounds: int) -> dict[tuple[str, int], float]:
    """Median ms per (model, threads) key: `runner(name, threads)` builds a call, which gets 3 warm-up calls and 50
    timed ones, then is dropped (so it is the only runtime alive while timed); keys in a rotating order per round."""
    times: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    for round_index in range(rounds):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            run = runner(*key)
            for _ in range(3):
                run()
            for _ in range(50):
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
            del run
    return {key: statistics.median(ts) * 1e3 for key, ts in times.items()}


def onnxruntime_rows(variants: dict[str, nn.Module], names: list[str], entry, args: argparse.Namespace,
                     out: list[str], medians: dict | None = None) -> dict[tuple[str, int], dict[str, float]]:
    """Export each named variant to ONNX (FP32) and time it in onnxruntime at batch 1 and 32.

    A 0.1 ms CNN forward in eager PyTorch is mostly per-op dispatch; onnxruntime's lower per-op cost is how such a
    model would be deployed, and shows how much of the FLOP reduction the cut turns into speed. Each model runs
    through IO binding (inputs bound once, outputs into buffers allocated once: `bound_runner`) with 1 and with
    `--threads` intra-op threads. Returned speedups: each model at its fastest of those thread counts against the
    original at its fastest (a 20 us model gains nothing from a second thread; a deployment picks per model).

    Each (model, thread count) is timed in blocks of 50 calls with its session the only one alive, the blocks in a
    rotating order over `--rounds` rounds: after a run, an onnxruntime session's worker threads spin-wait for more
    work, and other live sessions' spinning threads take the second core. Interleaving every 5 calls with all
    sessions alive measured the original at 2 threads at 82 us / 2.06 ms (b1 / b32) against 68 us / 1.18 ms alone,
    which inflated the 2-thread speedups of the cut models."""
    import tempfile

    from netshrink.export.onnx import bound_runner, export_onnx, session

    folder = Path(tempfile.mkdtemp(prefix="bench_structured_ort_"))
    paths = {}
    for name in names:
        paths[name] = folder / f"{len(paths)}.onnx"
        export_onnx(variants[name], paths[name], "fp32", example_inputs=entry.example_inputs(batch=2))
    counts = sorted({1, args.threads or torch.get_num_threads()})
    speed: dict[tuple[str, int], dict[str, float]] = {}
    for batch in (1, 32):
        x = entry.example_inputs(batch=batch)[0].numpy()
        keys = [(name, threads) for name in names for threads in counts]

        def runner(name: str, threads: int):
            sess = session(str(paths[name]), threads=threads)      # the only session alive while it is timed
            return bound_runner(sess, {sess.get_inputs()[0].name: x})

        median = block_medians(keys, runner, args.rounds)
        if medians is not None:
            medians.update({("onnxruntime", n, t, batch): ms for (n, t), ms in median.items()})
        best = {n: min(counts, key=lambda t: median[(n, t)]) for n in names}
        base_same, base_best = median[(names[0], counts[-1])], median[(names[0], best[names[0]])]
        out.append(f"\nonnxruntime latency (IO binding), batch {batch}:\n")
        out.append(table(["variant", "intra-op threads", "median ms", f"speedup at {counts[-1]} threads",
                          "fastest thread count"],
                         [[n, str(t), f"{median[(n, t)]:.4f}",
                           f"{base_same / median[(n, t)]:.2f}x" if t == counts[-1] else "",
                           "yes" if best[n] == t else ""] for (n, t) in keys]))
        speed[("fastest", batch)] = {n: base_best / median[(n, best[n])] for n in names}
        speed[("same", batch)] = {n: base_same / median[(n, counts[-1])] for n in names}
        speed[("one", batch)] = {n: median[(names[0], 1)] / median[(n, 1)] for n in names}
    return speed


def native_rows(variants: dict[str, nn.Module], names: list[str], entry, args: argparse.Namespace,
                medians: dict) -> None:
    """Time each named variant through netshrink's NativeCNN (the whole forward in one native call) at batch 1 and
    32, 1 and `--threads` threads, with the same protocol as `onnxruntime_rows`: blocks of 50 calls per (model,
    threads), the only runtime alive, in a rotating order over `--rounds` rounds. Fills `medians` (ms)."""
    from netshrink.native.cnn import NativeCNN

    counts = sorted({1, args.threads or torch.get_num_threads()})
    for batch in (1, 32):
        x = entry.example_inputs(batch=batch)[0]
        keys = [(name, threads) for name in names for threads in counts]
        median = block_medians(keys, lambda name, threads: partial(NativeCNN(variants[name], entry.input_shape,
                                                                             threads=threads), x), args.rounds)
        medians.update({("NativeCNN", n, t, batch): ms for (n, t), ms in median.items()})


def runtime_table(medians: dict, names: list[str], flop_red: dict[str, float], threads: int) -> str:
    """Latency per (runtime, threads) and the speedups against the original: in each runtime at `threads`, and each
    model at its fastest runtime and thread count against the original at its fastest."""
    runtimes = sorted({r for r, *_ in medians})
    rows = []
    for batch in (1, 32):
        best = {n: min((ms, r, t) for (r, m, t, b), ms in medians.items() if m == n and b == batch) for n in names}
        for n in names:
            cells = [f"{medians[(r, n, t, batch)]:.4f}" for r in runtimes for t in sorted({1, threads})]
            same = [f"{medians[(r, names[0], threads, batch)] / medians[(r, n, threads, batch)]:.2f}x" for r in runtimes]
            fastest = best[names[0]][0] / best[n][0]
            rows.append([str(batch), n, f"{flop_red[n]:.2f}x"] + cells + same
                        + [f"{fastest:.2f}x ({best[n][1]}, {best[n][2]} thr.)",
                           "yes" if fastest >= 0.8 * flop_red[n] else "no"])
    head = ["batch", "variant", "FLOP reduction"] + [f"{r} {t} thr. ms" for r in runtimes for t in sorted({1, threads})] \
        + [f"speedup {r} {threads} thr." for r in runtimes] + ["speedup, each at its fastest", ">= 0.8 x FLOP red."]
    return table(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, few timing rounds")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default 800 MiniLM, 600 CNN)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--importance", default="activation",
                        help="structured importance (activation, l1, l2, group_l2, random)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="threads for latency (default: torch's)")
    parser.add_argument("--train-threads", type=int, default=1)
    parser.add_argument("--only", choices=("minilm", "cnn"), default=None)
    parser.add_argument("--tp-recovery", action="store_true", help="also distil Torch-Pruning's model (doubles time)")
    parser.add_argument("--uniform", action="store_true", help="MiniLM: the same share in every layer (no scan)")
    parser.add_argument("--allocation", default=None, help="MiniLM: JSON of per-group ratios (read, or written after "
                        "the scan)")
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 10)
    threads = args.threads or torch.get_num_threads()
    args.threads = threads
    print(f"## Structured pruning benchmark (latency threads: {threads})\n")
    if args.only in (None, "cnn"):
        print(cnn_section(args), flush=True)
        print()
    if args.only in (None, "minilm"):
        print(minilm_section(args), flush=True)


if __name__ == "__main__":
    main()
