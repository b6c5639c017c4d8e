"""Turn a report into plain JSON: numpy and torch scalars become numbers, NaN/inf become null (strict JSON)."""
from __future__ import annotations

import datetime
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from netshrink.report.document import Report


def jsonable(value: Any) -> Any:
    """`value` as nested dicts/lists of str, int, float, bool, None; refuses what has no faithful JSON form."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(value.tolist())
    if hasattr(value, "item"):
        return jsonable(value.item())
    raise TypeError(f"report data holds a {type(value).__name__}, which has no JSON form")


def report_payload(report: Report) -> dict[str, Any]:
    """The JSON document written as report.json: tables, figure captions and the data payload."""
    from netshrink import __name__ as package

    return {
        "title": report.title,
        "summary": report.summary,
        "generator": package,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tables": [
            {"title": t.title, "columns": list(t.columns), "rows": jsonable(t.rows), "notes": t.notes}
            for t in report.tables
        ],
        "figures": [caption for caption, _ in report.figures],
        "data": jsonable(report.data),
    }
