"""HTML and Markdown reports of a run directory (``render_report``), and the gate's verdicts in plain words
(``explain``: why a candidate was kept or refused; ``guarantee``: what the whole run promises)."""

from __future__ import annotations

from .explain import explain, guarantee
from .render import render_report

__all__ = ["explain", "guarantee", "render_report"]
