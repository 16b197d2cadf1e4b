"""The artifact the optimize job hands to the publish job: ``ci.json`` (what happened), ``best.patch``
(base → best of the run, binary-safe), ``report.md``, ``summary.json`` and ``run/`` (the run directory).

The publish job trusts none of it beyond its shape: it re-checks the patch's paths after applying it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UsageError
from ..fsutil import atomic_write_json, copy_regular, read_json_object

CI_FORMAT = "pipemend-ci-1"
CI_JSON = "ci.json"
PATCH = "best.patch"
REPORT = "report.md"
SUMMARY = "summary.json"
RUN = "run"
SKIP_IN_RUN_COPY = ("worktrees",)
"""Folders of a run directory left out of the artifact (live checkouts, removed when a run ends)."""

Conclusion = Literal["improved", "no-improvement", "failed", "skipped"]


class CiResult(BaseModel):
    """``ci.json``: the optimize job's outcome, for the publish job and for people."""

    model_config = ConfigDict(extra="forbid")

    format: str = CI_FORMAT
    conclusion: Conclusion = Field(description="improved | no-improvement | failed | skipped (no command).")
    repository: str = Field(description="owner/name the run belongs to.")
    target: str | None = Field(None, description="The target folder, relative to the repository root.")
    branch: str | None = Field(None, description="The branch publish pushes: pipemend/<target>.")
    run_id: str | None = Field(None, description="The optimize run's id.")
    resumed: bool = Field(False, description="Whether this job resumed a run an earlier job left unfinished.")
    best_delta: float | None = Field(None, description="Val score of the best candidate minus the baseline's.")
    test_delta: float | None = Field(None, description="Test score of the best candidate minus the baseline's.")
    error: str | None = Field(None, description="Why the job failed or was refused.")
    refused: bool = Field(False, description="The request was refused (who asked, from where, or what).")
    trigger: str = Field(description="The event name.")
    actor: str | None = Field(None, description="Who asked.")
    issue: int | None = Field(None, description="The issue or PR a comment command was written on.")
    workflow_run_url: str | None = Field(None, description="The workflow run's page.")


def publish_branch(target: str) -> str:
    """The stable branch of a target: ``pipemend/<target>`` (force-updated by every run)."""
    return f"pipemend/{target.strip('/')}"


def write_result(artifact_dir: Path, result: CiResult) -> None:
    atomic_write_json(artifact_dir / CI_JSON, result.model_dump(mode="json"))


def read_result(artifact_dir: Path) -> CiResult:
    """``ARTIFACT/ci.json``, checked; a missing or malformed one is a UsageError naming the file."""
    path = artifact_dir / CI_JSON
    data: Any = read_json_object(path)
    if data is None:
        raise UsageError(f"{path}: missing or not a JSON object; is {artifact_dir} an artifact of `pipemend ci optimize`?")
    if data.get("format") != CI_FORMAT:
        raise UsageError(f"{path}: format {data.get('format')!r}, expected {CI_FORMAT!r}")
    try:
        return CiResult.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise UsageError(f"{path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def copy_run_dir(run_dir: Path, dest: Path) -> int:
    """Copy the run directory's regular files (never a link, socket or FIFO) into ``dest``; returns the count."""
    count = 0
    for root, dirs, files in os.walk(run_dir, followlinks=False):
        rel = Path(root).relative_to(run_dir)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in SKIP_IN_RUN_COPY]
        for name in files:
            out = dest / rel / name
            out.parent.mkdir(parents=True, exist_ok=True)
            count += copy_regular(Path(root) / name, out)
    return count
