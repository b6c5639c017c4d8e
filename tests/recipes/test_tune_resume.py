"""A tuning run saves its best model after every trial; killed mid-run, it resumes without redoing trials.

Every trial quantizes (INT8 PTQ first, then magnitude pruning with INT8 PTQ on top), so the saved and resumed
models are quantized ones."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    from netshrink.recipes.executors import LocalExecutor
    from netshrink.recipes.tune import Candidate, tune

    def prune(s):
        return Candidate(f"magnitude{int(s * 100)}", {"name": "m", "stages": [
            {"prune": {"method": "magnitude", "sparsity": s, "scope": "layer"}},
            {"finetune": {"steps": 3, "batch_size": 32}}]}, "prune")

    ptq = Candidate("int8-ptq", {"name": "q", "stages": [
        {"quantize": {"method": "int8-static", "calibration_samples": 128}}]})
    plan = [ptq] + [prune(s) for s in (0.2, 0.4, 0.6, 0.95)]
    result = tune("digit-cnn", task="digits", max_drop=0.05, out=sys.argv[1], resume=len(sys.argv) > 2,
                  executor=LocalExecutor(workers=1), n=150, plan=plan)
    print("\\n".join(result.lines()))
""")


def run(tmp_path, *args):
    script = tmp_path / "run_tune.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.mark.slow
def test_killed_tune_resumes_and_keeps_best(tmp_path):
    out = tmp_path / "run"
    state = out / "state.json"
    proc = run(tmp_path, str(out))
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and len(json.loads(state.read_text())["trials"]) >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = json.loads(state.read_text())
    assert 1 <= len(before["trials"]) < 5
    assert (out / "best" / "model").exists() == any(t.get("meets") for t in before["trials"])

    proc = run(tmp_path, str(out), "--resume")
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    after = json.loads(state.read_text())
    names = [t["name"] for t in after["trials"]]
    assert names == ["int8-ptq", "magnitude20", "magnitude40", "magnitude60", "magnitude95"]  # none redone or lost
    keep = ("name", "quality", "drop", "meets", "path", "weight_mib", "sparsity", "bits")
    assert [{k: t[k] for k in keep} for t in after["trials"][: len(before["trials"])]] == \
        [{k: t[k] for k in keep} for t in before["trials"]]  # only the final side-by-side timings are re-measured
    worst = after["trials"][-1]
    assert not worst["meets"] and worst["drop"] > 0.05  # 95% sparsity with 3 steps of recovery cannot hold accuracy
    best = json.loads((out / "best" / "trial.json").read_text())
    meeting = [t for t in after["trials"] if t.get("meets")]
    assert best["name"] == max(meeting, key=lambda t: t["speedup"])["name"] == after["best"]
    assert all(t.get("final") for t in meeting)  # the winner came from one interleaved comparison
    from netshrink.export.checkpoint import load_checkpoint_entry
    from netshrink.record import layer_record

    record = layer_record(load_checkpoint_entry(out / "best" / "model").model)
    assert {f.get("method") for f in record.values()} & {"int8_static"}  # the kept best model is quantized
    assert (out / "report.html").exists() and "best:" in stdout
