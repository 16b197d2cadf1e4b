"""``pipemend report``, ``branches`` and ``apply``: a finished (or running) run, for a person to review."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..report import render_report
from ..report.load import resolve_run_dir
from ..review import apply_candidate, list_candidates, parse_candidate
from .common import out
from .render import candidates_table


def report(run: Path = typer.Argument(..., help="A run directory (reports/<run-id>) or a run id.")) -> None:
    """Re-render report.html, report.md and the candidate pages of a run."""
    html, md = render_report(resolve_run_dir(run))
    out.print(f"wrote {html}\nwrote {md}", highlight=False, markup=False)


def branches(
    run: Path = typer.Argument(..., help="A run directory (reports/<run-id>) or a run id."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout, nothing else."),
) -> None:
    """List a run's candidates: verdict, val delta and the branch (accepted) or ref (rejected)."""
    rows = list_candidates(run)
    if json_out:
        sys.stdout.write(json.dumps({"candidates": rows}) + "\n")
        return
    out.print(candidates_table(f"candidates of {Path(run).name}", rows))
    if not rows:
        out.print("no candidates yet")


def apply(
    run: Path = typer.Argument(..., help="A run directory (reports/<run-id>) or a run id."),
    candidate: str = typer.Argument(..., help="A candidate number (3 or cand-3) or 'best' (all accepted changes)."),
    onto: Optional[str] = typer.Option(None, "--onto", help="Check out this branch first and commit there."),
) -> None:
    """Bring an accepted candidate's change into your branch as one new commit."""
    parse_candidate(candidate)  # a bad candidate is a usage error before anything is read
    sha = apply_candidate(run, candidate, onto=onto)
    out.print(f"applied {candidate}: {sha}", highlight=False, markup=False)
