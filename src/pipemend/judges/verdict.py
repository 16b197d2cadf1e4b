"""The judge's reply, read strictly: a ``verdict`` tool call, or a reply that is only a JSON object.

Either way the verdict is ``{"score": 0 | 0.5 | 1, "reason": "<text>"}`` and nothing else. Anything
different (no verdict, other keys, another score, text around the JSON) is a ``VerdictError`` that carries the
reply's head, which scoring records as the example's metric error (score 0): a weak judge costs an example,
never the run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

SCORES = (0.0, 0.5, 1.0)
TOOL_NAME = "verdict"
MAX_REASON_CHARS = 1000
HEAD_CHARS = 200
VERDICT_TOOL: dict[str, Any] = {
    "name": TOOL_NAME,
    "description": "Record the verdict: one sentence of reason, then the score (0, 0.5 or 1).",
    "input_schema": {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "maxLength": 300, "description": "One sentence: why this score."},
            "score": {"type": "number", "enum": [0, 0.5, 1], "description": "0 wrong, 0.5 partly right, 1 right."},
        },
        "required": ["reason", "score"],
        "additionalProperties": False,
    },
}
_FENCED = re.compile(r"\A```(?:json|JSON)?[ \t]*\n(.*)\n```\Z", re.DOTALL)


class VerdictError(ValueError):
    """A reply that is no verdict; the message says why and how the reply began."""


@dataclass(frozen=True)
class Verdict:
    score: float
    reason: str


def head(text: str, n: int = HEAD_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"


def reply_text(response: Any) -> str:
    """The text blocks of a Messages response, joined."""
    blocks = response.get("content") if isinstance(response, dict) else None
    if not isinstance(blocks, list):
        return ""
    return "".join(b["text"] for b in blocks if isinstance(b, dict) and isinstance(b.get("text"), str))


def _tool_input(response: Any) -> Any:
    blocks = response.get("content") if isinstance(response, dict) else None
    for b in blocks if isinstance(blocks, list) else []:
        if isinstance(b, dict) and b.get("type") == "tool_use" and b.get("name") == TOOL_NAME:
            return b.get("input")
    return None


def _from_text(text: str) -> Any:
    body = text.strip()
    fenced = _FENCED.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, ValueError):
        raise VerdictError(f"the reply is not a verdict (no verdict tool call, and not one JSON object); "
                           f"reply began: {head(text)!r}") from None


def check(obj: Any, shown: str) -> Verdict:
    """``obj`` as a ``Verdict``; ``VerdictError`` (with ``shown``, the reply's head) for any other shape."""
    if not isinstance(obj, dict):
        raise VerdictError(f"the verdict is a {type(obj).__name__}, not an object; reply began: {head(shown)!r}")
    extra = sorted(set(obj) - {"score", "reason"})
    if extra or "score" not in obj or "reason" not in obj:
        what = f"unknown key(s) {', '.join(map(repr, extra))}" if extra else "missing `score` or `reason`"
        raise VerdictError(f"the verdict has {what}; expected exactly score and reason; reply began: {head(shown)!r}")
    score, reason = obj["score"], obj["reason"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or not any(
            abs(score - s) < 1e-9 for s in SCORES):
        raise VerdictError(f"the verdict's score is {score!r}; expected 0, 0.5 or 1; reply began: {head(shown)!r}")
    if not isinstance(reason, str):
        raise VerdictError(f"the verdict's reason is a {type(reason).__name__}, not text; reply began: {head(shown)!r}")
    return Verdict(score=min(SCORES, key=lambda s: abs(s - score)), reason=reason[:MAX_REASON_CHARS])


def parse_verdict(response: Any) -> Verdict:
    """The verdict of a Messages ``response``: its ``verdict`` tool call's input, else its whole text as one
    JSON object (a single fenced ```json block allowed). Raises ``VerdictError``."""
    tool_input = _tool_input(response)
    if tool_input is not None:
        return check(tool_input, json.dumps(tool_input, ensure_ascii=False, default=str))
    text = reply_text(response)
    return check(_from_text(text), text)
