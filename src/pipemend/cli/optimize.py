"""``pipemend optimize`` and ``pipemend resume``: the library's ``run_optimize`` / ``resume``, presented
(a rich status line and log while it runs, the summary table at the end, ``--json``: the summary only)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from ..errors import UsageError
from ..optimize import OptimizeConfig, OptimizeSummary, ladder_change, resume, run_optimize
from .common import (EXECUTOR_HELP, GATEWAY_HOST_HELP, GATEWAY_PORT_HELP, RAY_ADDRESS_HELP, RAY_TASK_CPUS_HELP,
                     err, executor_options, options_error)
from .progress import RichProgress
from .render import summary_table, summary_footer


def print_summary(console: Console, s: OptimizeSummary) -> None:
    console.print(summary_table(s))
    for line in summary_footer(s, ladder_change(s.run_dir, s.best["n"] if s.best else None)):
        console.print(escape(line))


def _show(summary: OptimizeSummary, json_out: bool) -> None:
    print_summary(err, summary)
    if json_out:
        sys.stdout.write(json.dumps(summary.model_dump(mode="json")) + "\n")


def parse_deadline(text: str | None) -> float | None:
    """``--deadline``: ISO 8601 (``2026-11-30T06:00:00Z``; no zone means UTC) or seconds since the epoch."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"--deadline {text!r}: expected an ISO 8601 time (2026-11-30T06:00:00Z) "
                             "or seconds since the epoch") from None
        value = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    if value <= 0:
        raise UsageError(f"--deadline {text!r}: must be after 1970")
    return value


def mlflow_from_env() -> str | None:
    """``MLFLOW_TRACKING_URI`` turns MLflow logging on when the mlflow package is there to do it; a user who set
    it for other tools and has no mlflow gets a note, not a refused run (``--mlflow`` given and no package is an error)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri and importlib.util.find_spec("mlflow") is None:
        err.print(f"MLFLOW_TRACKING_URI is set ({escape(uri)}) but mlflow is not installed: not logging to MLflow "
                  "(pip install 'pipemend[mlflow]')")
        return None
    return uri


DEADLINE_HELP = "Stop proposing at this time (ISO 8601 or epoch seconds), e.g. a CI job's end; the test split still runs."


def optimize(
    target: Path = typer.Argument(..., help="The target pipeline's folder (holding pipemend.yaml)."),
    proposer: str = typer.Option("ladder", help="claude | claude-code | ladder | reflect | package.module:Class."),
    model: Optional[str] = typer.Option(None, help="Model the pipeline calls (default: the manifest's llm.model)."),
    agent_model: Optional[str] = typer.Option(None, help="Model of an LLM proposer."),
    budget_usd: float = typer.Option(5.0, help="Dollars the gateway may spend on pipeline calls (test split included)."),
    max_candidates: int = typer.Option(10, help="Candidates to propose at most."),
    parallel: int = typer.Option(1, help="Candidates proposed from the same base and evaluated at once (1..16)."),
    hours: Optional[float] = typer.Option(None, help="Stop proposing after this many hours."),
    deadline: Optional[str] = typer.Option(None, help=DEADLINE_HELP),
    limit: Optional[int] = typer.Option(None, help="Use only the first N examples of each split."),
    sandbox: str = typer.Option("auto", help="docker | bwrap | process | auto."),
    run_id: Optional[str] = typer.Option(None, help="Run id (default optimize-<date>-<time>-<hex>)."),
    reports_dir: Path = typer.Option(Path("reports"), help="Folder holding run directories."),
    cache_dir: Optional[Path] = typer.Option(
        None, help="LLM response cache to share across runs (default: one per run, RUN_DIR/gateway/cache)."),
    otlp_endpoint: Optional[str] = typer.Option(
        None, help="Send each evaluated example as OpenTelemetry spans to this OTLP/HTTP traces URL as the run goes "
                   "(headers from OTEL_EXPORTER_OTLP_HEADERS)."),
    mlflow: Optional[str] = typer.Option(
        None, help="MLflow tracking URI: a run per candidate, prompts registered, traces sent "
                   "(default: MLFLOW_TRACKING_URI when set and mlflow is installed)."),
    executor: Optional[str] = typer.Option(None, help=EXECUTOR_HELP),
    ray_address: Optional[str] = typer.Option(None, help=RAY_ADDRESS_HELP),
    ray_task_cpus: Optional[float] = typer.Option(None, help=RAY_TASK_CPUS_HELP),
    gateway_host: str = typer.Option("127.0.0.1", help=GATEWAY_HOST_HELP),
    gateway_port: int = typer.Option(0, help=GATEWAY_PORT_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Propose, gate and keep changes to a pipeline; every accepted one is a git branch."""
    try:
        cfg = OptimizeConfig(target=str(target), proposer=proposer, model=model, agent_model=agent_model,
                             budget_usd=budget_usd, max_candidates=max_candidates, parallel=parallel, hours=hours,
                             deadline=parse_deadline(deadline), limit=limit,
                             sandbox=sandbox, run_id=run_id, reports_dir=str(reports_dir),
                             cache_dir=str(cache_dir) if cache_dir else None, otlp_endpoint=otlp_endpoint,
                             mlflow=mlflow or mlflow_from_env(),
                             **executor_options(executor, ray_address, ray_task_cpus), gateway_host=gateway_host,
                             gateway_port=gateway_port)
    except ValidationError as e:
        raise options_error(e) from None
    with RichProgress(err) as progress:
        summary = run_optimize(cfg, progress)
    _show(summary, json_out)


def resume_cmd(
    run: Path = typer.Argument(..., help="A run directory (reports/<run-id>) or a run id."),
    deadline: Optional[str] = typer.Option(None, help=DEADLINE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Continue an optimize run after a crash or kill, keeping everything accepted and paying nothing twice."""
    with RichProgress(err) as progress:
        summary = resume(run, progress, deadline=parse_deadline(deadline))
    _show(summary, json_out)
