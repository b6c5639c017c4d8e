"""Peak memory while compressing checkpoints block by block from sharded safetensors.

Checkpoints: SmolLM2-135M (its weights written as one shard per block), and synthetic Llama checkpoints with
SmolLM2's block shape and 2x / 4x its depth (random weights). If memory stays at about one block, the RSS growth
is the same for all three. `--larger-than-ram GB` also writes a synthetic checkpoint of about that size (it takes
as long as writing and reading that many GB) and compresses it to INT4 with RTN and GPTQ.

    .venv/bin/python benchmarks/bench_llm_memory.py [--quick] [--workdir DIR] [--larger-than-ram 30]
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from netshrink.atomic import atomic_dir
from netshrink.bench.memory import peak_rss_during
from netshrink.llm import GPTQ, RTN, compress_checkpoint, write_synthetic_checkpoint
from netshrink.llm.safetensors_io import INDEX


def smollm2_checkpoint(folder: Path) -> tuple[Path, dict]:
    """SmolLM2 written as a sharded safetensors folder, one shard per block (from the packaged GGUF)."""
    from netshrink.zoo import load

    if (folder / "config.json").exists():                # kept from an earlier run with the same --workdir
        return folder, json.loads((folder / "config.json").read_text())
    model = load("smollm2").model
    config = model.config.to_dict()
    weight_map = {}
    with atomic_dir(folder) as tmp:
        state = model.state_dict()
        groups: dict[str, dict] = {}
        for k, v in state.items():
            if k == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            shard = f"block-{int(k.split('.')[2]):05d}.safetensors" if k.startswith("model.layers.") else "rest.safetensors"
            groups.setdefault(shard, {})[k] = v.contiguous()
        for shard, tensors in groups.items():
            save_file(tensors, str(tmp / shard))
            weight_map.update({k: shard for k in tensors})
        (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (tmp / "config.json").write_text(json.dumps(config, default=str))
    del model, state
    gc.collect()
    return folder, config


def block_mib(config: dict) -> float:
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    return (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) * 4 / 2 ** 20


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--larger-than-ram", type=float, default=None, metavar="GB")
    parser.add_argument("--methods", default=None, help="comma-separated subset of rtn,gptq")
    parser.add_argument("--only-large", action="store_true", help="with --larger-than-ram: skip the SmolLM2-size rows")
    parser.add_argument("--no-warmup", action="store_true", help="measure the first compression in the process too")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="netshrink-mem-"))
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (4, 64))
    smol, config = smollm2_checkpoint(work / "smollm2")
    base = {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                   "num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
            if k in config}
    n = config["num_hidden_layers"]
    ckpts = [] if args.only_large else [("SmolLM2-135M", smol)]
    depths = [] if args.only_large else [2] if args.quick else [2, 4]
    for mult in depths:
        folder = work / f"synthetic{mult}x"     # kept from an earlier run with the same --workdir
        ckpts.append((f"synthetic {mult}x depth", folder if (folder / "config.json").exists() else
                      write_synthetic_checkpoint(folder, dict(base, num_hidden_layers=n * mult))))
    if args.larger_than_ram:
        h, i = 4096, 14336
        per_block = (2 * h * h + 2 * h * 1024 + 3 * h * i) * 4 / 1e9
        layers = int(args.larger_than_ram / per_block) + 1
        huge = work / "huge"
        ckpts.append((f"synthetic {layers} x 4096 blocks", huge if (huge / "config.json").exists() else write_synthetic_checkpoint(
            huge, dict(vocab_size=32000, hidden_size=h, intermediate_size=i, num_attention_heads=32,
                                num_key_value_heads=8, num_hidden_layers=layers, tie_word_embeddings=False))))
    methods = [("RTN W4 g128", RTN(4, 128), None), ("GPTQ W4 g128 (4x64 tokens)", GPTQ(4, 128), ids)]
    if args.quick:
        methods = methods[:1]
    if args.methods:
        methods = [m for m in methods if m[1].method in args.methods.split(",")]
    rows = []
    if not args.no_warmup:
        # The first compression in a process pays one-time costs (code paths run for the first time, lazily imported
        # modules, allocator set-up) that do not depend on the checkpoint: pay them on a 1-block checkpoint first
        # and show them as their own row, so the rows below measure what each checkpoint itself needs.
        tiny = work / "warmup1"
        if not (tiny / "config.json").exists():
            write_synthetic_checkpoint(tiny, dict(base, num_hidden_layers=1, vocab_size=1024))
        for mlabel, method, calib in methods:
            out = work / f"out-warmup-{method.method}"
            shutil.rmtree(out, ignore_errors=True)
            ids_in_vocab = None if calib is None else calib % 1024
            _, mem = peak_rss_during(lambda: compress_checkpoint(tiny, out, method, ids_in_vocab))
            rows.append(("warm-up: 1 block, first run in this process", mlabel, folder_mib(tiny), block_mib(base), mem,
                         folder_mib(out)))
            print(rows[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
    for label, folder in ckpts:
        cfg = json.loads((folder / "config.json").read_text())
        for mlabel, method, calib in methods:
            calib = None if calib is None else calib % cfg["vocab_size"]   # ids inside this checkpoint's vocabulary
            out = work / f"out-{folder.name}-{method.method}"
            shutil.rmtree(out, ignore_errors=True)
            gc.collect()
            _, mem = peak_rss_during(lambda: compress_checkpoint(folder, out, method, calib))
            rows.append((label, mlabel, folder_mib(folder), block_mib(cfg), mem, folder_mib(out)))
            print(rows[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nworkdir {work}\n")
    print("| checkpoint | method | checkpoint MiB | one block MiB (fp32) | RSS before MiB | peak growth MiB | "
          "growth / block | output MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for label, mlabel, size, blk, mem, out_size in rows:
        print(f"| {label} | {mlabel} | {size:.0f} | {blk:.1f} | {mem['rss_before_mib']:.0f} | "
              f"{mem['growth_mib']:.0f} | {mem['growth_mib'] / blk:.2f} | {out_size:.0f} |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
