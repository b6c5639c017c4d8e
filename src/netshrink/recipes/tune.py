"""Accuracy-driven tuning: the fastest compressed model whose quality drop stays within the budget.

Escalation follows the playbook: INT8 PTQ first; if it misses the budget, better calibration; then per-layer
fallback (the first and last weight layers stay in float); then QAT. The first variant that meets the budget becomes
the base, and pruning levels are tried on top of it. Every trial saves its model atomically and the run state
(`state.json`) is rewritten after every trial, so a stop or crash never loses the best model and `resume=True`
skips what is done. `max_drop` is relative to the uncompressed model's quality (0.01 = 1%).
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from netshrink.atomic import atomic_dir, atomic_file
from netshrink.errors import NetshrinkError


@dataclass(frozen=True)
class Candidate:
    """One trial: a name, a recipe (as a dict) and whether it is an escalation step or a pruning level."""

    name: str
    recipe: dict[str, Any]
    phase: str = "escalate"  # "escalate" | "prune"


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial in another process or on another machine."""

    model: str
    candidate: Candidate
    task: str
    n: int | None
    seed: int
    out_dir: str


def _first_last_layers(kind: str, model: str) -> list[str]:
    from netshrink import zoo

    entry = zoo.load(model)
    names = [n for n, m in entry.model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return [names[0], names[-1]] if len(names) > 1 else names


def default_plan(kind: str, model: str) -> list[Candidate]:
    """The escalation ladder and pruning levels for a model kind."""
    def recipe(name: str, *stages: dict) -> dict:
        return {"name": name, "stages": list(stages)}

    if kind == "decoder":
        return [Candidate("int8-dynamic", recipe("int8-dynamic", {"quantize": {"method": "int8-dynamic"}})),
                Candidate("gptq-8bit", recipe("gptq-8bit", {"quantize": {"method": "gptq", "bits": 8}})),
                Candidate("gptq-4bit", recipe("gptq-4bit", {"quantize": {"method": "gptq", "bits": 4}}), "prune")]
    if kind == "cnn":
        ptq = {"method": "int8-static", "calibration_samples": 256}
        better = {"method": "int8-static", "calibration_samples": 1024, "observer": "histogram"}
        fallback = dict(better, overrides={name: {"skip": True} for name in _first_last_layers(kind, model)})
        qat = {"method": "qat", "steps": 300, "lr": 1e-4}
        ladder = [Candidate("int8-ptq", recipe("int8-ptq", {"quantize": ptq})),
                  Candidate("int8-ptq-calib", recipe("int8-ptq-calib", {"quantize": better})),
                  Candidate("int8-ptq-fallback", recipe("int8-ptq-fallback", {"quantize": fallback})),
                  Candidate("int8-qat", recipe("int8-qat", {"quantize": qat}))]
        prune = [Candidate(f"structured{int(s * 100)}+{{base}}",
                           recipe(f"structured{int(s * 100)}", {"prune": {"method": "structured", "sparsity": s}},
                                  {"finetune": {"steps": 200, "lr": 1e-3}}), "prune") for s in (0.25, 0.5, 0.75)]
        return ladder + prune
    dynamic = {"method": "int8-dynamic"}
    fallback = dict(dynamic, overrides={name: {"skip": True} for name in _first_last_layers(kind, model)})
    ladder = [Candidate("int8-dynamic", recipe("int8-dynamic", {"quantize": dynamic})),
              Candidate("int8-dynamic-fallback", recipe("int8-dynamic-fallback", {"quantize": fallback})),
              Candidate("int8-qat", recipe("int8-qat", {"quantize": {"method": "qat", "steps": 200, "lr": 1e-5}}))]
    prune = [Candidate(f"structured{int(s * 100)}+{{base}}",
                       recipe(f"structured{int(s * 100)}", {"prune": {"method": "structured", "sparsity": s}},
                              {"finetune": {"steps": 200, "lr": 1e-4, "batch_size": 32}}), "prune")
             for s in (0.125, 0.25)]
    return ladder + prune


def run_trial(spec: TrialSpec) -> dict[str, Any]:
    """Compress, measure and save one candidate (top level, so process pools and Ray can ship it)."""
    from netshrink import zoo
    from netshrink.export.checkpoint import save_checkpoint
    from netshrink.recipes.measure import measure
    from netshrink.recipes.runner import compress

    torch.manual_seed(spec.seed)
    start = time.perf_counter()
    entry = zoo.load(spec.model)
    try:
        result = compress(entry, spec.candidate.recipe)
    except NetshrinkError as exc:
        return {"name": spec.candidate.name, "error": exc.one_line(), "seconds": time.perf_counter() - start}
    m = measure(result.entry, spec.task, spec.n)
    folder = Path(spec.out_dir) / "trials" / _slug(spec.candidate.name)
    with atomic_dir(folder, overwrite=True) as tmp:
        save_checkpoint(result.entry, tmp / "model")
    return {"name": spec.candidate.name, "phase": spec.candidate.phase, **m.to_dict(), "path": str(folder),
            "seconds": time.perf_counter() - start}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@dataclass
class TuneResult:
    """The run's baseline, every trial, and the best trial that met the budget (None when none did)."""

    out_dir: Path
    baseline: dict[str, Any]
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    max_drop: float
    stopped_early: bool = False
    report: dict[str, Path] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"baseline {self.baseline['metric']} {self.baseline['quality']:.4f}, "
               f"{self.baseline['latency_ms']:.3f} ms; budget: drop <= {self.max_drop:.2%}"]
        for t in self.trials:
            if "error" in t:
                out.append(f"  {t['name']:<28} failed: {t['error']}")
            else:
                ok = "meets" if t["meets"] else "misses"
                out.append(f"  {t['name']:<28} quality {t['quality']:.4f} (drop {t['drop']:+.2%}, {ok}), "
                           f"{t['latency_ms']:.3f} ms")
        out.append(f"best: {self.best['name']} -> {self.out_dir / 'best'}" if self.best else
                   "no trial met the budget; the uncompressed model stays the best choice")
        if self.stopped_early:
            out.append("time budget reached; run again with --resume to continue")
        return out


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(state, indent=2))


def _drop(baseline: float, quality: float) -> float:
    return (baseline - quality) / abs(baseline) if baseline else baseline - quality


def tune(model: str, task: str | None = None, max_drop: float = 0.01, time_budget_s: float = 1200.0,
         out: str | Path = "tune-run", resume: bool = False, executor: Any = "local", address: str | None = None,
         n: int | None = None, seed: int = 0, plan: list[Candidate] | None = None) -> TuneResult:
    """Find the fastest variant of zoo model `model` within `max_drop` of its quality on `task`; see module doc."""
    from netshrink import zoo
    from netshrink.recipes.executors import make_executor
    from netshrink.recipes.measure import measure

    out_dir = Path(out)
    state_path = out_dir / "state.json"
    if state_path.exists() and not resume:
        raise NetshrinkError("a tuning run already exists here", where=str(out_dir),
                             hint="pass --resume to continue it, or choose another --out")
    if resume and not state_path.exists():
        raise NetshrinkError("nothing to resume: no state.json", where=str(out_dir))
    if not 0.0 <= max_drop < 1.0:
        raise NetshrinkError(f"max drop {max_drop!r} must be a fraction in [0, 1)", where="--max-drop")
    if resume:
        state = json.loads(state_path.read_text())
        task = state["task"]
    else:
        entry = zoo.load(model)
        task = task or entry.task
        if task == "none":
            raise NetshrinkError("this model has no default evaluation task", where=model, hint="pass --task")
        torch.manual_seed(seed)
        baseline = measure(entry, task, n).to_dict()
        state = {"model": model, "task": task, "max_drop": max_drop, "n": n, "seed": seed, "baseline": baseline,
                 "trials": [], "elapsed_s": 0.0}
        out_dir.mkdir(parents=True, exist_ok=True)
        _save_state(state_path, state)
    kind = zoo.load(model).kind
    candidates = plan if plan is not None else default_plan(kind, model)
    done = {t["name"]: t for t in state["trials"]}
    pool = make_executor(executor, address) if isinstance(executor, str) else executor
    started = time.perf_counter() - state["elapsed_s"]
    base_q = state["baseline"]["quality"]
    stopped = False

    def record(result: dict[str, Any]) -> None:
        if "error" not in result:
            result["drop"] = _drop(base_q, result["quality"])
            result["meets"] = result["drop"] <= max_drop
        state["trials"].append(result)
        done[result["name"]] = result
        state["elapsed_s"] = time.perf_counter() - started
        _update_best(out_dir, state)
        _save_state(state_path, state)

    try:
        base: Candidate | None = None
        for cand in (c for c in candidates if c.phase == "escalate"):
            if time.perf_counter() - started > time_budget_s:
                stopped = True
                break
            if cand.name not in done:
                record(pool.map(run_trial, [TrialSpec(model, cand, task, n, seed, str(out_dir))])[0])
            if done[cand.name].get("meets"):
                base = cand
                break
        pruned = [_on_top(c, base) for c in candidates if c.phase == "prune"] if base else \
            [c for c in candidates if c.phase == "prune" and "{base}" not in c.name]
        todo = [c for c in pruned if c.name not in done]
        width = getattr(pool, "workers", 2)
        for i in range(0, len(todo), width):
            if time.perf_counter() - started > time_budget_s:
                stopped = True
                break
            for result in pool.map(run_trial, [TrialSpec(model, c, task, n, seed, str(out_dir)) for c in todo[i:i + width]]):
                record(result)
    finally:
        if isinstance(executor, str):
            pool.close()
    result = TuneResult(out_dir, state["baseline"], state["trials"], _best(state), max_drop, stopped)
    result.report = _write_report(result, state)
    return result


def _on_top(cand: Candidate, base: Candidate) -> Candidate:
    """A pruning candidate followed by the base quantization stages."""
    recipe = copy.deepcopy(cand.recipe)
    recipe["stages"] += copy.deepcopy(base.recipe["stages"])
    recipe["name"] = f"{recipe['name']}+{base.name}"
    return Candidate(cand.name.replace("{base}", base.name), recipe, cand.phase)


def _best(state: dict[str, Any]) -> dict[str, Any] | None:
    meeting = [t for t in state["trials"] if t.get("meets")]
    return min(meeting, key=lambda t: (t["latency_ms"], -t["quality"])) if meeting else None


def _update_best(out_dir: Path, state: dict[str, Any]) -> None:
    """Copy the best trial's model to out/best (atomically) when the best changed."""
    best = _best(state)
    if best is None or state.get("best") == best["name"]:
        return
    with atomic_dir(out_dir / "best", overwrite=True) as tmp:
        shutil.copytree(Path(best["path"]) / "model", tmp / "model")
        (tmp / "trial.json").write_text(json.dumps(best, indent=2))
    state["best"] = best["name"]


def _write_report(result: TuneResult, state: dict[str, Any]) -> dict[str, Path]:
    from netshrink.report import Report, Table, write_report
    from netshrink.report.plots import pareto_figure

    ok = [t for t in result.trials if "error" not in t]
    base = result.baseline
    rows = [["baseline", base["quality"], 0.0, base["latency_ms"], base["weight_mib"], True]]
    rows += [[t["name"], t["quality"], t["drop"], t["latency_ms"], t["weight_mib"], t["meets"]] for t in ok]
    floor = base["quality"] - result.max_drop * abs(base["quality"])
    figures = [("Quality vs latency of every trial", pareto_figure(
        [base["latency_ms"]] + [t["latency_ms"] for t in ok], [base["quality"]] + [t["quality"] for t in ok],
        ["baseline"] + [t["name"] for t in ok], quality_name=base["metric"], quality_floor=floor))]
    summary = "\n".join(result.lines())
    report = Report(f"netshrink tune: {state['model']} on {state['task']}", summary,
                    [Table("Trials", ["variant", base["metric"], "drop", "latency b1 (ms)", "weights (MiB)",
                                      "meets budget"], rows,
                           notes="Latency is the batch-1 median on this machine (noisy when it is shared).")],
                    figures, data=state)
    return write_report(report, result.out_dir, overwrite=True)
