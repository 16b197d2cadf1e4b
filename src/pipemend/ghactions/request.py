"""What a ``pipemend ci`` run was asked to do, from the event that started it.

- ``workflow_dispatch``: the workflow's ``inputs`` (strings), over the step's defaults;
- ``schedule``: the step's defaults;
- ``issue_comment``: the command ``/pipemend optimize TARGET [--budget N] [--max-candidates N] [--hours H]
  [--proposer P] [--model M] [--agent-model M]`` on the comment's first line, honoured only when the
  commenter has write, maintain or admin permission (REST), and refused on a pull request from a fork.

Dollars and candidates are capped by pipemend (``Caps``), whatever the inputs or the comment ask for.
"""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UsageError
from ..proposers import PROPOSERS
from .env import ActionsEnv
from .rest import GitHubClient, GitHubError

COMMAND = "/pipemend optimize"
WRITE_PERMISSIONS = frozenset({"admin", "maintain", "write"})
COMMENT_FLAGS = {"--budget": "budget_usd", "--max-candidates": "max_candidates", "--hours": "hours",
                 "--proposer": "proposer", "--model": "model", "--agent-model": "agent_model"}
COMMENT_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")
"""A model name a comment may pass: no ``scripted:PATH`` and no ``package.module:Class``."""
DISPATCH_INPUTS = {"target": "target", "proposer": "proposer", "model": "model", "agent-model": "agent_model",
                   "budget": "budget_usd", "max-candidates": "max_candidates", "hours": "hours"}


class CiRequest(BaseModel):
    """One optimize run asked for by an event."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="The target's folder, relative to the repository root.")
    proposer: str = Field("ladder", description="claude | claude-code | ladder | reflect (a comment may name only these).")
    model: str | None = Field(None, description="Model the pipeline calls (default the manifest's llm.model).")
    agent_model: str | None = Field(None, description="Model of an LLM proposer.")
    budget_usd: float = Field(3.0, gt=0, description="Dollars the run may spend on pipeline calls.")
    max_candidates: int = Field(5, ge=0, description="Candidates to propose at most.")
    hours: float | None = Field(None, gt=0, description="Hours to propose for at most (the job's deadline also applies).")
    trigger: Literal["workflow_dispatch", "schedule", "issue_comment"] = Field(description="The event that asked.")
    actor: str | None = Field(None, description="Who asked (the commenter or the dispatcher).")
    issue: int | None = Field(None, description="The issue or PR the command was written on.")


class Caps(BaseModel):
    """The most any event may ask for (the step's inputs, set by whoever owns the workflow)."""

    model_config = ConfigDict(extra="forbid")

    budget_usd: float = Field(10.0, gt=0, description="Dollars a run may spend at most.")
    max_candidates: int = Field(20, ge=0, description="Candidates a run may propose at most.")


class Refused(Exception):
    """The event asked for something pipemend will not do (said to the asker in a comment)."""

    def __init__(self, reason: str, *, actor: str | None = None, issue: int | None = None):
        self.reason, self.actor, self.issue = reason, actor, issue
        super().__init__(reason)


class Ignored(Exception):
    """The event is not a request to pipemend (a comment without the command)."""


def parse_command(body: str) -> dict[str, Any]:
    """The fields of ``/pipemend optimize TARGET --flag value ...`` on the comment's first non-blank line."""
    line = next((ln.strip() for ln in body.splitlines() if ln.strip()), "")
    if line != COMMAND and not line.startswith(COMMAND + " "):
        raise Ignored("not a /pipemend optimize command")
    try:
        words = shlex.split(line[len(COMMAND):])
    except ValueError as e:
        raise Refused(f"cannot read the command ({e})") from None
    if not words or words[0].startswith("--"):
        raise Refused(f"usage: {COMMAND} TARGET [{' N] ['.join(COMMENT_FLAGS)} ...]")
    fields: dict[str, Any] = {"target": words[0]}
    rest = words[1:]
    while rest:
        flag, *value = rest[0].split("=", 1)
        if flag not in COMMENT_FLAGS:
            raise Refused(f"unknown option {flag!r} (known: {', '.join(COMMENT_FLAGS)})")
        if value:
            rest = rest[1:]
        elif len(rest) >= 2:
            value, rest = [rest[1]], rest[2:]
        else:
            raise Refused(f"option {flag} needs a value")
        fields[COMMENT_FLAGS[flag]] = value[0]
    return fields


def dispatch_fields(inputs: Any) -> dict[str, Any]:
    """The request's fields from ``workflow_dispatch`` inputs (blank inputs keep the defaults)."""
    if not isinstance(inputs, dict):
        return {}
    return {DISPATCH_INPUTS[k]: v for k, v in inputs.items()
            if k in DISPATCH_INPUTS and v is not None and str(v).strip() != ""}


def check_target(target: str) -> str:
    """A repository-relative folder: no absolute path, no ``..``, nothing odd."""
    path = PurePosixPath(target.strip())
    if (not target.strip() or path.is_absolute() or ".." in path.parts
            or not re.fullmatch(r"[A-Za-z0-9._/-]+", str(path)) or str(path).startswith("-")):
        raise UsageError(f"target {target!r}: expected a folder inside the repository, like target_pipelines/x")
    return str(path)


def build_request(defaults: dict[str, Any], fields: dict[str, Any], caps: Caps, **meta: Any) -> CiRequest:
    """Merge event fields over the defaults, validate, and hold them to the caps."""
    merged = {**{k: v for k, v in defaults.items() if v is not None}, **fields, **meta}
    if "target" not in merged:
        raise UsageError("no target: give the `target` input (or name it in the comment command)")
    merged["target"] = check_target(str(merged["target"]))
    try:
        req = CiRequest.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]
        raise UsageError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    if req.budget_usd > caps.budget_usd:
        raise UsageError(f"budget ${req.budget_usd:g} is over the workflow's cap of ${caps.budget_usd:g}")
    if req.max_candidates > caps.max_candidates:
        raise UsageError(f"{req.max_candidates} candidates is over the workflow's cap of {caps.max_candidates}")
    return req


def resolve_request(env: ActionsEnv, defaults: dict[str, Any], caps: Caps, client: GitHubClient) -> CiRequest:
    """The request the event makes. ``Ignored``: not addressed to pipemend; ``Refused``: addressed, but
    not honoured (who asked, from where, or what)."""
    event = env.event
    sender = (event.get("sender") or {}).get("login")
    if env.event_name == "workflow_dispatch":
        return build_request(defaults, dispatch_fields(event.get("inputs")), caps,
                             trigger="workflow_dispatch", actor=sender)
    if env.event_name == "schedule":
        return build_request(defaults, {}, caps, trigger="schedule")
    if env.event_name != "issue_comment":
        raise UsageError(f"event {env.event_name!r}: `pipemend ci` runs on workflow_dispatch, schedule or issue_comment")
    if event.get("action") != "created":
        raise Ignored(f"comment {event.get('action')}, not created")
    comment, issue = event.get("comment") or {}, event.get("issue") or {}
    number = issue.get("number") if isinstance(issue.get("number"), int) else None
    actor = (comment.get("user") or {}).get("login")
    fields = parse_command(str(comment.get("body") or ""))  # Ignored when there is no command
    if not isinstance(actor, str) or not actor:
        raise Refused("the comment has no author", issue=number)
    if not has_write(client, env.repository, actor):
        raise Refused(f"@{actor} does not have write permission on {env.repository}; only writers, "
                      "maintainers and admins may start a run", actor=actor, issue=number)
    if issue.get("pull_request") and number is not None:
        pull = client.pull(env.repository, number)
        head_repo = ((pull.get("head") or {}).get("repo") or {}).get("full_name")
        if head_repo != env.repository:
            raise Refused(f"pull request #{number} comes from a fork ({head_repo or 'a deleted repository'}); "
                          "runs are refused there (a fork's workflow has no secrets)", actor=actor, issue=number)
    proposer = fields.get("proposer")
    if proposer is not None and proposer not in PROPOSERS:
        raise Refused(f"proposer {proposer!r}: a comment may name only {', '.join(sorted(PROPOSERS))}",
                      actor=actor, issue=number)
    for key in ("model", "agent_model"):
        if key in fields and not COMMENT_MODEL.fullmatch(str(fields[key])):
            raise Refused(f"model {fields[key]!r}: a comment may name a model (claude-…, local/…, simulated/…), "
                          "never a scripted file or a plugin", actor=actor, issue=number)
    try:
        return build_request(defaults, fields, caps, trigger="issue_comment", actor=actor, issue=number)
    except UsageError as e:
        raise Refused(str(e), actor=actor, issue=number) from None


def has_write(client: GitHubClient, repo: str, user: str) -> bool:
    """Whether ``user`` may push to ``repo`` (``GET /repos/{repo}/collaborators/{user}/permission``);
    a 404 (not a collaborator) is no."""
    try:
        data = client.permission(repo, user)
    except GitHubError as e:
        if e.status == 404:
            return False
        raise
    return data.get("permission") in WRITE_PERMISSIONS or data.get("role_name") in WRITE_PERMISSIONS
