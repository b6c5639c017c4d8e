"""Quality versus unstructured sparsity (10..95%) for global magnitude, layer-adaptive allocation (sensitivity
scan), LAMP and N:M on the digit CNN and all-MiniLM-L6-v2, plus the CPU latency of the CSR kernel against
dense at each sparsity. One-shot pruning, no fine-tuning: these curves show what each allocation preserves.

Run: .venv/bin/python benchmarks/bench_pruning_curves.py [--quick] [--plot-dir DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from netshrink import zoo
from netshrink.data import digits, sentences
from netshrink.eval import embed
from netshrink.sparsity import (NM, Magnitude, allocate_from_sensitivity, lamp_allocation, plot_sensitivity, prune_,
                                sensitivity_scan)
from netshrink.sparsity.magnitude import lowest_k_mask
from netshrink.sparsity.sparse_linear import SparseLinear, time_pair

SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
SCAN_GRID = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def curves(model, evaluate, scan_evaluate, sparsities, metric, exclude=(), plot_path=None, title=""):
    """Rows of quality per method and sparsity; the sensitivity scan uses its own (validation) evaluation."""
    t0 = time.time()
    scan = sensitivity_scan(model, scan_evaluate, SCAN_GRID, exclude=exclude, metric=metric)
    scan_s = time.time() - t0
    if plot_path:
        plot_sensitivity(scan, plot_path, title=title)
    rows = {"global magnitude": [], "layer-wise magnitude (uniform)": [], "layer-adaptive (sensitivity, lagrangian)": [],
            "layer-adaptive (sensitivity, equal drop)": [], "LAMP": []}
    for s in sparsities:
        rows["global magnitude"].append(evaluate(prune_(model, Magnitude(sparsity=s, exclude=exclude))))
        rows["layer-wise magnitude (uniform)"].append(
            evaluate(prune_(model, Magnitude(sparsity=s, scope="layer", exclude=exclude))))
        for method in ("lagrangian", "equal_drop"):
            alloc = allocate_from_sensitivity(scan, s, method=method)
            rows[f"layer-adaptive (sensitivity, {method.replace('_', ' ')})"].append(
                evaluate(prune_(model, Magnitude(per_layer=alloc, exclude=exclude))))
        lamp = lamp_allocation(model, s, exclude=exclude)
        rows["LAMP"].append(evaluate(prune_(model, Magnitude(per_layer=lamp, exclude=exclude))))
    nm = {f"{n}:{m}": evaluate(prune_(model, NM(n, m, exclude=exclude))) for n, m in ((2, 4), (1, 4))}
    return scan, scan_s, rows, nm


def cnn(args) -> str:
    model = zoo.load("digit-cnn").model.eval()
    xv, yv = digits("train", n=500)
    xt, yt = digits("test")

    def acc(x, y):
        def run(m):
            with torch.no_grad():
                return float((m(x).argmax(1) == y).float().mean())
        return run

    sp = SPARSITIES[::2] if args.quick else SPARSITIES
    plot = Path(args.plot_dir) / "sensitivity_digit_cnn.png" if args.plot_dir else None
    scan, scan_s, rows, nm = curves(model, acc(xt, yt), acc(xv, yv), sp, "accuracy", plot_path=plot,
                                    title="digit CNN: accuracy with one layer pruned")
    out = [f"### digit CNN: test accuracy ({len(xt)} images) vs sparsity, one-shot\n",
           f"baseline accuracy {acc(xt, yt)(model):.4f}; sensitivity scan on 500 train-split images took {scan_s:.0f} s\n",
           table(["method"] + [f"{s:.0%}" for s in sp], [[k] + [f"{v:.4f}" for v in vals] for k, vals in rows.items()]),
           "\nN:M: " + ", ".join(f"{k} ({1 - int(k[0]) / int(k[2]):.0%}) -> {v:.4f}" for k, v in nm.items()),
           "\nper-layer sensitivity (accuracy with only this layer pruned):\n",
           table(["layer", "params"] + [f"{s:.0%}" for s in scan.sparsities],
                 [[n, str(scan.sizes[n])] + [f"{q:.3f}" for q in scan.quality[n]] for n in scan.quality])]
    alloc = allocate_from_sensitivity(scan, 0.9)
    lamp = lamp_allocation(model, 0.9)
    out.append("\nallocation at 90% overall: " + ", ".join(
        f"{n}: {alloc[n]:.0%} (LAMP {lamp[n]:.0%})" for n in alloc))
    return "\n".join(out)


def minilm(args) -> str:
    entry = zoo.load("minilm")
    model, tok = entry.model.eval(), entry.tokenizer
    pool = sentences()
    test_s, val_s = pool[-200:], pool[-400:-200][:64]
    ref_t, ref_v = embed(model, tok, test_s), embed(model, tok, val_s)

    def fidelity(texts, ref):
        def run(m):
            return float(torch.nn.functional.cosine_similarity(embed(m, tok, texts), ref).mean())
        return run

    exclude = ("*pooler*",)  # not used by the sentence embedding
    sp = SPARSITIES[::2] if args.quick else SPARSITIES
    plot = Path(args.plot_dir) / "sensitivity_minilm.png" if args.plot_dir else None
    scan, scan_s, rows, nm = curves(model, fidelity(test_s, ref_t), fidelity(val_s, ref_v), sp, "mean cosine",
                                    exclude=exclude, plot_path=plot, title="MiniLM: fidelity with one layer pruned")
    out = [f"### all-MiniLM-L6-v2: mean cosine to the original's embeddings (200 held-out sentences) vs sparsity\n",
           f"sensitivity scan of {len(scan.quality)} Linear layers on 64 other sentences took {scan_s / 60:.1f} min\n",
           table(["method"] + [f"{s:.0%}" for s in sp], [[k] + [f"{v:.4f}" for v in vals] for k, vals in rows.items()]),
           "\nN:M: " + ", ".join(f"{k} ({1 - int(k[0]) / int(k[2]):.0%}) -> {v:.4f}" for k, v in nm.items())]
    alloc = allocate_from_sensitivity(scan, 0.7)
    by_kind: dict[str, list[float]] = {}
    for n, s in alloc.items():
        by_kind.setdefault(n.split(".")[-1] if "attention" not in n else "attention." + n.split(".")[-1], []).append(s)
    out.append("\nlayer-adaptive allocation at 70%, mean per layer type: " + ", ".join(
        f"{k}: {sum(v) / len(v):.0%}" for k, v in sorted(by_kind.items())))
    by_depth = {}
    for n, s in alloc.items():
        depth = n.split("layer.")[1].split(".")[0]
        by_depth.setdefault(depth, []).append(s)
    out.append("; per encoder layer: " + ", ".join(f"{d}: {sum(v) / len(v):.0%}" for d, v in by_depth.items()))
    return "\n".join(out)


def kernel(args) -> str:
    shapes = [("MiniLM FFN up", 1536, 384), ("MiniLM FFN down", 384, 1536), ("digit CNN fc", 256, 1152)]
    rows_for = {"MiniLM FFN up": (128, 4096), "MiniLM FFN down": (128, 4096), "digit CNN fc": (1, 32)}
    out_rows = []
    sp = SPARSITIES[::2] if args.quick else SPARSITIES + (0.98, 0.99)
    gen = torch.Generator().manual_seed(0)
    any_faster = False
    for label, out_f, in_f in shapes:
        for rows in rows_for[label]:
            x = torch.randn(rows, in_f, generator=gen)
            cells = []
            for s in sp:
                lin = torch.nn.Linear(in_f, out_f)
                with torch.no_grad():
                    lin.weight.mul_(lowest_k_mask(lin.weight.abs(), int(round(s * lin.weight.numel()))))
                csr = SparseLinear(lin)
                with torch.no_grad():
                    d, c = time_pair(lambda: lin(x), lambda: csr(x), rounds=3 if args.quick else 9)
                any_faster |= c * 1.1 <= d
                cells.append(f"{d / c:.2f}x")
            out_rows.append([f"{label} {out_f}x{in_f}", str(rows)] + cells)
    verdict = ("the CSR kernel beats dense (by >= 10%) in some cells above; prepare_sparse_execution uses it only "
               "there" if any_faster else "sparsity brings no speedup on this CPU at any measured sparsity")
    return "\n".join([f"### CPU latency: CSR kernel vs dense Linear (speedup = dense ms / CSR ms, "
                      f"{torch.get_num_threads()} threads)\n",
                      table(["layer", "input rows"] + [f"{s:.0%}" for s in sp], out_rows), "", verdict])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sparsities and timing rounds")
    parser.add_argument("--only", choices=("cnn", "minilm", "kernel"), default=None)
    parser.add_argument("--plot-dir", default=None, help="write the sensitivity plots (PNG) here")
    args = parser.parse_args()
    print("## Unstructured / N:M quality curves and sparse-kernel latency\n")
    for name, fn in (("cnn", cnn), ("kernel", kernel), ("minilm", minilm)):
        if args.only in (None, name):
            print(fn(args), flush=True)
            print()


if __name__ == "__main__":
    main()
