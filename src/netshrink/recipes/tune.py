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


def weight_layers(model: str) -> list[str]:
    """Names of the Linear / Conv2d layers of zoo model `model`, in module order."""
    from netshrink import zoo

    entry = zoo.load(model)
    return [n for n, m in entry.model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


FALLBACK = "{fallback}"  # placeholder in a plan: replaced by the layers the sensitivity scan found most harmful


def default_plan(kind: str, model: str) -> list[Candidate]:
    """The escalation ladder and pruning levels for a model kind.

    Escalation: INT8 PTQ; better calibration (CNN); per-layer fallback of the layers a sensitivity scan found most
    harmful to quantize; QAT. Pruning levels then go on top of the first rung that met the budget.
    """
    def recipe(name: str, *stages: dict) -> dict:
        return {"name": name, "stages": list(stages)}

    if kind == "decoder":
        return [Candidate("int8-dynamic", recipe("int8-dynamic", {"quantize": {"method": "int8-dynamic"}})),
                Candidate("gptq-8bit", recipe("gptq-8bit", {"quantize": {"method": "gptq", "bits": 8}})),
                Candidate("gptq-4bit", recipe("gptq-4bit", {"quantize": {"method": "gptq", "bits": 4}}), "prune")]
    if kind == "cnn":
        ptq = {"method": "int8-static", "calibration_samples": 256}
        better = {"method": "int8-static", "calibration_samples": 1024, "observer": "percentile"}
        fallback = dict(better, overrides={FALLBACK: {"skip": True}})
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
    fallback = dict(dynamic, overrides={FALLBACK: {"skip": True}})
    ladder = [Candidate("int8-dynamic", recipe("int8-dynamic", {"quantize": dynamic})),
              Candidate("int8-dynamic-fallback", recipe("int8-dynamic-fallback", {"quantize": fallback})),
              Candidate("int8-qat", recipe("int8-qat", {"quantize": {"method": "qat", "steps": 60, "lr": 1e-5,
                                                                      "batch_size": 32}}))]
    prune = [Candidate(f"structured{int(s * 100)}+{{base}}",
                       recipe(f"structured{int(s * 100)}", {"prune": {"method": "structured", "sparsity": s}},
                              {"finetune": {"steps": 60, "lr": 1e-4, "batch_size": 32}}), "prune")
             for s in (0.125, 0.25)]
    return ladder + prune


def _uses_fallback(cand: Candidate) -> bool:
    return FALLBACK in json.dumps(cand.recipe)


def _with_fallback(cand: Candidate, layers: list[str]) -> Candidate:
    """The candidate with its fallback placeholder replaced by one `skip` override per layer."""
    recipe = copy.deepcopy(cand.recipe)
    for item in recipe["stages"]:
        for body in item.values():
            overrides = body.get("overrides", {})
            if FALLBACK in overrides:
                value = overrides.pop(FALLBACK)
                overrides.update({layer: dict(value) for layer in layers})
    return Candidate(cand.name, recipe, cand.phase)


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
    solo = m.to_dict()
    solo["latency_solo_ms"] = solo.pop("latency_ms")  # the ranking uses side-by-side timings taken by `tune`
    bits = sorted({f.get("bits") for f in result.record.values() if f.get("bits")})
    return {"name": spec.candidate.name, "phase": spec.candidate.phase, **solo, "bits": bits[0] if bits else 32,
            "recipe": spec.candidate.recipe, "path": str(folder), "seconds": time.perf_counter() - start}


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
    absolute: bool = False
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    def budget(self) -> str:
        return f"drop <= {self.max_drop * 100:g} points" if self.absolute else f"drop <= {self.max_drop:.2%}"

    def drop_text(self, drop: float) -> str:
        return f"{drop * 100:+.2f} pt" if self.absolute else f"{drop:+.2%}"

    def lines(self) -> list[str]:
        out = [f"baseline {self.baseline['metric']} {self.baseline['quality']:.4f}; budget: {self.budget()}; "
               "latency = batch-1 median timed side by side with the baseline"]
        for t in self.trials:
            if "error" in t:
                out.append(f"  {t['name']:<28} failed: {t['error']}")
            else:
                ok = "meets" if t["meets"] else "misses"
                out.append(f"  {t['name']:<28} quality {t['quality']:.4f} (drop {self.drop_text(t['drop'])}, {ok}), "
                           f"{t['latency_ms']:.3f} ms, {t['speedup']:.2f}x vs baseline")
        out.append(f"best: {self.best['name']} -> {self.out_dir / 'best'}" if self.best else
                   "no trial met the budget; the uncompressed model stays the best choice")
        if self.stopped_early:
            out.append("time budget reached; run again with --resume to continue")
        return out


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(state, indent=2))


def _drop(baseline: float, quality: float, absolute: bool) -> float:
    if absolute or not baseline:
        return baseline - quality
    return (baseline - quality) / abs(baseline)


class _Timer:
    """Side-by-side latency of saved trial models against the baseline, interleaved in this one process
    (`netshrink.bench.compare`), so machine noise falls on every variant alike and the ranking holds."""

    def __init__(self, model: str, rounds: int = 12) -> None:
        from netshrink import zoo

        self.rounds = rounds
        self.entries: dict[str, Any] = {"baseline": zoo.load(model)}

    def entry(self, name: str, path: str | None) -> Any:
        if name not in self.entries:
            from netshrink.export.checkpoint import load_checkpoint_entry

            self.entries[name] = load_checkpoint_entry(Path(path) / "model")
        return self.entries[name]

    def compare(self, trials: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        """{name: {median_ms, speedup}} for the baseline and `trials`, timed round-robin at batch 1, one thread."""
        from netshrink import bench

        variants = {}
        for name, path in [("baseline", None)] + [(t["name"], t["path"]) for t in trials]:
            entry = self.entry(name, path)
            inputs = entry.example_inputs(batch=1, seq_len=64)
            variants[name] = (lambda m=entry.model, x=inputs: m(*x))
        rows = bench.compare(variants, baseline="baseline", rounds=self.rounds, num_threads=1)
        return {row.name: {"median_ms": row.stats.median_ms, "speedup": row.speedup} for row in rows}


def tune(model: str, task: str | None = None, max_drop: float = 0.01, time_budget_s: float = 1200.0,
         out: str | Path = "tune-run", resume: bool = False, executor: Any = "local", address: str | None = None,
         n: int | None = None, seed: int = 0, plan: list[Candidate] | None = None, absolute: bool = False,
         fallback_layers: int = 2) -> TuneResult:
    """Find the fastest variant of zoo model `model` within `max_drop` of its quality on `task`; see module doc.

    `max_drop` is a fraction of the baseline quality, or with `absolute=True` a difference in the metric itself
    (0.01 = one accuracy point). Trials run on `executor`; every latency that ranks them is measured here, side by
    side with the baseline, and the winner is chosen from one final interleaved comparison of every trial that met
    the budget.
    """
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
        task, max_drop, absolute, n, seed = state["task"], state["max_drop"], state.get("absolute", False), \
            state["n"], state["seed"]
    else:
        entry = zoo.load(model)
        task = task or entry.task
        if task == "none":
            raise NetshrinkError("this model has no default evaluation task", where=model, hint="pass --task")
        torch.manual_seed(seed)
        baseline = measure(entry, task, n).to_dict()
        state = {"model": model, "task": task, "max_drop": max_drop, "absolute": absolute, "n": n, "seed": seed,
                 "baseline": baseline, "trials": [], "sensitivity": [], "elapsed_s": 0.0}
        out_dir.mkdir(parents=True, exist_ok=True)
        _save_state(state_path, state)
    kind = zoo.load(model).kind
    candidates = plan if plan is not None else default_plan(kind, model)
    done = {t["name"]: t for t in state["trials"]}
    pool = make_executor(executor, address) if isinstance(executor, str) else executor
    started = time.perf_counter() - state["elapsed_s"]
    base_q = state["baseline"]["quality"]
    timer = _Timer(model)
    stopped = False

    def start_trial() -> list[dict[str, Any]]:
        first = next((t for t in state["trials"] if "error" not in t), None)
        return [first] if first is not None else []

    def record(result: dict[str, Any]) -> None:
        if "error" not in result:
            result["drop"] = _drop(base_q, result["quality"], absolute)
            result["meets"] = result["drop"] <= max_drop + 1e-12
            try:
                side = timer.compare([t for t in start_trial() if t["name"] != result["name"]] + [result])
            except NetshrinkError as exc:  # a saved model that cannot be reloaded cannot be the answer
                result = {"name": result["name"], "phase": result.get("phase"),
                          "error": f"saved model did not reload: {exc.one_line()}", "seconds": result["seconds"]}
            else:
                result["latency_ms"] = side[result["name"]]["median_ms"]
                result["speedup"] = side[result["name"]]["speedup"]
        state["trials"].append(result)
        done[result["name"]] = result
        state["elapsed_s"] = time.perf_counter() - started
        _update_best(out_dir, state)
        _save_state(state_path, state)

    def scan() -> list[str]:
        """The `fallback_layers` layers whose quantization alone costs the most quality (scan saved in state)."""
        if not state.get("sensitivity"):
            from netshrink.recipes.sweep import quant_sensitivity_scan

            method = "int8-static" if kind == "cnn" else "int8-dynamic"
            rows = quant_sensitivity_scan(model, weight_layers(model), method, task, pool, n, seed)
            for row in rows:
                row["drop"] = _drop(base_q, row["quality"], absolute)
            state["sensitivity"] = rows
            _save_state(state_path, state)
        ranked = sorted(state["sensitivity"], key=lambda r: -r["drop"])
        return [r["layer"] for r in ranked[:fallback_layers]]

    try:
        base: Candidate | None = None
        for cand in (c for c in candidates if c.phase == "escalate"):
            if time.perf_counter() - started > time_budget_s:
                stopped = True
                break
            if _uses_fallback(cand):
                cand = _with_fallback(cand, scan())
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
        _final_ranking(timer, state)
        _update_best(out_dir, state)
        _save_state(state_path, state)
    finally:
        if isinstance(executor, str):
            pool.close()
    result = TuneResult(out_dir, state["baseline"], state["trials"], _best(state), max_drop, stopped, absolute=absolute,
                        sensitivity=state.get("sensitivity", []))
    result.report = _write_report(result, state)
    return result


def _final_ranking(timer: _Timer, state: dict[str, Any]) -> None:
    """Time the starting point and every trial that met the budget in one interleaved comparison; their
    `latency_ms` / `speedup` become these side-by-side figures, which choose the best."""
    ok = [t for t in state["trials"] if "error" not in t]
    chosen = [t for i, t in enumerate(ok) if t.get("meets") or i == 0]
    if not chosen:
        return
    timer.rounds = max(timer.rounds, 20)
    side = timer.compare(chosen)
    for t in chosen:
        t["latency_ms"], t["speedup"] = side[t["name"]]["median_ms"], side[t["name"]]["speedup"]
        t["final"] = True
    state["baseline"]["latency_side_ms"] = side["baseline"]["median_ms"]


def _on_top(cand: Candidate, base: Candidate) -> Candidate:
    """A pruning candidate followed by the base quantization stages."""
    recipe = copy.deepcopy(cand.recipe)
    recipe["stages"] += copy.deepcopy(base.recipe["stages"])
    recipe["name"] = f"{recipe['name']}+{base.name}"
    return Candidate(cand.name.replace("{base}", base.name), recipe, cand.phase)


def _best(state: dict[str, Any]) -> dict[str, Any] | None:
    meeting = [t for t in state["trials"] if t.get("meets")]
    return max(meeting, key=lambda t: (t["speedup"], t["quality"])) if meeting else None


def _update_best(out_dir: Path, state: dict[str, Any]) -> None:
    """Copy the best trial's model to out/best (atomically) when the best changed."""
    best = _best(state)
    if best is None or state.get("best") == best["name"]:
        return
    with atomic_dir(out_dir / "best", overwrite=True) as tmp:
        shutil.copytree(Path(best["path"]) / "model", tmp / "model")
        (tmp / "trial.json").write_text(json.dumps(best, indent=2))
    state["best"] = best["name"]


def pruned_fraction(trial: dict[str, Any]) -> float:
    """How much the trial pruned: its recipe's prune sparsity (channels for structured), or the zero fraction."""
    levels = [body.get("sparsity", 0.5 if body.get("method") == "nm" else 0.0)
              for item in trial.get("recipe", {}).get("stages", []) for kind, body in item.items() if kind == "prune"]
    return max([float(trial.get("sparsity", 0.0))] + levels)


def _write_report(result: TuneResult, state: dict[str, Any]) -> dict[str, Path]:
    from netshrink.report import Report, Table, write_report
    from netshrink.report.plots import (pareto_figure, quality_vs_level_figure, sensitivity_heatmap_figure,
                                        size_memory_figure)

    ok = [t for t in result.trials if "error" not in t]
    base = result.baseline
    metric = base["metric"]
    base_ms = base.get("latency_side_ms", base["latency_ms"])
    best = result.best["name"] if result.best else None
    rows = [["baseline (fp32)", base["quality"], 0.0, base_ms, 1.0, base["weight_mib"], base["sparsity"], 32, "-",
             ""]]
    rows += [[t["name"], t["quality"], result.drop_text(t["drop"]), t["latency_ms"], t["speedup"], t["weight_mib"],
              pruned_fraction(t), t.get("bits"), t["meets"], "chosen" if t["name"] == best else ""] for t in ok]
    rows += [[t["name"], None, None, None, None, None, None, None, "failed", t["error"]] for t in result.trials
             if "error" in t]
    floor = base["quality"] - (result.max_drop if result.absolute else result.max_drop * abs(base["quality"]))
    figures = [("Quality vs latency of every trial, with the Pareto frontier", pareto_figure(
        [base_ms] + [t["latency_ms"] for t in ok], [base["quality"]] + [t["quality"] for t in ok],
        ["baseline"] + [t["name"] for t in ok], quality_name=metric, quality_floor=floor))]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for t in ok:
        label = f"{t.get('bits', 32)}-bit"
        xs, ys = series.setdefault(label, ([], []))
        xs.append(pruned_fraction(t))
        ys.append(t["quality"])
    series = {k: tuple(zip(*sorted(zip(*v)))) for k, v in series.items()}
    figures.append((f"{metric} vs sparsity (pruned fraction), one line per weight bit width (dashed: baseline)",
                    quality_vs_level_figure(series, "sparsity: fraction of weights / channels pruned", metric,
                                            base["quality"])))
    figures.append(("Weight memory of every variant (MiB)", size_memory_figure(
        ["baseline"] + [t["name"] for t in ok], [base["weight_mib"]] + [t["weight_mib"] for t in ok],
        title="Weight memory (MiB)")))
    tables = [Table("Trials side by side", ["variant", metric, "drop", "latency b1 (ms)", "speedup", "weights (MiB)",
                                            "pruned", "bits", "meets budget", "note"], rows,
                    notes="Latencies are batch-1 medians on one thread, each trial timed interleaved with the baseline "
                          "in one process (netshrink.bench.compare); the starting point and every trial that met the "
                          "budget were re-timed together at the end, and that comparison chose the best.")]
    scan = result.sensitivity
    if scan:
        layers = [r["layer"] for r in scan]
        drops = [[r["drop"] * (100 if result.absolute else 100)] for r in scan]
        figures.append(("Per-layer sensitivity: quality drop with only that layer quantized to INT8",
                        sensitivity_heatmap_figure(layers, [scan[0]["method"]], drops, level_name="quantized alone",
                                                   value_name="drop (points)" if result.absolute else "drop (%)")))
        tables.append(Table("Sensitivity scan", ["layer", "method", metric, "drop"],
                            [[r["layer"], r["method"], r["quality"], result.drop_text(r["drop"])] for r in scan]))
    report = Report(f"netshrink tune: {state['model']} on {state['task']}", "\n".join(result.lines()), tables,
                    figures, data=state)
    return write_report(report, result.out_dir, overwrite=True)
