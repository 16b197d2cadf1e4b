"""``pipemend report``, ``branches`` and ``apply``: plain typer-annotated functions.

``cli.py`` registers them (wrapped in ``cli_command``, which turns a
``UsageError`` into exit 2 with its message).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

out = Console()


def report(run: Path = typer.Argument(..., help="A run directory (reports/<run-id>) or a run id.")) -> None:
    """Re-render report.html, report.md and the candidate pages of a run."""
    from .report import render_report
    from .report.load import resolve_run_dir

    html, md = render_report(resolve_run_dir(run))
    out.print(f"wrote {html}\nwrote {md}", highlight=False)


def branches(
    run: Path = typer.Argument(..., help="A run directory (reports/<run-id>) or a run id."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout, nothing else."),
) -> None:
    """List a run's candidates: verdict, val delta and the branch (accepted) or ref (rejected)."""
    from .review import list_candidates

    rows = list_candidates(run)
    if json_out:
        sys.stdout.write(json.dumps({"candidates": rows}) + "\n")
        return
    table = Table(title=f"candidates of {Path(run).name}")
    for col, justify in (("#", "right"), ("verdict", "left"), ("val", "right"), ("delta", "right"), ("change", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    table.add_column("branch / ref", no_wrap=True)  # copied into git commands: never split
    colour = {"accepted": "green", "rejected": "red"}
    for r in rows:
        v = r["verdict"]
        table.add_row(str(r["n"]), f"[{colour.get(v, 'yellow')}]{v}[/]",
                      "-" if r["val_score"] is None else f"{r['val_score']:.3f}",
                      "-" if r["delta"] is None else f"{r['delta']:+.3f}",
                      r["title"] if r["accepted"] else f"{r['title']} [dim]({(r['reasons'] or ['-'])[0][:60]})[/]",
                      r["branch"] or "-")
    out.print(table)
    if not rows:
        out.print("no candidates yet")


def apply(
    run: Path = typer.Argument(..., help="A run directory (reports/<run-id>) or a run id."),
    candidate: str = typer.Argument(..., help="A candidate number (3 or cand-3) or 'best' (all accepted changes)."),
    onto: Optional[str] = typer.Option(None, "--onto", help="Check out this branch first and commit there."),
) -> None:
    """Bring an accepted candidate's change into your branch as one new commit."""
    from .review import apply_candidate, parse_candidate

    parse_candidate(candidate)  # a bad candidate is a usage error before anything is read
    sha = apply_candidate(run, candidate, onto=onto)
    out.print(f"applied {candidate}: {sha}", highlight=False)
