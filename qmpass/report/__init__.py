"""Human-readable reports of an analysis (the JSON report is ``Analysis.to_dict``)."""

from qmpass.report.html import render_html

__all__ = ["render_html"]
