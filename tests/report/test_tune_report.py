"""The tune report holds the side-by-side table, the Pareto frontier, the sensitivity heatmap, quality vs
sparsity/bits and the size figure, and opens in headless Chromium without console errors."""
from __future__ import annotations

import json

import pytest

from netshrink.recipes.tune import TuneResult, _write_report

from test_chromium import CHROMIUM, console_messages, open_in_chromium


def trial(name, quality, latency, sparsity, bits, meets, speedup):
    return {"name": name, "quality": quality, "drop": 0.95 - quality, "latency_ms": latency, "speedup": speedup,
            "weight_mib": 1.5 * (1 - sparsity) * bits / 32, "sparsity": sparsity, "bits": bits, "meets": meets,
            "metric": "accuracy", "path": "unused"}


@pytest.fixture()
def tune_report(tmp_path):
    baseline = {"quality": 0.95, "metric": "accuracy", "latency_ms": 0.40, "weight_mib": 1.5, "sparsity": 0.0}
    trials = [trial("int8-ptq", 0.948, 0.30, 0.0, 8, True, 1.33), trial("structured50+int8-ptq", 0.945, 0.12, 0.5, 8,
                                                                       True, 3.3),
              trial("structured75+int8-ptq", 0.90, 0.08, 0.75, 8, False, 5.0),
              {"name": "broken", "error": "x.yaml:3 stages[0]: failed"}]
    scan = [{"layer": "conv_layers.0", "method": "int8-static", "quality": 0.93, "drop": 0.02},
            {"layer": "fc_layers.2", "method": "int8-static", "quality": 0.949, "drop": 0.001}]
    state = {"model": "digit-cnn", "task": "digits", "baseline": baseline, "trials": trials, "sensitivity": scan}
    result = TuneResult(tmp_path, baseline, trials, trials[1], 0.01, absolute=True, sensitivity=scan)
    return _write_report(result, state)


def test_tune_report_has_every_part(tune_report):
    payload = json.loads(tune_report["json"].read_text())
    captions = " | ".join(payload["figures"])
    for part in ("Pareto frontier", "sensitivity", "vs sparsity", "Weight memory"):
        assert part in captions, captions
    side = payload["tables"][0]
    assert side["title"] == "Trials side by side" and len(side["rows"]) == 5  # baseline + 3 trials + the failure
    chosen = [row for row in side["rows"] if row[-1] == "chosen"]
    assert [row[0] for row in chosen] == ["structured50+int8-ptq"]
    assert payload["tables"][1]["title"] == "Sensitivity scan"
    page = tune_report["html"].read_text()
    assert page.count("data:image/png;base64,") == 4 and "+0.20 pt" in page  # drops shown in accuracy points


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian chromium (apt-get install chromium)")
def test_tune_report_opens_in_chromium(tune_report, tmp_path):
    dom, stderr = open_in_chromium(tune_report["html"], tmp_path, "--dump-dom")
    assert console_messages(stderr) == []
    assert "netshrink tune: digit-cnn on digits" in dom and "structured50+int8-ptq" in dom
