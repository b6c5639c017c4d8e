"""`netshrink compress`, `recommend` and `tune`: argument parsing only; each calls the recipes API."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from netshrink.errors import NetshrinkError


def parse_percent(text: str) -> float:
    """'1%' -> 0.01, '0.5%' -> 0.005, '0.01' -> 0.01 (a bare number is a fraction)."""
    value = text.strip()
    try:
        return float(value[:-1]) / 100.0 if value.endswith("%") else float(value)
    except ValueError:
        raise NetshrinkError(f"expected a percentage like 1% or a fraction like 0.01, got '{text}'",
                             where="--max-drop") from None


def parse_budget(text: str) -> tuple[float, bool]:
    """A quality-drop budget: '0.5%' is relative to the baseline (0.005, False); a bare number or 'Npt' is in points
    of the metric, so '1' on accuracy means one accuracy point (0.01, True)."""
    value = text.strip().lower()
    if value.endswith("%"):
        return parse_percent(value), False
    number = value.removesuffix("pts").removesuffix("pt").strip()
    try:
        return float(number) / 100.0, True
    except ValueError:
        raise NetshrinkError(f"expected a drop like 1 (points) or 0.5% (relative), got '{text}'",
                             where="--max-drop") from None


def parse_duration(text: str) -> float:
    """'20m' -> 1200 s, '90s', '1h', '1h30m'; a bare number is seconds."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not match or not any(match.groups()):
        raise NetshrinkError(f"expected a duration like 20m, 90s or 1h30m, got '{text}'", where="--time-budget")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s


def cmd_compress(args: argparse.Namespace) -> int:
    from rich.console import Console

    from netshrink import zoo
    from netshrink.atomic import atomic_dir
    from netshrink.recipes.loader import load_recipe
    from netshrink.recipes.runner import compress
    from netshrink.recipes.summary import compress_report

    recipe = load_recipe(args.recipe)  # validated before the model is even loaded
    if args.export:
        recipe = recipe.with_export(args.export)
    console = Console()
    entry = zoo.load(args.model, weights=args.weights)
    with atomic_dir(args.out) as tmp:
        result = compress(entry, recipe, out=tmp, progress=lambda text: console.print(f"  {text}"))
        from netshrink.export.checkpoint import save_checkpoint

        save_checkpoint(result.entry, tmp / "model")
        compress_report(entry, result, tmp, n=args.n)
    console.print(f"compressed model and report written to [bold]{args.out}[/bold]")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from netshrink import bench, zoo
    from netshrink.hardware import detect
    from netshrink.recipes.recommend import recommend

    entry = zoo.load(args.model, weights=args.weights)
    params = int(bench.model_size(entry.model)["parameters"])
    rec = recommend(entry.kind, detect(), args.target, parse_percent(args.max_drop), parameters=params)
    print("\n".join(rec.lines()))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from netshrink.recipes.tune import tune

    max_drop, absolute = parse_budget(args.max_drop)
    result = tune(args.model, task=args.task, max_drop=max_drop, absolute=absolute,
                  time_budget_s=parse_duration(args.time_budget), out=args.out, resume=args.resume,
                  executor=args.executor, address=args.address, n=args.n, seed=args.seed)
    print("\n".join(result.lines()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the compress, recommend and tune sub-commands to the netshrink parser."""
    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="built-in name (minilm, smollm2, digit-cnn), HF folder, model file or module:attr")
        p.add_argument("--weights", help="weights for a module:attr model")

    p = subparsers.add_parser("compress", help="run a recipe (YAML/JSON file or built-in name) on a model",
                              description="Validate the recipe, run its stages in order, save the compressed model "
                                          "as a netshrink checkpoint and write report.json + report.html.")
    model_arg(p)
    p.add_argument("--recipe", required=True, help="recipe file or built-in name (e.g. int8-ptq, cnn-structured50-int8)")
    p.add_argument("--out", required=True, type=Path, help="output folder to create")
    p.add_argument("--export", choices=("netshrink", "checkpoint", "onnx", "torchscript", "hf", "gguf"),
                   help="also export the result in this format")
    p.add_argument("--n", type=int, help="cap on evaluation samples for the report")
    p.set_defaults(func=cmd_compress)

    p = subparsers.add_parser("recommend", help="choose a recipe for this model, hardware and accuracy budget",
                              description="Pick a built-in recipe from the model kind and size, the detected "
                                          "hardware (VNNI, BF16, AMX, CUDA capability) and the budget; one reason "
                                          "per choice.")
    model_arg(p)
    p.add_argument("--target", choices=("cpu", "gpu", "edge", "mobile"), default="cpu", help="where it will run")
    p.add_argument("--max-drop", default="1%", help="largest acceptable quality drop, e.g. 1%% (default 1%%)")
    p.set_defaults(func=cmd_recommend)

    p = subparsers.add_parser("tune", help="find the fastest compressed model within an accuracy budget",
                              description="Start from INT8 PTQ and escalate only as needed (better calibration, "
                                          "per-layer fallback, QAT), also trying pruning levels; the best model so "
                                          "far is saved after every trial, and --resume continues a stopped run.")
    model_arg(p)
    p.add_argument("--task", help="evaluation task (default: the model's own, e.g. digits, similarity)")
    p.add_argument("--max-drop", default="1%", help="largest acceptable quality drop: 0.5%% is relative to the "
                   "baseline, a bare number is in points of the metric (1 = one accuracy point)")
    p.add_argument("--time-budget", default="20m", help="wall-clock budget, e.g. 20m, 90s, 1h (default 20m)")
    p.add_argument("--out", type=Path, required=True, help="run folder (best model, trials, report)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished trials")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="where trials run (default local)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--n", type=int, help="cap on evaluation samples per trial")
    p.add_argument("--seed", type=int, default=0, help="random seed for every trial (default 0)")
    p.set_defaults(func=cmd_tune)
