"""The report of one `netshrink compress` run: original and compressed side by side, stages and layer record."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from netshrink.recipes.measure import measure
from netshrink.recipes.runner import CompressResult
from netshrink.report import Report, Table, write_report
from netshrink.report.plots import size_memory_figure


def compress_report(original: Any, result: CompressResult, out_dir: Path, n: int | None = None) -> dict[str, Path]:
    """Measure both models on the original's task and write report.json + report.html into `out_dir`."""
    task = original.task if original.task != "none" else None
    rows, measured = [], {}
    for label, entry in (("original", original), (result.recipe.name, result.entry)):
        m = measure(entry, task, n) if task else None
        measured[label] = m.to_dict() if m else None
        rows.append([label, m.metric if m else "-", m.quality if m else None, m.latency_ms if m else None,
                     m.weight_mib if m else None, m.sparsity if m else None])
    tables = [
        Table("Side by side", ["variant", "metric", "quality", "latency b1 (ms)", "weights (MiB)", "sparsity"], rows,
              notes="Latency is the batch-1 median on this machine; perplexity is shown negated (higher is better)."),
        Table("Stages", ["stage", "seconds", "layers changed"],
              [[s.stage, round(s.seconds, 2), s.layers_changed] for s in result.steps]),
        Table("Layer record", ["layer", "what was done"],
              [[name, ", ".join(f"{k}={v}" for k, v in fields.items())] for name, fields in result.record.items()]),
    ]
    figures = []
    if all(measured.values()):
        figures.append(("Weight size", size_memory_figure(list(measured), [m["weight_mib"] for m in measured.values()],
                                                          title="Weight size (MiB)")))
    report = Report(f"netshrink compress: {original.name} with {result.recipe.name}",
                    summary=(result.recipe.description or "").strip(), tables=tables, figures=figures,
                    data={"recipe": result.recipe.raw or result.recipe.name, "measurements": measured,
                          "record": result.record, "exports": {k: str(v) for k, v in result.exports.items()}})
    return write_report(report, out_dir)
