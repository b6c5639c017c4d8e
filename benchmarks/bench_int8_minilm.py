"""INT8 on all-MiniLM-L6-v2, 2 threads: netshrink against FP32 eager and the other CPU quantization paths.

All variants live in one process and are timed interleaved (round robin), batch 1 x 128 and batch 32 x 128 tokens;
medians are reported with ratios against FP32 eager, plus mean / min cosine of the sentence embeddings to FP32 on
real sentences (gensim's lee_background.cor), size on disk and peak RSS growth during a batch-32 call.

    .venv/bin/python benchmarks/bench_int8_minilm.py            # full run (compiles take a few minutes)
    .venv/bin/python benchmarks/bench_int8_minilm.py --quick    # smoke check
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn


def tune_malloc() -> bool:
    """Keep freed blocks in the glibc heap (no munmap/page-fault churn at batch 32); applies to every variant."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except OSError:
        return False


def ort_variant(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, folder: Path, threads: int):
    """onnxruntime quantize_dynamic (per channel, QInt8 weights) on the BERT-optimizer graph with fused attention."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    eager = copy.deepcopy(model)
    eager.backbone.set_attn_implementation("eager")      # the BERT optimizer fuses attention only from eager graphs
    raw, fused, quant = folder / "minilm.onnx", folder / "minilm_fused.onnx", folder / "minilm_fused_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(eager, (ids, mask), str(raw), input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"},
                                        "embedding": {0: "b"}})
    config = model.backbone.config
    optimized = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    fused_ops = optimized.get_fused_operator_statistics()
    optimized.save_model_to_file(str(fused))
    from onnx import TensorProto

    quantize_dynamic(str(fused), str(quant), per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(quant), options, providers=["CPUExecutionProvider"])

    def run(i: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {"input_ids": i.numpy(), "attention_mask": m.numpy()})[0]
        return torch.from_numpy(out)

    return run, quant.stat().st_size, fused_ops


def saved_bytes(model: nn.Module, folder: Path, name: str) -> int:
    """Bytes of the model's state dict saved with torch.save (int8 buffers stay int8)."""
    target = getattr(model, "_orig_mod", model)
    path = folder / f"{name}.pt"
    torch.save({k: v for k, v in target.state_dict().items()}, path)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds and sentences: a smoke check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out: torch.ao torchao onnxruntime bf16 eager compile")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 8)
    n_sentences = 64 if args.quick else 256
    torch.set_num_threads(args.threads)
    malloc_tuned = tune_malloc()

    import netshrink
    from netshrink import data, zoo
    from netshrink.bench.memory import peak_rss_during
    from netshrink.quant import BF16, Int8Dynamic, quant_report, quantize_

    warnings.filterwarnings("ignore")
    entry = zoo.load("minilm")
    fp32 = entry.model
    ids1, mask1 = entry.example_inputs(1, 128)
    ids32, mask32 = entry.example_inputs(32, 128)
    sentences = data.sentences(n_sentences)
    enc = entry.tokenizer(sentences, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    eval_batches = [(enc["input_ids"][i:i + 32], enc["attention_mask"][i:i + 32]) for i in range(0, n_sentences, 32)]

    folder = Path(tempfile.mkdtemp(prefix="bench_int8_minilm_"))
    variants: dict[str, object] = {}
    sizes: dict[str, int] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    variants["FP32 eager"] = fp32
    sizes["FP32 eager"] = saved_bytes(fp32, folder, "fp32")

    if "torch.ao" not in args.skip:
        from torch.ao.quantization import quantize_dynamic

        ao = quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
        variants["torch.ao quantize_dynamic"] = ao
        sizes["torch.ao quantize_dynamic"] = saved_bytes(ao, folder, "ao")
    if "torchao" not in args.skip:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        from torchao.quantization import quantize_ as torchao_quantize_

        tao = copy.deepcopy(fp32)
        torchao_quantize_(tao, Int8DynamicActivationInt8WeightConfig())
        variants["torchao int8 dynamic + compile"] = torch.compile(tao)
        try:
            sizes["torchao int8 dynamic + compile"] = saved_bytes(tao, folder, "torchao")
        except Exception as exc:  # torchao tensor subclasses may not pickle; report it rather than guess a size
            notes.append(f"torchao size not measured: {type(exc).__name__}")
    if "onnxruntime" not in args.skip:
        run, size, fused = ort_variant(fp32, ids1, mask1, folder, args.threads)
        variants["onnxruntime dynamic, per-channel, fused attention"] = run
        sizes["onnxruntime dynamic, per-channel, fused attention"] = size
        notes.append("onnxruntime fused operators: " + ", ".join(f"{k}={v}" for k, v in fused.items() if v))
    if "bf16" not in args.skip:
        bf16 = quantize_(fp32, BF16(backend="compile"))
        variants["BF16 + compile (netshrink BF16)"] = bf16
        sizes["BF16 + compile (netshrink BF16)"] = saved_bytes(bf16, folder, "bf16")
    if "eager" not in args.skip:
        eager = quantize_(fp32, Int8Dynamic(backend="eager"))
        variants["netshrink Int8Dynamic, eager"] = eager
        sizes["netshrink Int8Dynamic, eager"] = saved_bytes(eager, folder, "ns_eager")
    if "compile" not in args.skip:                           # the torch.compile path (the default until native)
        variants["netshrink Int8Dynamic, torch.compile"] = quantize_(fp32, Int8Dynamic(backend="compile"))
    ours = quantize_(fp32, Int8Dynamic())                    # the default: backend auto -> native for this encoder
    default = f"netshrink Int8Dynamic (default: {quant_report(ours).backend})"
    variants[default] = ours
    sizes[default] = saved_bytes(ours, folder, "ns")
    print(f"# built {len(variants)} variants in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    medians: dict[str, dict[int, float]] = {}
    cosines: dict[str, tuple[float, float]] = {}
    peaks: dict[str, float] = {}
    with torch.no_grad():
        reference = torch.cat([fp32(i, m) for i, m in eval_batches])
        for name, fn in variants.items():                      # warm up (compiles) and check fidelity
            t = time.perf_counter()
            fn(ids1, mask1)
            fn(ids32, mask32)
            out = torch.cat([fn(i, m) for i, m in eval_batches]).float()
            cos = torch.nn.functional.cosine_similarity(out, reference, dim=-1)
            cosines[name] = (cos.mean().item(), cos.min().item())
            _, mem = peak_rss_during(lambda: fn(ids32, mask32))
            peaks[name] = mem["growth_mib"]
            print(f"# {name}: warm-up {time.perf_counter() - t:.0f} s, cosine {cosines[name][0]:.5f}",
                  file=sys.stderr, flush=True)
        times: dict[str, dict[int, list[float]]] = {name: {1: [], 32: []} for name in variants}
        for _ in range(rounds):                                # interleaved: every variant once per round
            for name, fn in variants.items():
                # let the previous variant's worker threads go idle first: onnxruntime's (and OpenMP's) pools
                # spin-wait after a run, and a variant timed right after onnxruntime measured 9.2-9.8 ms at batch 1
                # instead of 4.7-5.0 ms because those spinning threads held the second core
                time.sleep(0.2)
                for _ in range(5):
                    t = time.perf_counter()
                    fn(ids1, mask1)
                    times[name][1].append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                fn(ids32, mask32)
                times[name][32].append((time.perf_counter() - t) * 1e3)
        for name in variants:
            medians[name] = {b: statistics.median(times[name][b]) for b in (1, 32)}

    base = medians["FP32 eager"]
    load = os.getloadavg()
    print(f"\nall-MiniLM-L6-v2, {args.threads} threads, {rounds} interleaved rounds (5 x batch 1, 1 x batch 32 each), "
          f"{n_sentences} lee_background sentences for cosine; torch {torch.__version__}, netshrink "
          f"{netshrink.__version__}; malloc tuned: {malloc_tuned}; load average at end {load[0]:.1f} / {load[1]:.1f}"
          f"{' (CONTENDED machine: compare ratios, not absolute times)' if load[1] > args.threads + 0.5 else ''}\n")
    print("| path | batch 1 (ms) | x vs FP32 | batch 32 (ms) | x vs FP32 | mean / min cosine to FP32 | size on disk (MB) "
          "| peak RSS growth b32 (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in variants:
        m1, m32 = medians[name][1], medians[name][32]
        size = f"{sizes[name] / 1e6:.1f}" if name in sizes else "n/a"
        print(f"| {name} | {m1:.1f} | {base[1] / m1:.2f} | {m32:.0f} | {base[32] / m32:.2f} | "
              f"{cosines[name][0]:.5f} / {cosines[name][1]:.5f} | {size} | {peaks[name]:.0f} |")
    for line in notes:
        print(f"\n{line}")


if __name__ == "__main__":
    main()
