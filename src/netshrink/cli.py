"""The `netshrink` command: argument parsing only; every command calls the public Python API."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

from netshrink.errors import NetshrinkError

# Modules that add their own sub-commands with `register(subparsers)`; missing ones are simply absent.
COMMAND_MODULES = ("netshrink.recipes.cli_commands", "netshrink.export.cli_commands")


def _console():
    from rich.console import Console

    return Console()


def cmd_info(args: argparse.Namespace) -> int:
    from rich.table import Table

    from netshrink import bench, zoo
    from netshrink.hardware import detect
    from netshrink.inspect_model import summarize

    hw = detect()
    console = _console()
    console.print("[bold]Hardware[/bold]")
    for line in hw.lines():
        console.print("  " + line)
    if not args.model:
        return 0
    entry = zoo.load(args.model, weights=args.weights)
    size = bench.model_size(entry.model)
    console.print(f"\n[bold]Model[/bold] {entry.name} ({entry.kind}, from {entry.source})")
    console.print(f"  parameters {size['parameters']:,.0f}, non-zero {size['nonzero_parameters']:,.0f}, "
                  f"weights {size['weight_mib']:.1f} MiB")
    if entry.kind != "onnx":
        inputs = _inputs(entry, args.batch, args.seq_len, args.input_shape)
        flops = bench.count_flops(entry.model, inputs)
        console.print(f"  {flops['gflops']:.3f} GFLOPs ({flops['macs'] / 1e9:.3f} GMACs) per forward at batch {args.batch}"
                      + (f", {args.seq_len} tokens" if entry.tokenizer is not None else ""))
    summary = summarize(entry.model, entry.kind, hw)
    table = Table(title="Layers by type and what applies to them on this hardware")
    for col in ("type", "count", "parameters", "compressions"):
        table.add_column(col)
    for row in summary["by_type"]:
        table.add_row(row["type"], str(row["count"]), f"{row['parameters']:,}", "\n".join(row["compressions"]) or "-")
    console.print(table)
    if args.layers:
        for row in summary["layers"]:
            console.print(f"  {row['name']:<50} {row['type']:<12} {str(row['shape']):<20} {row['parameters']:,}")
    return 0


def _inputs(entry, batch: int, seq_len: int, input_shape: str | None) -> tuple:
    import torch

    from netshrink.checks import check_inputs

    if input_shape:
        try:
            shape = tuple(int(d) for d in input_shape.split(","))
        except ValueError:
            raise NetshrinkError(f"expected comma-separated integers, got '{input_shape}'", where="--input-shape") from None
        inputs = (torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)),)
    else:
        inputs = entry.example_inputs(batch=batch, seq_len=seq_len)
    check_inputs(entry, inputs)
    return inputs


def cmd_eval(args: argparse.Namespace) -> int:
    from netshrink import eval as evaluation
    from netshrink import zoo

    entry = zoo.load(args.model, weights=args.weights)
    reference = zoo.load(args.reference).model if args.reference else None
    scores = evaluation.evaluate(entry, task=args.task, n=args.n, reference=reference)
    _console().print(f"{entry.name} on {args.task or entry.task}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from netshrink import bench, zoo

    entries = [zoo.load(args.model, weights=args.weights)] + [zoo.load(spec) for spec in args.vs]
    variants: dict[str, Callable[[], object]] = {}
    for index, entry in enumerate(entries):
        inputs = _inputs(entry, args.batch, args.seq_len, args.input_shape)
        label = entry.name if entry.name not in variants else f"{entry.name}#{index}"
        variants[label] = (lambda m, i: (lambda: m(*i)))(entry.model, inputs)
    rows = bench.compare(variants, rounds=args.rounds, num_threads=args.threads, batch=args.batch)
    console = _console()
    console.print(f"batch {args.batch}, {rows[0].stats.threads} threads, {args.rounds} interleaved rounds")
    console.print(bench.markdown_table(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from netshrink.demo import run_demo

    run_demo(models=args.models, out_dir=args.out, n=args.n, num_threads=args.threads, watts=args.watts, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netshrink", description="Prune and quantize trained PyTorch models, and prove the gains.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("model", nargs=None if required else "?",
                       help="built-in name (minilm, smollm2, digit-cnn), HF folder, .gguf/.onnx/.pt file, or module:attr")
        p.add_argument("--weights", help="weights file (safetensors or state_dict) for a module:attr model")

    def input_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
        p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence for text models (default 128)")
        p.add_argument("--input-shape", help="per-sample input shape for models without a known one, e.g. 3,32,32")

    p = sub.add_parser("info", help="hardware, layers, parameters, FLOPs and which compressions apply here")
    model_args(p, required=False)
    input_args(p)
    p.add_argument("--layers", action="store_true", help="also list every layer")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="task quality on real data")
    model_args(p)
    p.add_argument("--task", help="digits, fashion, similarity, fidelity, perplexity, perplexity-austen (default: the model's own)")
    p.add_argument("--n", type=int, help="cap on samples / sentences / tokens")
    p.add_argument("--reference", help="original model for the fidelity task")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency and throughput, optionally side by side with other models (interleaved)")
    model_args(p)
    input_args(p)
    p.add_argument("--vs", action="append", default=[], metavar="OTHER", help="another model to run in the same process")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="compress the built-in models and print a side-by-side table; writes a report")
    p.add_argument("--models", nargs="+", default=None, help="zoo models (default: digit-cnn minilm smollm2)")
    p.add_argument("--out", type=Path, help="report folder to create (default reports/demo-<time>)")
    p.add_argument("--n", type=int, help="cap on evaluation samples")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for timing (default 2)")
    p.add_argument("--watts", type=float, default=None,
                   help="assumed power draw for the energy estimate when no power meter is readable (default: not measurable)")
    p.add_argument("--quick", action="store_true", help="small samples and few timing rounds (a smoke run)")
    p.set_defaults(func=cmd_demo)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NetshrinkError as exc:
        if args.debug:
            raise
        print(f"netshrink: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netshrink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
