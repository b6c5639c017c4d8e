"""The report: JSON round trip, a self-contained HTML page, figures as PNGs, refusal to overwrite."""
from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from netshrink.errors import NetshrinkError
from netshrink.report import Report, Table, write_report
from netshrink.report import plots
from netshrink.report.html import format_cell


def sample_report() -> Report:
    """A report with every kind of content the tuner and compress write."""
    lat = [4.0, 2.1, 1.5, 1.2, 2.5]
    acc = [0.981, 0.978, 0.975, 0.940, 0.970]
    table = Table(
        title="Side by side",
        columns=["variant", "accuracy", "latency (ms)", "size (bytes)", "meets budget"],
        rows=[["fp32 <baseline>", acc[0], lat[0], 1_234_567, True], ["int8", acc[1], np.float32(lat[1]), 400_000, False]],
        notes="Timings were taken on a shared machine.",
    )
    figures = [
        ("Pareto frontier", plots.pareto_figure(lat, acc, labels=list("abcde"), quality_name="accuracy", quality_floor=0.971)),
        ("Sensitivity", plots.sensitivity_curves_figure({"conv1": ([0, 0.5], [0.98, 0.9]), "fc": ([0, 0.5], [0.98, 0.97])})),
        ("Heatmap", plots.sensitivity_heatmap_figure(["conv1", "fc"], [0.25, 0.5], [[0.01, 0.08], [0.0, 0.01]])),
        ("Quality vs bits", plots.quality_vs_level_figure({"rtn": ([8, 4], [0.98, 0.9])}, x_label="bits", baseline=0.981)),
        ("Size", plots.size_memory_figure(["fp32", "int8"], [1.2, 0.4], [30.0, 22.0])),
    ]
    data = {"trials": [{"latency_ms": v, "acc": a} for v, a in zip(lat, acc)], "nan": float("nan"), "arr": np.arange(3)}
    return Report(title="Tune <digit-cnn>", summary="Best: int8 & pruned.", tables=[table], figures=figures, data=data)


def test_write_report_round_trips_json_and_escapes_html(tmp_path):
    paths = write_report(sample_report(), tmp_path / "out")
    payload = json.loads(paths["json"].read_text())
    assert payload["title"] == "Tune <digit-cnn>"
    assert payload["tables"][0]["rows"][1][2] == pytest.approx(2.1, rel=1e-6)
    assert payload["data"]["nan"] is None and payload["data"]["arr"] == [0, 1, 2]
    assert payload["figures"] == ["Pareto frontier", "Sensitivity", "Heatmap", "Quality vs bits", "Size"]
    page = paths["html"].read_text()
    assert "&lt;baseline&gt;" in page and "<baseline>" not in page
    assert "1,234,567" in page
    assert not list(tmp_path.glob("out/*.partial"))


def test_html_is_self_contained_with_valid_pngs(tmp_path):
    page = write_report(sample_report(), tmp_path)["html"].read_text()
    # Nothing may be fetched: every src/href is a data: URI, and there is no script.
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attr.startswith("data:image/png;base64,"), attr
    assert "<script" not in page and "http://" not in page and "https://" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 5
    for encoded in images:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert image.format == "PNG" and image.width > 200 and image.height > 100


def test_refuses_to_overwrite_unless_asked(tmp_path):
    write_report(Report(title="a"), tmp_path)
    with pytest.raises(NetshrinkError, match="already exists"):
        write_report(Report(title="b"), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["title"] == "a"
    write_report(Report(title="b"), tmp_path, overwrite=True)
    assert json.loads((tmp_path / "report.json").read_text())["title"] == "b"


def test_unserialisable_data_is_a_clear_error(tmp_path):
    with pytest.raises(NetshrinkError, match="object"):
        write_report(Report(title="x", data={"model": object()}), tmp_path)
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize(
    "value, text",
    [(None, "\u2014"), (float("nan"), "\u2014"), (True, "yes"), (1234567, "1,234,567"), (0.98765, "0.9877"),
     (12345.678, "12,345.7"), (np.float64(0.5), "0.5"), ("int8", "int8")],
)
def test_format_cell(value, text):
    assert format_cell(value) == text


def test_heatmap_shape_is_checked():
    with pytest.raises(ValueError, match="2 layers x 3 levels"):
        plots.sensitivity_heatmap_figure(["a", "b"], [1, 2, 3], [[0.0, 1.0], [1.0, 0.0]])
