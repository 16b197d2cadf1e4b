"""``RUN_DIR/history/<n>``: what later proposers read of candidate ``n`` (the agents through ``history_*`` tools,
plugins at ``/sandbox/history``).

```
history/<n>/diff.patch, rationale.md
history/<n>/verdict.json                 the verdict's aggregates only: val never appears per example (no ids, no outputs)
history/<n>/train_traces/<id>.json       the candidate's latest train trace of each example its train runs covered: the
                                         whole pipemend-1 trace (every step's inputs, output, error, logs, LLM calls),
                                         indented so that line ranges read it in parts
history/<n>/train_traces/index.json      pipemend-history-traces-1: the runs, each trace's run, train score and error,
                                         what was cut or left out, and the caps
```

Raw traces, not summaries (a proposer that reads past candidates' full traces beats one given scores or
summaries), within caps: a trace over ``MAX_TRACE_CHARS`` has its long strings and lists cut, each cut saying
how much it dropped, until it fits; past ``MAX_TRACES_CHARS`` for the candidate the remaining traces are left
out, failures kept first. Only train runs (``candidates/<n>/train/<k>``) are read, only traces of train ids,
only regular files opened without following a link (a sandbox wrote them). The folder is built aside and
moved into place, so a crash leaves the previous one or none, never half of one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Collection

from .. import gate
from ..fsutil import atomic_write_json, atomic_write_text, copy_regular, read_regular

HISTORY_TRACES_FORMAT = "pipemend-history-traces-1"
MAX_TRACE_CHARS = 256_000
"""One trace in the history, as indented JSON, at most (longer strings and lists are cut to fit)."""
MAX_TRACES_CHARS = 8_000_000
"""All of one candidate's traces at most; the rest are left out (listed in index.json)."""
MAX_READ_BYTES = 16 * 1024 * 1024
"""A trace file larger than this is not read at all."""
MAX_SCORED_BYTES = 64 * 1024 * 1024
_MAX_DEPTH = 40
_MAX_ITEMS = 500


def write_history(h: Path, cdir: Path, verdict: gate.Verdict, train_ids: Collection[str]) -> None:
    """Write ``h`` (``history/<n>``) for the candidate in ``cdir``: diff, rationale, verdict aggregates, train traces."""
    partial = h.parent / f".partial-{h.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ("diff.patch", "rationale.md"):
        copy_regular(cdir / name, partial / name)
    atomic_write_json(partial / "verdict.json", verdict.aggregates())
    _train_traces(partial / "train_traces", cdir / "train", set(train_ids))
    shutil.rmtree(h, ignore_errors=True)
    partial.rename(h)


def _runs(train: Path) -> list[Path]:
    if not train.is_dir() or train.is_symlink():
        return []
    runs = [d for d in train.iterdir() if d.name.isdigit() and d.is_dir() and not d.is_symlink()]
    return sorted(runs, key=lambda d: int(d.name))


def _scores(run: Path) -> dict[str, dict[str, Any]]:
    """``id -> {score, error}`` of a train run's ``scored.jsonl`` (train rows only; unreadable lines skipped)."""
    data = read_regular(run / "scored.jsonl", max_bytes=MAX_SCORED_BYTES)
    out: dict[str, dict[str, Any]] = {}
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            err = row.get("error")
            out[row["id"]] = {"score": row.get("score") if isinstance(row.get("score"), (int, float)) else None,
                              "error": (err.get("message") if isinstance(err, dict) else err) if err else None}
    return out


def _train_traces(dst: Path, train: Path, train_ids: set[str]) -> None:
    runs = _runs(train)
    latest: dict[str, tuple[int, Path, dict[str, Any]]] = {}
    for run in runs:
        traces = run / "traces"
        if not traces.is_dir() or traces.is_symlink():
            continue
        scores = _scores(run)
        for f in traces.iterdir():
            example_id = f.name[: -len(".json")] if f.name.endswith(".json") else None
            if example_id in train_ids:  # a train id, by name: nothing else a sandbox left there
                latest[example_id] = (int(run.name), f, scores.get(example_id, {}))
    # failures first, so the total cap leaves out passing examples before failing ones
    order = sorted(latest.items(), key=lambda kv: (_score_key(kv[1][2].get("score")), kv[0]))
    dst.mkdir(parents=True, exist_ok=True)
    rows, left_out, total = [], [], 0
    for example_id, (k, path, score) in order:
        row = {"id": example_id, "run": k, "score": score.get("score"), "error": _short(score.get("error"))}
        trace = _read_trace(path)
        if trace is None:
            left_out.append({**row, "why": "not a readable JSON object (a link, too large, or not JSON)"})
            continue
        text, cuts = _fit(trace, MAX_TRACE_CHARS)
        if total + len(text) > MAX_TRACES_CHARS:
            left_out.append({**row, "why": f"the candidate's traces reached {MAX_TRACES_CHARS} characters"})
            continue
        atomic_write_text(dst / f"{example_id}.json", text)
        total += len(text)
        rows.append({**row, "file": f"{example_id}.json", "chars": len(text), "cuts": cuts})
    atomic_write_json(dst / "index.json", {
        "format": HISTORY_TRACES_FORMAT,
        "runs": [int(r.name) for r in runs],
        "note": ("each file is the whole trace of the candidate's latest train run of that example, failures first; "
                 "`cuts` counts strings or lists cut to fit the cap (each cut says how much it dropped)"
                 if latest else "the candidate ran no train examples, so it has no train traces"),
        "traces": rows, "left_out": left_out,
        "caps": {"trace_chars": MAX_TRACE_CHARS, "total_chars": MAX_TRACES_CHARS},
    })


def _score_key(score: Any) -> float:
    return float(score) if isinstance(score, (int, float)) else -1.0


def _short(value: Any, limit: int = 300) -> Any:
    return value[:limit] if isinstance(value, str) else value


def _read_trace(path: Path) -> dict[str, Any] | None:
    data = read_regular(path, max_bytes=MAX_READ_BYTES)  # a regular file, never through a link, capped
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False, default=str) + "\n"


def _fit(trace: dict[str, Any], cap: int) -> tuple[str, int]:
    """The trace as indented JSON within ``cap`` characters, and how many strings or lists were cut for it."""
    cuts = [0]
    text = _dumps(_clip(trace, None, _MAX_ITEMS, cuts))  # the depth and item caps apply whatever the size
    for limit, items in _CUT_STEPS:
        if len(text) <= cap:
            break
        cuts = [0]
        text = _dumps(_clip(trace, limit, items, cuts))
    if len(text) > cap:
        skeleton = {k: trace[k][:200] for k in ("trace_format", "example_id") if isinstance(trace.get(k), str)}
        text = _dumps({**skeleton, "cut": f"the trace is too large to keep even with every field cut (over {cap} "
                                          "characters)"})
        cuts = [1]
    return text, cuts[0]


_CUT_STEPS = ((20_000, _MAX_ITEMS), (4_000, 200), (1_000, 50), (200, 20), (50, 5))
"""(longest string, longest list) of each try, until the trace fits."""


def _clip(value: Any, limit: int | None, items: int, cuts: list[int], depth: int = 0) -> Any:
    """``value`` with strings longer than ``limit`` and lists longer than ``items`` cut (counted in ``cuts``),
    nesting deeper than ``_MAX_DEPTH`` replaced by a note."""
    if depth > _MAX_DEPTH:
        cuts[0] += 1
        return "[cut: nested too deep]"
    if isinstance(value, str):
        if limit is not None and len(value) > limit:
            cuts[0] += 1
            return value[:limit] + f" ... [cut: {len(value) - limit} more characters]"
        return value
    if isinstance(value, dict):
        return {str(k)[:200]: _clip(v, limit, items, cuts, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        out = [_clip(v, limit, items, cuts, depth + 1) for v in value[:items]]
        if len(value) > items:
            cuts[0] += 1
            out.append(f"[cut: {len(value) - items} more items]")
        return out
    return value
