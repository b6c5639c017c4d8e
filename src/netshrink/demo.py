"""`netshrink demo`: compress the built-in models with the best methods netshrink has, measure every variant side
by side with the original in one process, print the table and write a report."""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from netshrink import bench
from netshrink.errors import NetshrinkError
from netshrink.zoo import ZooModel

DEFAULT_MODELS = ("digit-cnn", "minilm", "smollm2")


@dataclass
class Variant:
    """One compressed version of a model: how to build it from the FP32 entry and what it is."""

    name: str
    build: Callable[[ZooModel], nn.Module]
    description: str


@dataclass
class VariantResult:
    model: str
    variant: str
    description: str
    quality: dict[str, float]
    latency_b1_ms: float = float("nan")
    throughput: float = float("nan")  # items/s at the large batch (tokens/s of decoding for decoders)
    speedup_b1: float = float("nan")
    speedup_large: float = float("nan")
    weight_mib: float = float("nan")
    disk_mib: float = float("nan")
    peak_growth_mib: float = float("nan")
    energy: str = "not measurable"
    build_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def variants_for(entry: ZooModel) -> list[Variant]:
    """The compressions the demo applies to one model kind (what netshrink does best on this machine)."""
    from netshrink.demo_variants import variants_for_kind

    return variants_for_kind(entry.kind)


def _quality(entry: ZooModel, model: nn.Module, reference: ZooModel, n: int | None, quick: bool) -> dict[str, float]:
    from netshrink import data
    from netshrink import eval as evaluation

    candidate = entry.with_model(model)
    if entry.kind == "cnn":  # the held-out split: the pruned variant is fine-tuned on the train split
        return evaluation.evaluate_digits(model, n=n, split="test")
    if entry.kind == "encoder":
        scores = evaluation.human_similarity(model, entry.tokenizer)
        scores.update(evaluation.embedding_fidelity(model, reference.extra["reference_embeddings"], entry.tokenizer,
                                                    data.sentences(n or (64 if quick else 256))))
        return scores
    if entry.kind == "decoder":
        tokens = n or (512 if quick else 2048)
        return evaluation.perplexity(model, entry.tokenizer, data.prose("lee"), max_length=512, stride=256, max_tokens=tokens)
    return {}


def _headline(kind: str) -> tuple[str, str]:
    return {"cnn": ("accuracy", "accuracy on the digits test split"), "encoder": ("spearman", "human-similarity Spearman"),
            "decoder": ("perplexity", "perplexity (Lee prose)")}.get(kind, ("", ""))


def measure_model(entry: ZooModel, n: int | None, num_threads: int, watts: float | None, quick: bool,
                  progress: Callable[[str], None]) -> list[VariantResult]:
    """Build every variant of one model, then evaluate and time them all side by side."""
    from netshrink import data
    from netshrink import eval as evaluation

    if entry.kind == "encoder":
        entry.extra["reference_embeddings"] = evaluation.embed(entry.model, entry.tokenizer, data.sentences(n or (64 if quick else 256)))
    built: dict[str, tuple[Variant, nn.Module, float]] = {}
    fp32 = Variant("FP32", lambda e: e.model, "original model, float32 eager")
    for variant in [fp32] + variants_for(entry):
        progress(f"{entry.name}: building {variant.name}")
        start = time.perf_counter()
        model = variant.build(entry)
        built[variant.name] = (variant, model, time.perf_counter() - start)

    results: dict[str, VariantResult] = {}
    for name, (variant, model, build_s) in built.items():
        progress(f"{entry.name}: evaluating {name}")
        quality = _quality(entry, model, entry, n, quick)
        size = bench.model_size(model)
        with tempfile.TemporaryDirectory() as tmp:
            disk = bench.saved_size(model, tmp)
        results[name] = VariantResult(entry.name, name, variant.description, quality, weight_mib=size["weight_mib"],
                                      disk_mib=disk / 2**20, build_s=build_s)

    rounds = 3 if quick else 10
    progress(f"{entry.name}: timing batch 1 ({rounds} interleaved rounds)")
    small = entry.example_inputs(batch=1, seq_len=128)
    rows = bench.compare({k: (lambda m: (lambda: m(*small)))(m) for k, (_, m, _) in built.items()},
                         rounds=rounds, num_threads=num_threads, batch=1)
    for row in rows:
        results[row.name].latency_b1_ms = row.stats.median_ms
        results[row.name].speedup_b1 = row.speedup
        results[row.name].energy = bench.estimate_from_latency(row.stats.median_ms, watts).label()

    if entry.kind == "decoder":
        prompt = small[0][:, :32]
        for name, (_, model, _) in built.items():
            progress(f"{entry.name}: decoding with {name}")
            speed = bench.decode_tokens_per_second(model, prompt, new_tokens=8 if quick else 32, num_threads=num_threads)
            results[name].throughput = speed["tokens_per_s"]
            if speed["native"]:  # quality from the runtime that decoded (int8 activations), not the model's forward
                from netshrink.llm.native import NativeDecoder

                progress(f"{entry.name}: perplexity of {name} through NativeDecoder")
                with bench.threads(num_threads):
                    native = NativeDecoder(model, max_len=512)
                results[name].quality = _quality(entry, native, entry, n, quick)
            _, mem = bench.peak_rss_during(lambda: model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False))
            results[name].peak_growth_mib = mem["growth_mib"]
        base = results["FP32"].throughput
        for result in results.values():
            result.speedup_large = result.throughput / base
    else:
        large_batch = 32
        progress(f"{entry.name}: timing batch {large_batch}")
        large = entry.example_inputs(batch=large_batch, seq_len=128)
        rows = bench.compare({k: (lambda m: (lambda: m(*large)))(m) for k, (_, m, _) in built.items()},
                             rounds=max(2, rounds // 2), calls_per_round=1, num_threads=num_threads, batch=large_batch)
        for row in rows:
            results[row.name].throughput = row.stats.throughput
            results[row.name].speedup_large = row.speedup
        for name, (_, model, _) in built.items():
            with torch.inference_mode():
                _, mem = bench.peak_rss_during(lambda: model(*large))
            results[name].peak_growth_mib = mem["growth_mib"]
    return list(results.values())


def _fmt_quality(kind: str, quality: dict[str, float]) -> str:
    if kind == "cnn":
        return f"acc {quality['accuracy'] * 100:.2f}%"
    if kind == "encoder":
        return f"rho {quality['spearman']:.4f}, cos {quality['mean_cosine']:.4f}/{quality['min_cosine']:.4f}"
    if kind == "decoder":
        return f"ppl {quality['perplexity']:.2f}"
    return ""


COLUMNS = ["model", "variant", "quality", "b1 latency ms", "b1 speedup", "throughput", "speedup",
           "weights MiB", "disk MiB", "peak mem +MiB", "energy/inference"]


def result_rows(kind: str, results: list[VariantResult]) -> list[list[Any]]:
    unit = "tok/s decode" if kind == "decoder" else "items/s @32"
    return [[r.model, r.variant, _fmt_quality(kind, r.quality), round(r.latency_b1_ms, 2), f"{r.speedup_b1:.2f}x",
             f"{r.throughput:.1f} {unit}", f"{r.speedup_large:.2f}x", round(r.weight_mib, 2), round(r.disk_mib, 2),
             round(r.peak_growth_mib, 1), r.energy] for r in results]


def run_demo(models: list[str] | None = None, out_dir: str | Path | None = None, n: int | None = None,
             num_threads: int = 2, watts: float | None = None, quick: bool = False) -> dict[str, Path]:
    """Compress, evaluate and measure the default models; print the table; write report.json + report.html."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table as RichTable

    from netshrink import zoo
    from netshrink.hardware import detect
    from netshrink.report import Report, Table, write_report
    from netshrink.report.plots import pareto_figure, size_memory_figure

    out = Path(out_dir) if out_dir else Path("reports") / time.strftime("demo-%Y%m%d-%H%M%S")
    if out.exists():
        raise NetshrinkError("output folder already exists; choose another --out or remove it", where=str(out))
    console = Console(width=max(150, Console().width))
    hw = detect()
    all_results: dict[str, list[VariantResult]] = {}
    kinds: dict[str, str] = {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("loading", total=None)
        for spec in models or DEFAULT_MODELS:
            bar.update(task, description=f"loading {spec}")
            entry = zoo.load(spec)
            kinds[entry.name] = entry.kind
            all_results[entry.name] = measure_model(entry, n, num_threads, watts, quick,
                                                    lambda text: bar.update(task, description=text))

    tables = []
    for name, results in all_results.items():
        kind = kinds[name]
        rich_table = RichTable(title=f"{name} ({kind}): quality = {_headline(kind)[1]}")
        for col in COLUMNS[1:]:
            rich_table.add_column(col, overflow="fold")
        rows = result_rows(kind, results)
        for row in rows:
            rich_table.add_row(*[str(c) for c in row[1:]])
        console.print(rich_table)
        tables.append(Table(f"{name} ({kind})", COLUMNS, rows, notes="; ".join(f"{r.variant}: {r.description}" for r in results)))

    energy_note = ("energy: estimate from measured latency x an assumed power figure (--watts), not a measurement"
                   if watts else "energy: not measurable here (no RAPL/powercap or NVML counter readable); pass --watts for a labelled estimate")
    summary = (f"{len(all_results)} models on {hw.cpu_name}, {num_threads} threads, variants timed interleaved in one process. "
               + energy_note + ". " + "; ".join(hw.lines()[1:]))
    figures = []
    for name, results in all_results.items():
        metric, label = _headline(kinds[name])
        quality = [r.quality.get(metric, float("nan")) for r in results]
        if metric == "perplexity":
            quality = [-q for q in quality]
            label = "negative perplexity"
        figures.append((f"{name}: quality vs batch-1 latency", pareto_figure([r.latency_b1_ms for r in results], quality,
                        [r.variant for r in results], quality_name=label, title=f"{name}: quality vs latency")))
        figures.append((f"{name}: weights and peak memory", size_memory_figure([r.variant for r in results],
                        [r.disk_mib for r in results], [r.peak_growth_mib for r in results], title=f"{name}: size and memory")))
    report = Report("netshrink demo", summary, tables, figures,
                    data={"hardware": hw.to_dict(), "threads": num_threads, "quick": quick,
                          "results": {k: [vars(r) for r in v] for k, v in all_results.items()}})
    paths = write_report(report, out)
    console.print(f"Report written to [bold]{paths['html']}[/bold] and {paths['json']}")
    return paths
