"""``pipemend ci optimize``: the read-only job. Resolve the event's request, run (or resume) the optimize
run within the job's deadline, and write the artifact, the step outputs and the Step Summary.

It never fails quietly: a refusal, a missing key or a crash ends with ``conclusion: failed`` in the
outputs and in ``ci.json`` (the publish job turns it into a comment) and a non-zero exit in the CLI.

State kept between jobs (``state_dir``, which the workflow caches with ``if: always()``):
``reports/<run>/`` (the run directories), ``<target-key>.json`` (the target's unfinished run) and
``<run>.bundle`` (the run's branches and refs: a fresh checkout has none of its commits).
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import PipemendError, RunFailed, UsageError
from ..fsutil import (atomic_write_bytes, atomic_write_json, atomic_write_text, copy_regular, read_json_object,
                      read_regular)
from ..manifest import load_manifest
from ..optimize import OptimizeConfig, OptimizeSummary, resume, run_optimize
from ..optimize.config import LLM_PROPOSERS
from ..protocols import Progress
from ..proposers import get_proposer
from ..journal import replay
from ..rundir import new_run_id, read_run
from .artifact import PATCH, REPORT, RUN, SUMMARY, CiResult, copy_run_dir, publish_branch, write_result
from .env import ActionsEnv, append_summary, write_outputs
from .gitcmd import git, git_bytes
from .request import Caps, CiRequest, Ignored, Refused, resolve_request
from .rest import GitHubClient

STATE_FORMAT = "pipemend-ci-state-1"
JOB_LIMIT_S = 6 * 3600
"""GitHub-hosted runners end a job after 6 hours."""
DEFAULT_MARGIN_S = 40 * 60
"""Kept back from the job limit for the test split, the report and the uploads."""
RESUME_KEYS = ("target", "proposer", "model", "agent_model", "budget_usd", "max_candidates")
"""A job resumes the target's unfinished run only when it asks for the same run (the hours may differ)."""
SUMMARY_CAP = 900_000
"""GitHub shows at most 1 MiB of Step Summary per step."""


@dataclass(frozen=True)
class OptimizeJob:
    """The step's settings (the action's inputs)."""

    repo_root: Path
    artifact_dir: Path
    state_dir: Path
    deadline: float
    """Epoch seconds by which the run must stop proposing."""
    defaults: dict[str, Any]
    caps: Caps
    sandbox: str = "auto"
    limit: int | None = None


def default_deadline(job_started: float | None = None, margin_s: float = DEFAULT_MARGIN_S) -> float:
    """The job's start (default now) plus the 6-hour limit, less the margin."""
    return (time.time() if job_started is None else job_started) + JOB_LIMIT_S - margin_s


def ci_optimize(env: ActionsEnv, job: OptimizeJob, client: GitHubClient, *, environ: Mapping[str, str] | None = None,
                progress: Progress | None = None) -> CiResult:
    """Run the job; always writes ``ci.json``, the outputs and the summary, and returns the result."""
    environ = os.environ if environ is None else environ
    job.artifact_dir.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {"repository": env.repository, "trigger": env.event_name, "workflow_run_url": env.run_url}
    try:
        request = resolve_request(env, job.defaults, job.caps, client)
        base.update(target=request.target, actor=request.actor, issue=request.issue)
        result = _optimize(request, job, environ, progress, base)
    except Ignored as e:
        result = CiResult(conclusion="skipped", error=str(e), **base)
    except Refused as e:
        result = CiResult(conclusion="failed", refused=True, error=e.reason, actor=e.actor, issue=e.issue,
                          **{k: v for k, v in base.items() if k not in ("actor", "issue")})
    except PipemendError as e:
        result = CiResult(conclusion="failed", error=str(e), **base)
    except Exception as e:  # noqa: BLE001 - a bug still ends as a loud, recorded failure
        atomic_write_text(job.artifact_dir / "error.txt", traceback.format_exc())
        result = CiResult(conclusion="failed", error=f"{type(e).__name__}: {e}", **base)
    except KeyboardInterrupt:  # the job was cancelled or ran out of time (the CLI maps SIGTERM here too)
        result = CiResult(conclusion="failed", error="stopped before the run finished (cancelled or out of time); "
                          "the next job asking for the same run resumes it", **base)
        _finish(env, job, result)
        raise
    _finish(env, job, result)
    return result


def _finish(env: ActionsEnv, job: OptimizeJob, result: CiResult) -> None:
    write_result(job.artifact_dir, result)
    write_outputs(env, outputs(result))
    append_summary(env, step_summary(result, job.artifact_dir))


def outputs(result: CiResult, pr_url: str = "") -> dict[str, str]:
    return {"conclusion": result.conclusion,
            "best-delta": "" if result.best_delta is None else f"{result.best_delta:+.4f}",
            "branch": result.branch if result.conclusion == "improved" and result.branch else "",
            "run-id": result.run_id or "", "pr-url": pr_url}


def step_summary(result: CiResult, artifact_dir: Path) -> str:
    head = {"improved": f"pipemend improved `{result.target}` (val {result.best_delta:+.4f})"
            if result.best_delta is not None else f"pipemend improved `{result.target}`",
            "no-improvement": f"pipemend: no candidate was accepted for `{result.target}`",
            "failed": "pipemend: refused" if result.refused else "pipemend: the run failed",
            "skipped": "pipemend: nothing to do"}[result.conclusion]
    text = f"## {head}\n"
    if result.error:
        text += f"\n> {result.error}\n"
    raw = read_regular(artifact_dir / REPORT)
    if raw is not None:
        body = raw.decode("utf-8", "replace")
        text += "\n" + (body if len(body) <= SUMMARY_CAP else body[:SUMMARY_CAP] + "\n\n… (cut; the full report is in the artifact)")
    return text


# ---------------------------------------------------------------------- the run


def _optimize(req: CiRequest, job: OptimizeJob, environ: Mapping[str, str], progress: Progress | None,
              base: dict[str, Any]) -> CiResult:
    target = (job.repo_root / req.target).resolve()
    if not target.is_relative_to(job.repo_root.resolve()) or not (target / "pipemend.yaml").is_file():
        raise UsageError(f"target {req.target}: no pipemend.yaml there (in {job.repo_root})")
    check_api_key(req, target, environ)
    left_s = job.deadline - time.time()
    if left_s <= 60:
        raise RunFailed(f"the job's deadline is {max(left_s, 0):.0f} s away: no time to run")
    reports = job.state_dir / "reports"
    state_file = job.state_dir / (req.target.replace("/", "--") + ".json")
    asked = req.model_dump(include=set(RESUME_KEYS))
    run_dir = _unfinished_run(state_file, reports, asked)
    resumed = run_dir is not None
    base["branch"] = publish_branch(req.target)
    if run_dir is not None:
        base["run_id"] = run_dir.name
    try:
        if run_dir is not None:
            restore_bundle(job.repo_root, job.state_dir, run_dir.name)
            summary = resume(run_dir, progress, deadline=job.deadline)
        else:
            cfg = OptimizeConfig(target=str(target), proposer=req.proposer, model=req.model,
                                 agent_model=req.agent_model, budget_usd=req.budget_usd,
                                 max_candidates=req.max_candidates, hours=req.hours, deadline=job.deadline,
                                 limit=job.limit,
                                 sandbox=job.sandbox, reports_dir=str(reports))
            cfg = cfg.model_copy(update={"run_id": new_run_id("optimize")})
            run_dir, base["run_id"] = reports / cfg.run_id, cfg.run_id
            atomic_write_json(state_file, {"format": STATE_FORMAT, "target": req.target, "run_id": cfg.run_id,
                                           "request": asked})
            summary = run_optimize(cfg, progress)
    finally:
        if run_dir is not None and run_dir.is_dir():
            save_bundle(job.repo_root, job.state_dir, run_dir.name)
            _collect(run_dir, job.artifact_dir)
    return _result(summary, job, base, resumed)


def _unfinished_run(state_file: Path, reports: Path, asked: dict[str, Any]) -> Path | None:
    """The target's run an earlier job left unfinished (stopped at its deadline, killed, cancelled, crashed),
    when this job asks for the same run (``RESUME_KEYS``); None to start afresh."""
    state = read_json_object(state_file)
    if not state or state.get("format") != STATE_FORMAT or not isinstance(state.get("run_id"), str):
        return None
    if state.get("request") != asked:
        return None
    run_dir = reports / state["run_id"]
    try:
        status = read_run(run_dir).get("status")
    except (PipemendError, OSError, ValueError):
        return None
    if status != "done":
        return run_dir
    return run_dir if replay(run_dir).stop_code == "deadline" else None  # resume reopens it with this job's


def check_api_key(req: CiRequest, target: Path, environ: Mapping[str, str]) -> None:
    """A run that needs Anthropic (an LLM proposer on a claude-* agent model, its own default when none is
    given, or a claude-* model the pipeline may call) fails before it starts when ``ANTHROPIC_API_KEY`` is
    not set. ``reflect`` on its default local model needs no key."""
    models = load_manifest(target).models(req.model)
    needs = [m for m in models if m.startswith("claude")]
    if req.proposer in LLM_PROPOSERS:
        agent_model = req.agent_model or get_proposer(req.proposer).config.model
        if agent_model.startswith("claude"):
            needs.append(f"the {req.proposer} proposer ({agent_model})")
    if needs and not environ.get("ANTHROPIC_API_KEY", "").strip():
        raise RunFailed(f"ANTHROPIC_API_KEY is not set, and this run needs it for {', '.join(needs)}: add it as a "
                        "repository secret and pass it to the step's env (see docs/github-actions.md)")


def _collect(run_dir: Path, artifact_dir: Path) -> None:
    for name in (REPORT, SUMMARY):
        copy_regular(run_dir / name, artifact_dir / name)
    copy_run_dir(run_dir, artifact_dir / RUN)


def _result(summary: OptimizeSummary, job: OptimizeJob, base: dict[str, Any], resumed: bool) -> CiResult:
    best = summary.best
    base = {k: v for k, v in base.items() if k != "run_id"}
    if best is None:
        return CiResult(conclusion="no-improvement", run_id=summary.run_id, resumed=resumed, **base)
    patch = git_bytes(job.repo_root, "diff", "--binary", "--full-index",
                       f"refs/heads/pipemend/{summary.run_id}/base", f"refs/heads/{best['branch']}")
    atomic_write_bytes(job.artifact_dir / PATCH, patch)
    val0, test0 = summary.baseline.get("val"), summary.baseline.get("test")
    return CiResult(conclusion="improved", run_id=summary.run_id, resumed=resumed,
                    best_delta=None if best.get("val") is None or val0 is None else best["val"] - val0,
                    test_delta=None if best.get("test") is None or test0 is None else best["test"] - test0, **base)


# ---------------------------------------------------------------------- the run's refs across jobs


def save_bundle(repo: Path, state_dir: Path, run_id: str) -> None:
    """Bundle the run's branches and refs into ``state_dir/<run>.bundle`` (nothing when it has none yet)."""
    refs = git(repo, "for-each-ref", "--format=%(refname)", f"refs/heads/pipemend/{run_id}/",
                f"refs/pipemend/{run_id}/").split()
    if refs:
        git(repo, "bundle", "create", "-q", str(state_dir / f"{run_id}.bundle"), *refs)


def restore_bundle(repo: Path, state_dir: Path, run_id: str) -> None:
    """Fetch the run's branches and refs back from its bundle (resume then sets them as the journal says)."""
    bundle = state_dir / f"{run_id}.bundle"
    if bundle.is_file() and not bundle.is_symlink():
        git(repo, "fetch", "-q", str(bundle), f"+refs/heads/pipemend/{run_id}/*:refs/heads/pipemend/{run_id}/*",
             f"+refs/pipemend/{run_id}/*:refs/pipemend/{run_id}/*")
