"""Run reports: JSON plus one self-contained HTML page with tables and figures."""
from netshrink.report.document import Report, Table
from netshrink.report.writer import write_report

__all__ = ["Report", "Table", "write_report"]
