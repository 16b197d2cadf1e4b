"""``pipemend ci optimize`` and ``pipemend ci publish``: the two jobs of the GitHub Actions workflow
(``pipemend.ghactions``), presented. Exit 1 whenever the conclusion is ``failed``: never a green job
with no run."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..ghactions import Caps, GitHubClient, OptimizeJob, PublishJob, ci_optimize, ci_publish, default_deadline, read_env
from .common import FAILED_EXIT, cli_command, err
from .progress import RichProgress

app = typer.Typer(name="ci", help="Run pipemend in GitHub Actions: optimize (read-only job), publish (PR job).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

TOKEN_HELP = "GitHub token (default $GITHUB_TOKEN); a GitHub App or PAT token makes the PR trigger other workflows."


def optimize_cmd(
    target: Optional[str] = typer.Option(None, help="Target folder when the event names none (schedule, blank input)."),
    proposer: str = typer.Option("ladder", help="claude | claude-code | ladder | reflect."),
    model: Optional[str] = typer.Option(None, help="Model the pipeline calls (default the manifest's llm.model)."),
    agent_model: Optional[str] = typer.Option(None, help="Model of an LLM proposer."),
    budget: float = typer.Option(3.0, help="Dollars a run spends at most, unless the event asks for less or more."),
    max_candidates: int = typer.Option(5, help="Candidates to propose, unless the event asks otherwise."),
    hours: Optional[float] = typer.Option(None, help="Hours to propose for (the job's deadline also applies)."),
    max_budget: float = typer.Option(10.0, help="Cap on the dollars any event may ask for."),
    max_candidates_cap: int = typer.Option(20, help="Cap on the candidates any event may ask for."),
    sandbox: str = typer.Option("auto", help="docker | bwrap | process | auto."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N examples of each split."),
    deadline: Optional[float] = typer.Option(
        None, help="Epoch seconds by which to stop proposing (default: job start + 6 h - 40 min)."),
    job_started: Optional[float] = typer.Option(None, help="Epoch seconds the job started (default now)."),
    artifact_dir: Path = typer.Option(Path("pipemend-artifact"), help="Folder to write the artifact into."),
    state_dir: Path = typer.Option(Path(".pipemend-ci"), help="Cached between jobs: run directories, resume state."),
    repo: Path = typer.Option(Path("."), help="The repository checkout."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP),
) -> None:
    """Resolve the event's request, run or resume optimize, write the artifact, outputs and Step Summary."""
    env = read_env(token=token)
    job = OptimizeJob(repo_root=repo.resolve(), artifact_dir=artifact_dir.resolve(), state_dir=state_dir.resolve(),
                      deadline=deadline if deadline is not None else default_deadline(job_started),
                      defaults={"target": target, "proposer": proposer, "model": model, "agent_model": agent_model,
                                "budget_usd": budget, "max_candidates": max_candidates, "hours": hours},
                      caps=Caps(budget_usd=max_budget, max_candidates=max_candidates_cap), sandbox=sandbox, limit=limit)
    # Actions stops a cancelled or timed-out job with SIGINT, then SIGTERM: both unwind (the run's branches
    # are bundled and the artifact written on the way out), so the next job can resume the run.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with RichProgress(err) as progress:
        result = ci_optimize(env, job, GitHubClient(env.api_url, env.token), environ=os.environ, progress=progress)
    err.print(f"pipemend ci: {result.conclusion}" + (f": {escape(result.error)}" if result.error else ""))
    if result.conclusion == "failed":
        raise typer.Exit(FAILED_EXIT)


def publish_cmd(
    artifact_dir: Path = typer.Argument(..., help="The optimize job's artifact, downloaded."),
    repo: Path = typer.Option(Path("."), help="The repository checkout (its remote gets the branch)."),
    remote: str = typer.Option("origin", help="The git remote to push pipemend/<target> to."),
    artifact_url: Optional[str] = typer.Option(None, help="Link to the uploaded artifact (default: the run's page)."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP),
) -> None:
    """Push pipemend/<target>, open or update the draft PR, keep the sticky comment; close it when nothing won."""
    env = read_env(token=token)
    done = ci_publish(env, PublishJob(artifact_dir=artifact_dir.resolve(), repo_root=repo.resolve(), remote=remote,
                                      artifact_url=artifact_url or None), GitHubClient(env.api_url, env.token))
    err.print(f"pipemend ci publish: {done.conclusion}" + (f" {done.pr_url}" if done.pr_url else ""))
    if done.exit_code:
        raise typer.Exit(done.exit_code)


app.command("optimize")(cli_command(optimize_cmd))
app.command("publish")(cli_command(publish_cmd))
