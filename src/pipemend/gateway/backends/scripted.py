"""``scripted:PATH``: replies from a file of matcher → response entries (a strict fake for tests).

The file (YAML or JSON) is a list of entries, or ``{"entries": [...]}``::

    entries:
      - name: plan                     # optional; used in messages
        match:                         # every given condition must hold
          model: claude-sonnet-4-5     # exact model name
          last_user_contains: "plan"   # substring(s) of the last user message's text
          last_user_regex: "step \\d"  # regex searched in that text
          system_contains: "planner"   # substring(s) of the system prompt
          system_regex: "..."
        once: true                     # used at most once; identical entries then answer in order
        required: true                 # check_complete() fails if never used
        response: {content: [...], stop_reason: tool_use, usage: {...}}
        # or: text: "shorthand reply"
        # or: error: {status: 500, message: "upstream down"}

The first entry (in file order) that matches and is not a spent ``once`` entry
answers. An unmatched request is an error naming the request; it is answered
as an Anthropic error and recorded in ``unmatched``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ...errors import ConfigError, PipemendError
from .base import BackendError, estimate_tokens, last_user_text, message_response, request_text, system_text


class ScriptIncomplete(PipemendError):
    """A script was not played as written: required entries unused or requests unmatched."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Match(_Strict):
    model: str | None = Field(None, description="Exact model name of the request.")
    last_user_contains: str | list[str] | None = Field(None, description="Substring(s) of the last user message.")
    last_user_regex: str | None = Field(None, description="Regex searched in the last user message.")
    system_contains: str | list[str] | None = Field(None, description="Substring(s) of the system prompt.")
    system_regex: str | None = Field(None, description="Regex searched in the system prompt.")


class ScriptedError(_Strict):
    status: int = Field(500, description="HTTP status of the error reply.")
    message: str = Field("scripted error", description="Error message.")


class Entry(_Strict):
    name: str | None = Field(None, description="Name used in messages; defaults to 'entry N'.")
    match: Match = Field(default_factory=Match, description="Conditions on the request; all must hold.")
    once: bool = Field(False, description="Answer at most one request.")
    required: bool = Field(False, description="check_complete() fails unless this entry answered.")
    delay_s: float = Field(0.0, ge=0, description="Sleep before answering (for concurrency tests).")
    response: dict[str, Any] | None = Field(None, description="Messages response body (fields may be partial).")
    text: str | None = Field(None, description="Shorthand: reply with this text.")
    error: ScriptedError | None = Field(None, description="Answer with this error instead.")

    @model_validator(mode="after")
    def _one_answer(self) -> "Entry":
        given = [x is not None for x in (self.response, self.text, self.error)]
        if sum(given) != 1:
            raise ValueError("give exactly one of `response`, `text`, `error`")
        return self


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _matches(match: Match, request: dict[str, Any]) -> bool:
    if match.model is not None and request.get("model") != match.model:
        return False
    user, system = last_user_text(request), system_text(request)
    if not all(s in user for s in _as_list(match.last_user_contains)):
        return False
    if not all(s in system for s in _as_list(match.system_contains)):
        return False
    if match.last_user_regex is not None and not re.search(match.last_user_regex, user):
        return False
    if match.system_regex is not None and not re.search(match.system_regex, system):
        return False
    return True


def load_script(path: Path) -> list[Entry]:
    """Parse and validate a script file; problems raise ``ConfigError`` naming file and key."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(path, None, f"cannot read script: {e.strerror}") from e
    try:
        data = json.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(path, None, f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "format"}
        if set(data) != {"entries"}:
            raise ConfigError(path, None, f"unexpected keys {sorted(set(data) - {'entries'})}", "a list or {entries: [...]}")
        data = data["entries"]
    if not isinstance(data, list):
        raise ConfigError(path, None, f"got {type(data).__name__}", "a list of entries or {entries: [...]}")
    entries = []
    for i, item in enumerate(data):
        try:
            entries.append(Entry.model_validate(item))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in (f"entries[{i}]", *err["loc"]))
            raise ConfigError(path, where, err["msg"]) from e
    for i, entry in enumerate(entries):
        entry.name = entry.name or f"entry {i}"
    return entries


class ScriptedBackend:
    """Answers from a script file; strict: unmatched requests are errors, and are recorded."""

    deterministic = True

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or f"scripted:{path}"
        self.entries = load_script(self.path)
        self.cache_namespace = "scripted-" + hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.calls = 0
        self.used: dict[str, int] = {}
        self.unmatched: list[str] = []
        self._lock = threading.Lock()

    def _pick(self, request: dict[str, Any]) -> Entry | None:
        with self._lock:
            self.calls += 1
            for entry in self.entries:
                assert entry.name is not None
                if entry.once and self.used.get(entry.name):
                    continue
                if _matches(entry.match, request):
                    self.used[entry.name] = self.used.get(entry.name, 0) + 1
                    return entry
            self.unmatched.append(describe_request(request))
            return None

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        entry = self._pick(request)
        if entry is None:
            raise BackendError(400, f"scripted backend {self.path}: no entry matches the request: {self.unmatched[-1]}")
        if entry.delay_s:
            time.sleep(entry.delay_s)
        if entry.error is not None:
            raise BackendError(entry.error.status, entry.error.message)
        model = str(request.get("model", self.name))
        if entry.text is not None:
            content: list[dict[str, Any]] = [{"type": "text", "text": entry.text}]
            response = message_response(model, content)
        else:
            response = message_response(model, [])
            response.update(entry.response or {})
        usage = dict((entry.response or {}).get("usage") or {})  # what the script gives, else estimates
        usage.setdefault("input_tokens", estimate_tokens(request_text(request)))
        usage.setdefault("output_tokens", estimate_tokens(json.dumps(response.get("content", []))))
        response["usage"] = usage
        return response

    def unused_required(self) -> list[str]:
        return [e.name for e in self.entries if e.required and not self.used.get(e.name or "")]

    def check_complete(self) -> None:
        """Raise ``ScriptIncomplete`` if a required entry never answered or a request went unmatched."""
        problems = []
        if unused := self.unused_required():
            problems.append(f"required entries never used: {', '.join(unused)}")
        if self.unmatched:
            problems.append(f"unmatched requests: {'; '.join(self.unmatched)}")
        if problems:
            raise ScriptIncomplete(f"script {self.path}: " + " | ".join(problems))


def describe_request(request: dict[str, Any], limit: int = 200) -> str:
    """A one-line description of a request, for error messages."""

    def clip(s: str) -> str:
        s = s.replace("\n", " ")
        return s if len(s) <= limit else s[:limit] + "…"

    return (
        f"model={request.get('model')!r}, last user message={clip(last_user_text(request))!r}, "
        f"system={clip(system_text(request))!r}"
    )
