"""ONNX INT8 of all-MiniLM-L6-v2: netshrink's export against onnxruntime's own `quantize_dynamic`, in one run.

All variants are onnxruntime CPU sessions (2 intra-op threads) over graphs from the same FP32 export, timed
interleaved (round robin) at batch 1 and batch 32 (128 tokens each); quality is the cosine of the sentence
embeddings to the PyTorch FP32 model on real sentences (gensim's lee_background.cor); size is bytes on disk.
Then the size on disk of every export format (netshrink checkpoint, Hugging Face, ONNX schemes, TorchScript, GGUF).

    .venv/bin/python benchmarks/bench_export_onnx_int8.py            # full run (includes SmolLM2 GGUF / HF sizes)
    .venv/bin/python benchmarks/bench_export_onnx_int8.py --quick    # smoke check
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

THREADS = 2


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def embed_onnx(sess, batches) -> np.ndarray:
    return np.concatenate([sess.run(None, {"input_ids": i.numpy(), "attention_mask": m.numpy()})[0] for i, m in batches])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def onnx_int8_comparison(entry, folder: Path, quick: bool) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from netshrink import bench, data
    from netshrink.export.onnx import export_onnx, session

    paths = {"FP32 (netshrink export)": export_onnx(entry, folder / "fp32.onnx").path,
             "INT8 netshrink export": export_onnx(entry, folder / "int8.onnx", scheme="int8-dynamic").path}
    ort_default = folder / "ort-dynamic.onnx"
    quantize_dynamic(str(paths["FP32 (netshrink export)"]), str(ort_default), weight_type=QuantType.QInt8)
    paths["INT8 ORT quantize_dynamic"] = ort_default
    ort_channel = folder / "ort-dynamic-per-channel.onnx"
    quantize_dynamic(str(paths["FP32 (netshrink export)"]), str(ort_channel), weight_type=QuantType.QInt8,
                     per_channel=True)
    paths["INT8 ORT quantize_dynamic per channel"] = ort_channel
    sessions = {name: session(str(p), threads=THREADS) for name, p in paths.items()}

    texts = data.sentences(32 if quick else 256)
    tok = entry.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    batches = [(tok.input_ids[i:i + 32], tok.attention_mask[i:i + 32]) for i in range(0, len(texts), 32)]
    with torch.no_grad():
        reference = np.concatenate([entry.model(i, m).numpy() for i, m in batches])
    quality = {name: cosines(embed_onnx(s, batches), reference) for name, s in sessions.items()}

    rows_by_batch = {}
    for batch in (1, 32):
        ids, mask = entry.example_inputs(batch=batch, seq_len=128)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        variants = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
        rows_by_batch[batch] = bench.compare(variants, rounds=3 if quick else 15, calls_per_round=1 if quick else 3,
                                             num_threads=THREADS, batch=batch)
    lines = ["| variant | batch 1 median ms | speedup | batch 32 median ms | speedup | mean cos | min cos | size |",
             "|---|---|---|---|---|---|---|---|"]
    for i, name in enumerate(paths):
        r1, r32 = rows_by_batch[1][i], rows_by_batch[32][i]
        lines.append(f"| {name} | {r1.stats.median_ms:.2f} | {r1.speedup:.2f}x | {r32.stats.median_ms:.1f} | "
                     f"{r32.speedup:.2f}x | {quality[name].mean():.5f} | {quality[name].min():.5f} | "
                     f"{mib(bench.size_on_disk(paths[name]))} |")
    ours, theirs = rows_by_batch[32][1].stats.median_ms, rows_by_batch[32][2].stats.median_ms
    lines.append("")
    lines.append(f"netshrink INT8 vs ORT quantize_dynamic at batch 32: {theirs / ours:.2f}x the speed; "
                 f"size {bench.size_on_disk(paths['INT8 netshrink export']) / bench.size_on_disk(ort_default):.2f}x")
    return "\n".join(lines)


def format_sizes(entry, folder: Path, quick: bool) -> str:
    from netshrink import bench, zoo
    from netshrink.export import export
    from netshrink.quant import Int8Dynamic, quantize_

    int8 = entry.with_model(quantize_(entry.model, Int8Dynamic(backend="eager")))
    rows = [
        ("minilm", "netshrink checkpoint", "FP32", export(entry, "netshrink", folder / "ck-fp32")),
        ("minilm", "netshrink checkpoint", "INT8 dynamic", export(int8, "netshrink", folder / "ck-int8")),
        ("minilm", "Hugging Face", "FP32", export(entry, "hf", folder / "hf-fp32")),
        ("minilm", "TorchScript", "FP32", export(entry, "torchscript", folder / "ts-fp32.pt")),
        ("minilm", "TorchScript", "INT8 dynamic", export(int8, "torchscript", folder / "ts-int8.pt")),
    ]
    for scheme in ("fp32", "bf16", "int8-dynamic", "int8-static", "int4"):
        rows.append(("minilm", "ONNX", scheme, export(entry, "onnx", folder / f"sizes-{scheme}.onnx", scheme=scheme)))
    if not quick:
        from netshrink.llm.api import compress_llm
        from netshrink.llm.rtn import RTN

        llm = zoo.load("smollm2")
        for qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_1", "F16"):
            rows.append(("smollm2", "GGUF", qtype, export(llm, "gguf", folder / f"smol-{qtype}.gguf", scheme=qtype)))
        packed = llm.with_model(compress_llm(llm.model, RTN(bits=4, group_size=32, symmetric=True), pack=True))
        rows.append(("smollm2", "netshrink checkpoint", "INT4 RTN g32 packed", export(packed, "netshrink", folder / "smol-ck")))
        rows.append(("smollm2", "Hugging Face compressed-tensors", "INT4 RTN g32",
                     export(packed, "hf", folder / "smol-hf")))
        rows.append(("smollm2", "ONNX", "int4 (MatMulNBits, from packed)",
                     export(packed, "onnx", folder / "smol-int4.onnx", scheme="int4")))
    lines = ["| model | format | scheme | size on disk |", "|---|---|---|---|"]
    lines += [f"| {m} | {f} | {s} | {mib(bench.size_on_disk(p))} |" for m, f, s, p in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few sentences and rounds, MiniLM sizes only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    from netshrink import zoo

    entry = zoo.load("minilm")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("## ONNX INT8: netshrink export vs onnxruntime quantize_dynamic (all-MiniLM-L6-v2, 2 threads, "
              "128 tokens)\n")
        print(onnx_int8_comparison(entry, folder, args.quick))
        print("\n## Size on disk by export format\n")
        print(format_sizes(entry, folder, args.quick))


if __name__ == "__main__":
    main()
