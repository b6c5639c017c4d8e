"""Write a report as report.json and report.html, each atomically, so a crash never leaves half a page."""
from __future__ import annotations

import json
from pathlib import Path

from netshrink.atomic import atomic_file, refuse_existing
from netshrink.errors import NetshrinkError
from netshrink.report.document import Report
from netshrink.report.html import render_html
from netshrink.report.payload import report_payload


def write_report(report: Report, out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write `out_dir/report.json` and `out_dir/report.html`; returns {"json": path, "html": path}."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NetshrinkError("report folder is a file", where=str(out_dir), hint="pass a folder path")
    try:
        payload = report_payload(report)
        text_json = json.dumps(payload, indent=2, allow_nan=False)
    except TypeError as exc:
        raise NetshrinkError(str(exc), where=f"report {report.title!r}", hint="convert it to numbers or strings") from exc
    text_html = render_html(report, payload)
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    if not overwrite:
        for path in paths.values():
            refuse_existing(path, "report")
    with atomic_file(paths["json"], overwrite=overwrite) as tmp:
        tmp.write_text(text_json, encoding="utf-8")
    with atomic_file(paths["html"], overwrite=overwrite) as tmp:
        tmp.write_text(text_html, encoding="utf-8")
    return paths
