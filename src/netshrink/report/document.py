"""What a report holds: a title, a summary, side-by-side tables, figures and a JSON-able data payload."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class Table:
    """One side-by-side table: `rows` hold one value per column (numbers are formatted when rendered)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: str = ""


@dataclass
class Report:
    """One run's report; `figures` are (caption, matplotlib Figure) pairs, `data` is the raw JSON-able payload."""

    title: str
    summary: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, "Figure"]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
