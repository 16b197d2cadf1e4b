"""The GitHub Actions environment a ``pipemend ci`` step runs in, and the two files it writes back:
``$GITHUB_OUTPUT`` (step outputs, multiline-safe) and ``$GITHUB_STEP_SUMMARY`` (Markdown)."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import UsageError

MAX_EVENT_BYTES = 25 * 1024 * 1024
"""GitHub caps webhook payloads at 25 MB; a bigger event file is not one GitHub wrote."""


@dataclass(frozen=True)
class ActionsEnv:
    """What a workflow step knows about its run (the ``GITHUB_*`` variables Actions sets)."""

    event_name: str
    event: dict[str, Any]
    repository: str
    api_url: str
    server_url: str
    run_id: str
    output_path: Path | None
    summary_path: Path | None
    token: str | None

    @property
    def owner(self) -> str:
        return self.repository.split("/", 1)[0]

    @property
    def repo(self) -> str:
        return self.repository.split("/", 1)[1]

    @property
    def run_url(self) -> str:
        """The workflow run's page, where its artifacts are listed."""
        return f"{self.server_url.rstrip('/')}/{self.repository}/actions/runs/{self.run_id}"


def read_env(environ: Mapping[str, str] | None = None, *, token: str | None = None) -> ActionsEnv:
    """The Actions environment from ``environ`` (default ``os.environ``); ``token`` (an input) wins over
    ``GITHUB_TOKEN``. A missing or malformed variable is a ``UsageError`` naming it."""
    env = os.environ if environ is None else environ

    def need(name: str) -> str:
        value = env.get(name, "").strip()
        if not value:
            raise UsageError(f"${name} is not set: `pipemend ci` runs inside a GitHub Actions job "
                             "(or set the GITHUB_* variables Actions sets)")
        return value

    repository = need("GITHUB_REPOSITORY")
    owner, _, name = repository.partition("/")
    if not owner or not name or "/" in name:
        raise UsageError(f"$GITHUB_REPOSITORY={repository!r}: expected owner/name")
    event_path = need("GITHUB_EVENT_PATH")
    return ActionsEnv(
        event_name=need("GITHUB_EVENT_NAME"),
        event=read_event(Path(event_path)),
        repository=repository,
        api_url=env.get("GITHUB_API_URL", "").strip() or "https://api.github.com",
        server_url=env.get("GITHUB_SERVER_URL", "").strip() or "https://github.com",
        run_id=env.get("GITHUB_RUN_ID", "").strip() or "local",
        output_path=Path(env["GITHUB_OUTPUT"]) if env.get("GITHUB_OUTPUT") else None,
        summary_path=Path(env["GITHUB_STEP_SUMMARY"]) if env.get("GITHUB_STEP_SUMMARY") else None,
        token=(token or env.get("GITHUB_TOKEN", "")).strip() or None,
    )


def read_event(path: Path) -> dict[str, Any]:
    """The event payload ($GITHUB_EVENT_PATH): a JSON object."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_EVENT_BYTES + 1)
    except OSError as e:
        raise UsageError(f"$GITHUB_EVENT_PATH {path}: cannot read it ({e.strerror})") from None
    if len(data) > MAX_EVENT_BYTES:
        raise UsageError(f"$GITHUB_EVENT_PATH {path}: larger than {MAX_EVENT_BYTES} bytes")
    try:
        event = json.loads(data)
    except ValueError as e:
        raise UsageError(f"$GITHUB_EVENT_PATH {path}: not JSON ({e})") from None
    if not isinstance(event, dict):
        raise UsageError(f"$GITHUB_EVENT_PATH {path}: expected a JSON object")
    return event


def output_block(name: str, value: str) -> str:
    """One ``$GITHUB_OUTPUT`` entry in the heredoc form, with a random delimiter the value cannot contain."""
    if not name or any(c in name for c in "\n\r=<"):
        raise ValueError(f"output name {name!r}")
    while True:
        delim = f"ghadelimiter_{secrets.token_hex(16)}"
        if delim not in value:
            return f"{name}<<{delim}\n{value}\n{delim}\n"


def write_outputs(env: ActionsEnv, outputs: Mapping[str, str]) -> None:
    """Append the step outputs to ``$GITHUB_OUTPUT`` (nothing when it is not set: a run outside Actions)."""
    if env.output_path is None:
        return
    with open(env.output_path, "a", encoding="utf-8") as f:
        f.write("".join(output_block(k, str(v)) for k, v in outputs.items()))


def append_summary(env: ActionsEnv, markdown: str) -> None:
    """Append Markdown to the job's Step Summary (GitHub shows up to 1 MiB of it per step)."""
    if env.summary_path is None:
        return
    with open(env.summary_path, "a", encoding="utf-8") as f:
        f.write(markdown.rstrip("\n") + "\n\n")
