"""Render a run directory to ``report.html``, ``report.md`` and one ``candidates/<n>/index.html`` each.

The HTML is self-contained (inline CSS, inline SVG, no script, nothing
fetched) and made with Jinja2 with autoescaping on; the Markdown is short
enough for a pull-request body. Rendering reads only the run directory, so it
works for a finished, running or crashed run, and re-rendering is idempotent.
"""

from __future__ import annotations

import difflib
import json
import time
from collections import Counter
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import DiffLexer

from ..fsutil import atomic_write_text
from .load import load_run, read_rows, read_text, read_trace, scored_rows
from .plot import score_plot

TEMPLATES = Path(__file__).parent / "templates"
MAX_DIFF_CHARS = 300_000
"""A longer diff is cut (the page says so); the full one stays in diff.patch."""
MAX_EXAMPLES = 25
"""Fixed or broken examples shown with traces per candidate page (each kind)."""
MAX_PARTS = 16
"""Parts of a weighted metric shown per example and side."""
MAX_FIELD_CHARS = 2_000


# --------------------------------------------------------------------------- formatting filters


def _score(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _delta(v: Any) -> str:
    return "–" if v is None else f"{v:+.3f}"


def _ratio(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _usd(v: Any) -> str:
    if v is None:
        return "–"
    return f"${v:.4f}" if v < 1 else f"${v:,.2f}"


def _int(v: Any) -> str:
    return "–" if v is None else f"{int(v):,}"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{v:.0%}"


def _duration(s: Any) -> str:
    if s is None:
        return "–"
    s = int(s)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _when(t: Any) -> str:
    return "–" if t is None else datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S")


def _ci(c: dict[str, Any]) -> str:
    if c.get("ci_low") is None or c.get("ci_high") is None:
        return ""
    return f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def _cell(v: Any) -> str:
    """A Markdown table cell: no pipes, no newlines."""
    return " ".join(str(v if v is not None else "").split()).replace("|", "\\|")


def _ids(ids: list[str], k: int = 5) -> str:
    more = f" (+{len(ids) - k})" if len(ids) > k else ""
    return ", ".join(ids[:k]) + more


FILTERS = {"score": _score, "delta": _delta, "ratio": _ratio, "usd": _usd, "int": _int, "pct": _pct,
           "duration": _duration, "when": _when, "ci": _ci, "cell": _cell, "ids": _ids}


@lru_cache(maxsize=2)
def _env(html: bool) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=html,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(FILTERS)
    return env


# --------------------------------------------------------------------------- pieces of the candidate page


def highlight_diff(diff: str) -> Markup:
    """The diff as HTML with inline-styled syntax colours (pygments)."""
    if not diff.strip():
        return Markup('<p class="muted">empty diff</p>')
    return Markup(highlight(diff, DiffLexer(), HtmlFormatter(noclasses=True, style="default", wrapcode=True)))


def summarize_transcript(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Turns, tools called (with counts), the final assistant message and the outcome of an agent transcript.

    Reads ``pipemend-transcript-1`` records (``event``: start, request,
    response, tool, notice, end; the claude proposer's), plain Anthropic
    message rows (``{"role", "content"}``), rows wrapping one
    (``{"type": "assistant", "message": {...}}``) and flat tool-call rows.
    """
    if not rows:
        return None
    turns, from_events, from_blocks, final, outcome = 0, Counter(), Counter(), "", None
    for row in rows:
        event = row.get("event")
        if event in ("tool",) or (row.get("type") in ("tool_use", "tool_call") and row.get("name")):
            from_events[str(row.get("name"))] += 1
            continue
        if event == "end":
            outcome = str(row.get("outcome") or "") + (f": {row['reason']}" if row.get("reason") else "")
            continue
        if event is not None and event != "response":
            continue
        msg = row.get("response") if event == "response" else row.get("message") if isinstance(row.get("message"), dict) else row
        if not isinstance(msg, dict) or (msg.get("role") or row.get("role") or row.get("type")) != "assistant":
            continue
        turns += 1
        content = msg.get("content")
        if isinstance(content, str) and content.strip():
            final = content
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use" and block.get("name"):
                from_blocks[str(block["name"])] += 1
            elif block.get("type") == "text" and str(block.get("text") or "").strip():
                final = str(block["text"])
    tools = from_events or from_blocks  # tool events, when recorded, are the calls that ran
    return {"rows": len(rows), "turns": turns, "tools": tools.most_common(), "final": final.strip(),
            "outcome": outcome}


def _clip(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
        if len(text) > 100:
            text = json.dumps(value, indent=1, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + f"\n… ({len(text) - MAX_FIELD_CHARS} more characters)"


def _step_view(step: dict[str, Any]) -> dict[str, Any]:
    err = step.get("error")
    calls = []
    for c in step.get("llm_calls") or []:
        if isinstance(c, dict):
            calls.append({"model": c.get("gen_ai.request.model") or c.get("model"),
                          "in": c.get("gen_ai.usage.input_tokens"), "out": c.get("gen_ai.usage.output_tokens"),
                          "cache": "hit" if c.get("pipemend.cache_hit") else "miss", "s": c.get("duration_s")})
    return {"name": step.get("name") or "?", "kind": step.get("kind") or "", "inputs": _clip(step.get("inputs")),
            "output": _clip(step.get("output")), "doc_ids": step.get("doc_ids"),
            "error": (f"{err.get('type')}: {err.get('message')}" if isinstance(err, dict) else str(err)) if err else "",
            "calls": calls,
            "duration": (step["end"] - step["start"]) if isinstance(step.get("end"), (int, float))
            and isinstance(step.get("start"), (int, float)) else None}


def align_steps(base: dict[str, Any] | None, cand: dict[str, Any] | None) -> list[tuple[Any, Any]]:
    """Pairs (base step, candidate step) aligned by step name; None where one side has no such step."""
    b = [s for s in (base or {}).get("steps") or [] if isinstance(s, dict)]
    c = [s for s in (cand or {}).get("steps") or [] if isinstance(s, dict)]
    sm = difflib.SequenceMatcher(a=[s.get("name") for s in b], b=[s.get("name") for s in c], autojunk=False)
    pairs: list[tuple[Any, Any]] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            pairs += list(zip(b[i1:i2], c[j1:j2]))
        else:
            pairs += [(s, None) for s in b[i1:i2]] + [(None, s) for s in c[j1:j2]]
    return [(_step_view(x) if x else None, _step_view(y) if y else None) for x, y in pairs]


def _trace_head(trace: dict[str, Any] | None) -> dict[str, Any] | None:
    if trace is None:
        return None
    err = trace.get("error")
    return {"output": _clip(trace.get("output")),
            "error": (f"{err.get('type')}: {err.get('message')}" if isinstance(err, dict) else str(err)) if err else ""}


def score_parts(row: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A weighted metric's parts of one scored row, each with its judge's verdict reason when a judge gave it:
    ``[{name, score, reason}]`` (empty for a plain metric). The row comes from the run directory; anything
    not shaped as the scorer writes it is left out."""
    parts = (row or {}).get("metric_parts")
    judgments = (row or {}).get("judgments")
    if not isinstance(parts, dict):
        parts = {k: v.get("score") for k, v in judgments.items() if isinstance(v, dict)} \
            if isinstance(judgments, dict) else {}
    judgments = judgments if isinstance(judgments, dict) else {}
    out = []
    for name, score in list(parts.items())[:MAX_PARTS]:
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            continue
        j = judgments.get(name)
        reason = j.get("reason") if isinstance(j, dict) and isinstance(j.get("reason"), str) else ""
        out.append({"name": str(name)[:80], "score": float(score), "reason": _clip(reason)})
    return out


def example_views(run_dir: Path, cand: dict[str, Any], ids: list[str]) -> list[dict[str, Any]]:
    base_rows, cand_rows = scored_rows(run_dir, cand.get("base_val_dir")), scored_rows(run_dir, cand.get("val_dir"))
    out = []
    for i in ids[:MAX_EXAMPLES]:
        bt, ct = read_trace(run_dir, cand.get("base_val_dir"), i), read_trace(run_dir, cand.get("val_dir"), i)
        out.append({"id": i, "base_score": (base_rows.get(i) or {}).get("score"),
                    "cand_score": (cand_rows.get(i) or {}).get("score"),
                    "base_parts": score_parts(base_rows.get(i)), "cand_parts": score_parts(cand_rows.get(i)),
                    "base": _trace_head(bt), "cand": _trace_head(ct), "steps": align_steps(bt, ct)})
    return out


# --------------------------------------------------------------------------- rendering


def render_candidate_page(run_dir: Path, data: dict[str, Any], cand: dict[str, Any]) -> Path:
    """Write ``candidates/<n>/index.html`` and return its path."""
    cdir = run_dir / "candidates" / str(cand["n"])
    diff = read_text(cdir / "diff.patch")
    cut = len(diff) > MAX_DIFF_CHARS
    page = _env(True).get_template("candidate.html.j2").render(
        run=data, c=cand, diff_html=highlight_diff(diff[:MAX_DIFF_CHARS]), diff_cut=cut,
        transcript=summarize_transcript(read_rows(cdir / "transcript.jsonl")),
        error_text=read_text(cdir / "error.txt")[-4000:],
        fixed=example_views(run_dir, cand, cand["fixed"]), broken=example_views(run_dir, cand, cand["regressions"]),
        max_examples=MAX_EXAMPLES, generated=time.time())
    path = cdir / "index.html"
    atomic_write_text(path, page)
    return path


def render_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html``, ``report.md`` and every candidate's page; return (html, md) paths."""
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    for cand in data["candidates"]:
        try:
            render_candidate_page(run_dir, data, cand)
        except Exception as e:  # noqa: BLE001 - one bad candidate page never costs the report
            cand["page_error"] = f"{type(e).__name__}: {e}"
    plot = Markup(score_plot(data["baseline"]["val"], data["candidates"]))
    html = _env(True).get_template("report.html.j2").render(run=data, plot=plot, generated=time.time())
    md = _env(False).get_template("report.md.j2").render(run=data, generated=time.time())
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    atomic_write_text(html_path, html)
    atomic_write_text(md_path, md)
    return html_path, md_path
