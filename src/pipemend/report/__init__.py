"""HTML and Markdown reports of a run directory (``render_report``)."""

from __future__ import annotations

from .render import render_report

__all__ = ["render_report"]
