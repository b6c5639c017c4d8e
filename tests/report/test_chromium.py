"""The HTML report opens in headless Chromium from disk: no console errors, and the screenshot is not blank."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from netshrink.report import Report, Table, write_report
from netshrink.report import plots

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian chromium (apt-get install chromium)")


def open_in_chromium(page, tmp_path, *extra):
    """Run headless Chromium on a file: URL; returns (stdout, stderr) with console logging on stderr."""
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", "--window-size=1200,1600", *extra, page.resolve().as_uri(),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


def console_messages(stderr: str) -> list[str]:
    """Chromium logs page console output (errors, CSP violations, failed loads) as ':CONSOLE' lines."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_report_renders_without_console_errors_and_is_not_blank(tmp_path):
    figure = plots.pareto_figure([3.0, 1.5, 1.0], [0.98, 0.97, 0.90], labels=["fp32", "int8", "int8+50%"])
    report = Report(
        title="Chromium check",
        summary="One page, opened from disk.",
        tables=[Table("Variants", ["variant", "accuracy"], [["fp32", 0.98], ["int8", 0.97]])],
        figures=[("Pareto", figure)],
    )
    page = write_report(report, tmp_path / "out")["html"]
    shot = tmp_path / "shot.png"
    _, stderr = open_in_chromium(page, tmp_path, f"--screenshot={shot}")
    assert console_messages(stderr) == []
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    non_white = (pixels < 240).any(axis=2).mean()
    assert pixels.shape[0] >= 1000 and 0.02 < non_white < 0.9
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, table shading and the plot's colours
    dom, _ = open_in_chromium(page, tmp_path, "--dump-dom")
    assert "Chromium check" in dom and "<td>int8</td>" in dom and "data:image/png;base64," in dom


def test_console_check_catches_an_external_resource(tmp_path):
    """The check can fail: a page that tries to fetch from the network logs a console error under our CSP."""
    page = write_report(Report(title="bad"), tmp_path / "out")["html"]
    page.write_text(page.read_text().replace("<h1>", '<img src="http://example.invalid/x.png"><h1>'))
    _, stderr = open_in_chromium(page, tmp_path, "--dump-dom")
    assert any("example.invalid" in line for line in console_messages(stderr))
