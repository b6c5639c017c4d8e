"""`netshrink export MODEL_OR_CHECKPOINT --format F --out PATH [--scheme S]`: argument parsing only."""
from __future__ import annotations

import argparse

from netshrink.export.api import FORMATS

SCHEME_HELP = ("onnx: fp32, bf16, int8-dynamic, int8-static, int4 (default fp32); "
               "gguf: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32 (default Q8_0)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` command."""
    p = subparsers.add_parser("export", help="write a model or netshrink checkpoint as netshrink, hf, onnx, "
                                             "torchscript or gguf")
    p.add_argument("model", help="zoo name, model path, or a netshrink checkpoint folder")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="file or folder to create (must not exist)")
    p.add_argument("--scheme", help=SCHEME_HELP)
    p.add_argument("--group-size", type=int, help="onnx int4: MatMulNBits block size (power of two, >= 16)")
    p.add_argument("--base", help="netshrink: the base model spec recorded in the checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print the path written."""
    from netshrink.export.api import export

    options = {"scheme": args.scheme, "group_size": args.group_size, "base": args.base}
    path = export(args.model, args.format, args.out, **options)
    print(path)
    return 0
