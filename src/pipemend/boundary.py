"""What an evaluation saw at the pipeline's boundary: model calls around the gateway, and calls it cannot attribute.

- ``egress.json`` (written by the runner's egress watch, ``runtime/egress.py``,
  and taken in by name like every sandbox file) says which hosts the pipeline
  tried to reach besides the gateway. A model call to a provider pipemend does
  not route makes the evaluation *unrouted*: ``pipemend eval`` stops with a
  usage error (exit 2) naming the host and the SDK; in ``optimize`` it is a dead
  evaluation (its examples score 0). Other refused hosts are warnings.
- Calls of the evaluation that carry no example header (a process pool whose
  children lost the runner's context, a thread started outside the example) are
  charged to the evaluation as a whole by scoring; the warning names them, so a
  user knows why their cost is not on any example.

The file is hostile: every field is type-checked and capped before it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import read_json_object
from .runtime.egress import EGRESS_FORMAT, EGRESS_JSON, describe

MAX_SHOWN = 5
"""Hosts or call ids named in one warning."""
_TEXT_CAP = 300


@dataclass
class Boundary:
    unrouted: str | None = None
    """The sentence naming the unrouted host(s) and SDK, or None."""
    warnings: list[str] = field(default_factory=list)


def _text(value: Any) -> str | None:
    return value[:_TEXT_CAP] if isinstance(value, str) and value else None


def read_egress(out_dir: Path) -> dict[str, Any]:
    """``egress.json`` with only well-typed entries (empty lists when absent, malformed or of another format)."""
    obj = read_json_object(Path(out_dir) / EGRESS_JSON, max_bytes=64 * 1024) or {}
    if obj.get("format") != EGRESS_FORMAT:
        obj = {}

    def entries(key: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
        raw = obj.get(key)
        kept = []
        for e in raw if isinstance(raw, list) else []:
            if isinstance(e, dict) and _text(e.get("host")):
                kept.append({f: _text(e.get(f)) for f in fields})
        return kept[:20]

    raw_sdks = obj.get("sdks")
    sdks = [s[:60] for s in raw_sdks if isinstance(s, str) and s][:10] if isinstance(raw_sdks, list) else []
    return {"unrouted": entries("unrouted", ("host", "url", "example_id", "user_agent")),
            "blocked": entries("blocked", ("host",)), "sdks": sdks}


def inspect(out_dir: Path, summary: dict[str, Any]) -> Boundary:
    """The boundary findings of the evaluation in ``out_dir`` whose ``summary.json`` is ``summary``."""
    found = read_egress(out_dir)
    b = Boundary(unrouted=describe(found) or None)
    blocked = [e["host"] for e in found["blocked"]]
    if blocked:
        b.warnings.append(
            f"the pipeline tried to reach {', '.join(blocked[:MAX_SHOWN])}"
            f"{f' and {len(blocked) - MAX_SHOWN} more' if len(blocked) > MAX_SHOWN else ''}; "
            "the sandbox refused it (only pipemend's gateway is reachable)")
    ids = [str(i) for i in summary.get("unheaded_call_ids") or [] if isinstance(i, (str, int))]
    if ids:
        b.warnings.append(
            f"{len(ids)} model call(s) carried no example header and could not be attributed to an example "
            f"(call ids {', '.join(ids[:MAX_SHOWN])}{' ...' if len(ids) > MAX_SHOWN else ''}): they were made "
            "outside the runner's example context (a process pool's child, or a thread started by hand). "
            "Their cost and latency are spread over the evaluation's examples; make the calls in the example's "
            "own thread (or pass contextvars.copy_context() to the worker) to have them traced")
    return b
