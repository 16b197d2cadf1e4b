"""``pipemend optimize`` and ``pipemend resume``: plain typer-annotated functions.

``cli.py`` registers them (``app.command("optimize")(cli_command(cli_optimize.optimize))``).
They map errors to exit codes themselves too: 2 for bad usage or config, 1 for a failed run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from .errors import PipemendError, SandboxUnavailable, UsageError

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _exit_for(e: Exception) -> typer.Exit:
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "options"
        err.print(f"[bold red]error:[/] --{where.replace('_', '-')}: {escape(first.get('msg', 'invalid value'))}")
        return typer.Exit(2)
    if isinstance(e, (UsageError, SandboxUnavailable)):
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        return typer.Exit(2)
    err.print(f"[bold red]run failed:[/] {escape(str(e))}")
    return typer.Exit(1)


def optimize(
    target: Path = typer.Argument(..., help="The target pipeline's folder (holding pipemend.yaml)."),
    proposer: str = typer.Option("ladder", help="claude | claude-code | ladder | package.module:Class."),
    model: Optional[str] = typer.Option(None, help="Model the pipeline calls (default: the manifest's llm.model)."),
    agent_model: Optional[str] = typer.Option(None, help="Model of an LLM proposer."),
    budget_usd: float = typer.Option(5.0, help="Dollars the gateway may spend on pipeline calls (test split included)."),
    max_candidates: int = typer.Option(10, help="Candidates to propose at most."),
    hours: Optional[float] = typer.Option(None, help="Stop proposing after this many hours."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N examples of each split."),
    sandbox: str = typer.Option("auto", help="docker | bwrap | process | auto."),
    run_id: Optional[str] = typer.Option(None, help="Run id (default optimize-<date>-<time>-<hex>)."),
    reports_dir: Path = typer.Option(Path("reports"), help="Folder holding run directories."),
    cache_dir: Optional[Path] = typer.Option(
        None, help="LLM response cache to share across runs (default: one per run, RUN_DIR/gateway/cache)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Propose, gate and keep changes to a pipeline; every accepted one is a git branch."""
    from .optimize import OptimizeConfig, run_optimize

    try:
        cfg = OptimizeConfig(target=str(target), proposer=proposer, model=model, agent_model=agent_model,
                             budget_usd=budget_usd, max_candidates=max_candidates, hours=hours, limit=limit,
                             sandbox=sandbox, run_id=run_id, reports_dir=str(reports_dir),
                             cache_dir=str(cache_dir) if cache_dir else None)
        summary = run_optimize(cfg, console=Console(stderr=True))
    except (ValidationError, PipemendError) as e:
        raise _exit_for(e) from None
    if json_out:
        sys.stdout.write(json.dumps(summary.model_dump(mode="json")) + "\n")


def resume(
    run: Path = typer.Argument(..., help="A run directory (reports/<run-id>) or a run id."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Continue an optimize run after a crash or kill, keeping everything accepted and paying nothing twice."""
    from .optimize import resume as resume_run

    try:
        summary = resume_run(run, console=Console(stderr=True))
    except (ValidationError, PipemendError) as e:
        raise _exit_for(e) from None
    if json_out:
        sys.stdout.write(json.dumps(summary.model_dump(mode="json")) + "\n")
