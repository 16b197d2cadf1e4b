"""A run's evaluations as OpenTelemetry spans: OTLP/JSON ``ExportTraceServiceRequest`` dicts.

One trace per (example, candidate). Its root span is the example (run id, candidate, split, example id, score,
the score as a ``gen_ai.evaluation.result`` event); under it a span per trace step, nested as the trace nests
them (``parent``); under a step a ``chat {model}`` CLIENT span per LLM call with the GenAI semantic conventions
(``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model``, usage, finish reasons and, opt-in,
``gen_ai.input.messages``/``gen_ai.output.messages`` from the gateway's call log).

OTLP/JSON rules kept here: trace and span ids are lowercase hex (32/16 chars), derived from the run id, the
candidate and the example id (and the step's place), so exporting again sends the same ids; 64-bit integers
(``timeUnixNano``, ``intValue``) are strings; enums (span kind, status code) are integers.

Which evaluations a run exports (``finished_evaluations``): the baseline's (``evals/baseline-<split>``, or an
``eval`` run's ``evals/<split>``) and each candidate's ``evals/train``, ``evals/val`` and ``evals/test``. A
candidate raced on val has its looks merged into ``evals/val`` once it ran all of val; one stopped at a look has
only its looks (``val-look<k>``, disjoint slices of val), which are exported instead. Confirmation re-runs
(``confirm-look*``: a few flipped examples at other sample indices) and the proposer's own train runs
(``candidates/<n>/train``) are left out: they repeat examples the exported evaluations hold.

Everything is read as the host reads what a sandbox wrote: regular files only, by name, never through a link,
size-capped (``fsutil``); a missing or unreadable piece blanks only its own part.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..fsutil import open_regular, read_regular, read_regular_at
from ..runtime.trace import call_provider
from ..trace_join import API_PROVIDERS, content_text

SPLITS = ("train", "val", "test")
BASELINE = "baseline"


def candidate_label(n: int) -> str:
    """What an export calls candidate ``n`` (0: the baseline): part of every trace id, and MLflow's run tag."""
    return BASELINE if n == 0 else f"cand-{n}"


MAX_ATTR_CHARS = 8_192
"""A step's inputs or output, an example's inputs or output: cut here (with a marker)."""
MAX_PART_CHARS = 16_384
"""One message part's text (``include_messages``): cut here."""
MAX_MESSAGES = 200
"""Messages of one call kept (``include_messages``): the last ones."""
MAX_MESSAGES_CHARS = 256 * 1024
"""``gen_ai.input.messages`` of one call: the oldest messages are dropped until its JSON fits."""
MAX_LOG_EVENTS = 50
"""Log lines of one step (or example) kept as span events."""
MAX_STEPS = 2_000
MAX_CALLS = 500
"""LLM calls of one step kept as chat spans."""
MAX_TRACE_BYTES = 16 * 1024 * 1024
MAX_ROWS_BYTES = 64 * 1024 * 1024
"""``scored.jsonl`` / ``inputs.jsonl`` of one evaluation."""
MAX_CALL_LOG_BYTES = 4 * 1024 * 1024 * 1024
RIGHT = 0.5
"""An example whose score is at least this passes (the gate's rule): the evaluation event's label."""

SPAN_KIND_INTERNAL = 1
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2
EVALUATION_EVENT = "gen_ai.evaluation.result"


# --------------------------------------------------------------------------- ids, times, attributes


def trace_id_of(run_id: str, candidate: str, example_id: str) -> str:
    """The 32-hex trace id of one example under one candidate of one run (the same on every export)."""
    return hashlib.sha256(f"pipemend\0{run_id}\0{candidate}\0{example_id}".encode()).hexdigest()[:32]


def span_id_of(trace_id: str, key: str) -> str:
    """The 16-hex span id of the span ``key`` (``example``, ``step:3``, ``call:3:0``) in a trace."""
    return hashlib.sha256(f"{trace_id}\0{key}".encode()).hexdigest()[:16]


def _nanos(t: float) -> str:
    return str(max(0, int(round(t * 1_000_000_000))))


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _cut(text: str, limit: int = MAX_ATTR_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"…[pipemend: cut {len(text) - limit} chars]"


def _text(value: Any, limit: int = MAX_ATTR_CHARS) -> str:
    """A value as an attribute's text: a string as is, anything else as JSON; cut at ``limit``."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return _cut(text, limit)


def any_value(value: Any) -> dict[str, Any]:
    """An OTLP/JSON ``AnyValue``: ints as strings (``intValue``), lists as ``arrayValue``, the rest as text."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value} if _num(value) is not None else {"stringValue": repr(value)}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [any_value(v) for v in value]}}
    if isinstance(value, str):  # callers cut their texts; this only bounds what they did not
        return {"stringValue": _cut(value, MAX_MESSAGES_CHARS)}
    return {"stringValue": _text(value)}


def attributes(values: dict[str, Any]) -> list[dict[str, Any]]:
    """``{key: value}`` as OTLP ``KeyValue``s; None values are left out."""
    return [{"key": k, "value": any_value(v)} for k, v in values.items() if v is not None]


def _error_text(error: Any) -> tuple[str, str, str | None]:
    """(type, message, stack trace) of a trace's or a scored row's error."""
    if isinstance(error, dict):
        return (_text(error.get("type") or "Error", 200), _text(error.get("message") or "", 2_000),
                _text(error["traceback"]) if isinstance(error.get("traceback"), str) else None)
    return "Error", _text(error, 2_000), None


def _apply_error(span: dict[str, Any], error: Any, at: float) -> None:
    """Mark ``span`` failed: status ERROR and an ``exception`` event (the semantic conventions' names)."""
    if not error:
        return
    etype, message, stack = _error_text(error)
    span["status"] = {"code": STATUS_ERROR, "message": f"{etype}: {message}"[:2_000]}
    span["events"].append({"timeUnixNano": _nanos(at), "name": "exception", "attributes": attributes(
        {"exception.type": etype, "exception.message": message, "exception.stacktrace": stack})})


def _log_events(logs: Any, fallback: float) -> list[dict[str, Any]]:
    out = []
    for log in (logs if isinstance(logs, list) else [])[:MAX_LOG_EVENTS]:
        if isinstance(log, dict):
            out.append({"timeUnixNano": _nanos(_num(log.get("t")) or fallback), "name": "pipemend.log",
                        "attributes": attributes({k: _text(log[k], 2_000) for k in ("source", "level", "logger", "message")
                                                  if isinstance(log.get(k), str)})})
    return out


def _span(trace_id: str, span_id: str, parent: str | None, name: str, kind: int, start: float, end: float,
          attrs: dict[str, Any]) -> dict[str, Any]:
    span: dict[str, Any] = {"traceId": trace_id, "spanId": span_id, "name": _text(name, 200), "kind": kind,
                            "startTimeUnixNano": _nanos(start), "endTimeUnixNano": _nanos(max(start, end)),
                            "attributes": attributes(attrs), "events": []}
    if parent:
        span["parentSpanId"] = parent
    return span


# --------------------------------------------------------------------------- the gateway's call log (messages)


def _parts(content: Any) -> list[dict[str, Any]]:
    """A Messages-API content (a string or blocks) as GenAI message parts."""
    if isinstance(content, str):
        return [{"type": "text", "content": _cut(content, MAX_PART_CHARS)}]
    parts: list[dict[str, Any]] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "content": _cut(str(block.get("text") or ""), MAX_PART_CHARS)})
        elif kind == "tool_use":
            parts.append({"type": "tool_call", "id": block.get("id"), "name": _text(block.get("name"), 200),
                          "arguments": _bounded(block.get("input"))})
        elif kind == "tool_result":
            parts.append({"type": "tool_call_response", "id": block.get("tool_use_id"),
                          "response": _cut(content_text(block.get("content")), MAX_PART_CHARS)})
        else:
            parts.append({"type": _text(kind or "unknown", 100)})
    return parts


def _bounded(value: Any) -> Any:
    """A JSON value kept as is when small, else its JSON text cut at ``MAX_PART_CHARS``."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return value if len(text) <= MAX_PART_CHARS else _cut(text, MAX_PART_CHARS)


def input_messages(request: Any) -> tuple[str | None, str | None]:
    """(``gen_ai.input.messages``, ``gen_ai.system_instructions``) as JSON text, from a Messages request."""
    if not isinstance(request, dict):
        return None, None
    messages = request.get("messages") if isinstance(request.get("messages"), list) else []
    out = [{"role": _text(m.get("role") or "user", 50), "parts": _parts(m.get("content"))}
           for m in messages[-MAX_MESSAGES:] if isinstance(m, dict)]
    system = request.get("system")
    sys_parts = _parts(system) if system else []
    return _fitting(out), _fitting(sys_parts)


def _fitting(items: list[Any]) -> str | None:
    """``items`` as JSON text within ``MAX_MESSAGES_CHARS``: the oldest dropped until it fits (valid JSON, never
    cut mid-way); None when empty."""
    items = list(items)
    while items:
        text = json.dumps(items, ensure_ascii=False)
        if len(text) <= MAX_MESSAGES_CHARS:
            return text
        if len(items) == 1 and isinstance(items[0], dict) and len(items[0].get("parts") or []) > 1:
            items[0] = {**items[0], "parts": items[0]["parts"][1:]}
        else:
            items.pop(0)
    return None


def output_messages(response: Any) -> str | None:
    """``gen_ai.output.messages`` as JSON text, from a Messages response."""
    if not isinstance(response, dict) or not isinstance(response.get("content"), list):
        return None
    return _fitting([{"role": "assistant", "parts": _parts(response["content"]),
                      "finish_reason": _text(response.get("stop_reason") or "", 50)}])


def _logged_call(row: dict[str, Any], include_messages: bool) -> dict[str, Any]:
    """What the export uses of one call-log row."""
    response = row.get("response") if isinstance(row.get("response"), dict) else {}
    stop = response.get("stop_reason")
    call = {"model": row.get("model"), "api": row.get("api"), "t": _num(row.get("t")),
            "latency_s": _num(row.get("latency_s")), "input_tokens": _int(row.get("input_tokens")),
            "output_tokens": _int(row.get("output_tokens")), "cost_usd": _num(row.get("cost_usd")),
            "cache": row.get("cache"), "error": row.get("error"),
            "response_model": response.get("model") if isinstance(response.get("model"), str) else None,
            "response_id": response.get("id") if isinstance(response.get("id"), str) else None,
            "finish_reasons": [stop] if isinstance(stop, str) else None}
    if include_messages:
        call["input_messages"], call["system_instructions"] = input_messages(row.get("request"))
        call["output_messages"] = output_messages(response)
    return call


def read_call_log(run_dir: Path, *, include_messages: bool = False) -> dict[str, dict[str, Any]]:
    """``RUN_DIR/gateway/calls.jsonl`` by call id (a regular file, never through a link; bad lines skipped)."""
    calls: dict[str, dict[str, Any]] = {}
    try:
        fd = open_regular(Path(run_dir) / "gateway" / "calls.jsonl")
    except OSError:
        return calls
    with os.fdopen(fd, "rb") as f:
        read = 0
        for line in f:
            read += len(line)
            if read > MAX_CALL_LOG_BYTES:
                break
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("call_id"), str):
                calls[row["call_id"]] = _logged_call(row, include_messages)
    return calls


# --------------------------------------------------------------------------- a run's context


class RunContext:
    """What every request of one run shares: its id, target and metric, and its call log (read when first
    needed, once)."""

    def __init__(self, run_id: str, *, run_dir: Path | None = None, target: str | None = None,
                 metric: str = "score", include_messages: bool = False):
        self.run_id = run_id
        self.run_dir = run_dir
        self.target = target
        self.metric = metric
        self.include_messages = include_messages
        self._calls: dict[str, dict[str, Any]] | None = None

    @property
    def calls(self) -> dict[str, dict[str, Any]]:
        if self._calls is None:
            self._calls = read_call_log(self.run_dir, include_messages=self.include_messages) if self.run_dir else {}
        return self._calls

    @classmethod
    def of(cls, run_dir: Path | None, *, run_id: str | None = None, include_messages: bool = False) -> RunContext:
        run = _json_object(run_dir / "run.json") if run_dir else None
        manifest = _frozen_manifest(run_dir) if run_dir else {}
        metric = manifest.get("metric")
        return cls(run_id or str((run or {}).get("run_id") or (run_dir.name if run_dir else "run")), run_dir=run_dir,
                   target=manifest.get("name") if isinstance(manifest.get("name"), str) else None,
                   metric=metric if isinstance(metric, str) else json.dumps(metric, sort_keys=True) if metric else "score",
                   include_messages=include_messages)


def _json_object(path: Path, cap: int = MAX_TRACE_BYTES) -> dict[str, Any] | None:
    data = read_regular(path, max_bytes=cap)
    try:
        obj = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _frozen_manifest(run_dir: Path) -> dict[str, Any]:
    data = read_regular(run_dir / "frozen" / "pipemend.yaml", max_bytes=1024 * 1024)
    try:
        manifest = yaml.safe_load(data) if data is not None else None
    except yaml.YAMLError:
        return {}
    return manifest if isinstance(manifest, dict) else {}


def run_dir_of(eval_dir: Path) -> Path | None:
    """The run directory holding an evaluation folder (the nearest parent with ``run.json``), or None."""
    for parent in list(Path(eval_dir).resolve().parents)[:4]:
        if (parent / "run.json").is_file():
            return parent
    return None


# --------------------------------------------------------------------------- one evaluation folder


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    data = read_regular(path, max_bytes=MAX_ROWS_BYTES)
    rows = []
    for line in (data or b"").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), (str, int)):
            rows.append(row)
    return rows


def _safe_name(example_id: str) -> bool:
    return bool(example_id) and "/" not in example_id and "\0" not in example_id and example_id not in (".", "..")


class _Traces:
    """``traces/<id>.json`` of one evaluation, read inside the folder opened once (never through a link)."""

    def __init__(self, eval_dir: Path):
        try:
            self.fd: int | None = os.open(eval_dir / "traces", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            self.fd = None

    def get(self, example_id: str) -> dict[str, Any] | None:
        if self.fd is None or not _safe_name(example_id):
            return None
        try:
            obj = json.loads(read_regular_at(f"{example_id}.json", MAX_TRACE_BYTES, dir_fd=self.fd))
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _split_of(eval_dir: Path, rows: list[dict[str, Any]]) -> str:
    summary = _json_object(eval_dir / "summary.json", 1024 * 1024) or {}
    if isinstance(summary.get("split"), str):
        return summary["split"]
    if rows and isinstance(rows[0].get("split"), str):
        return rows[0]["split"]
    name = eval_dir.name.removeprefix("baseline-")
    return "val" if name.startswith("val-look") else name


def example_traces(ctx: RunContext, eval_dir: Path, *, candidate: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(trace id, spans)`` of each scored example of one evaluation folder, in ``scored.jsonl`` order."""
    eval_dir = Path(eval_dir)
    rows = _jsonl_rows(eval_dir / "scored.jsonl")
    split = _split_of(eval_dir, rows)
    inputs = {str(r["id"]): r.get("inputs") for r in _jsonl_rows(eval_dir / "inputs.jsonl")}
    fallback = _mtime(eval_dir / "scored.jsonl")
    traces = _Traces(eval_dir)
    try:
        for row in rows:
            example_id = str(row["id"])
            spans = ExampleSpans(ctx, candidate=candidate, split=split, evaluation=eval_dir.name, row=row,
                                 trace=traces.get(example_id), inputs=inputs.get(example_id), fallback=fallback)
            yield spans.trace_id, spans.build()
    finally:
        traces.close()


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def request_of(ctx: RunContext, candidate: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``ExportTraceServiceRequest`` (OTLP/JSON) holding ``spans`` of one candidate of the run."""
    resource = {"service.name": "pipemend", "service.version": __version__, "pipemend.target": ctx.target,
                "pipemend.run.id": ctx.run_id, "pipemend.candidate": candidate}
    return {"resourceSpans": [{"resource": {"attributes": attributes(resource)},
                               "scopeSpans": [{"scope": {"name": "pipemend", "version": __version__},
                                               "spans": spans}]}]}


def evaluation_request(eval_dir: Path, *, run_id: str, candidate: str, include_messages: bool = False) -> dict:
    """One OTLP/JSON ``ExportTraceServiceRequest`` for every example of one evaluation folder (``candidate``:
    ``"baseline"`` or ``"cand-<n>"``); the call log and the metric come from the run directory holding it."""
    ctx = RunContext.of(run_dir_of(eval_dir), run_id=run_id, include_messages=include_messages)
    return request_of(ctx, candidate, [s for _, spans in example_traces(ctx, eval_dir, candidate=candidate)
                                       for s in spans])


# --------------------------------------------------------------------------- one example


class ExampleSpans:
    """The spans of one example's trace: the example, its steps, their LLM calls."""

    def __init__(self, ctx: RunContext, *, candidate: str, split: str, evaluation: str, row: dict[str, Any],
                 trace: dict[str, Any] | None, inputs: Any, fallback: float):
        self.ctx = ctx
        self.row = row
        self.trace = trace or {}
        self.example_id = str(row["id"])
        self.trace_id = trace_id_of(ctx.run_id, candidate, self.example_id)
        self.root_id = span_id_of(self.trace_id, "example")
        self.start = _num(self.trace.get("start")) or fallback
        self.end = max(self.start, _num(self.trace.get("end")) or self.start)
        cand_n = int(candidate[5:]) if candidate.startswith("cand-") and candidate[5:].isdigit() else None
        self.root_attrs = {
            "pipemend.run.id": ctx.run_id, "pipemend.candidate": candidate, "pipemend.candidate.n": cand_n,
            "pipemend.split": split, "pipemend.evaluation": evaluation, "pipemend.example.id": self.example_id,
            "pipemend.score": _num(row.get("score")) or 0.0,
            "pipemend.example.inputs": _text(inputs) if inputs is not None else None,
            "pipemend.output": _text(row.get("output")) if row.get("output") is not None else None,
            "pipemend.timed_out": bool(row.get("timed_out")), "pipemend.latency_s": _num(row.get("latency_s")),
            "pipemend.cost_usd": _num(row.get("cost_usd")),
            "pipemend.trace_format": self.trace.get("trace_format") if isinstance(self.trace.get("trace_format"), str) else None,
        }

    def build(self) -> list[dict[str, Any]]:
        root = _span(self.trace_id, self.root_id, None, f"example {self.example_id}", SPAN_KIND_INTERNAL,
                     self.start, self.end, self.root_attrs)
        root["events"] += _log_events(self.trace.get("logs"), self.end)
        _apply_error(root, self.trace.get("error") or self.row.get("error"), self.end)
        score = self.root_attrs["pipemend.score"]
        root["events"].append({"timeUnixNano": _nanos(self.end), "name": EVALUATION_EVENT, "attributes": attributes({
            "gen_ai.evaluation.name": self.ctx.metric, "gen_ai.evaluation.score.value": score,
            "gen_ai.evaluation.score.label": "pass" if score >= RIGHT else "fail"})})
        spans = [root] + self.calls(self.trace.get("llm_calls"), self.root_id, "root", self.start, self.end)
        steps = [s for s in self.trace.get("steps") or [] if isinstance(s, dict)][:MAX_STEPS]
        span_of: dict[str, str] = {}
        for i, step in enumerate(steps):
            span_id = span_id_of(self.trace_id, f"step:{i}")
            parent = span_of.get(str(step.get("parent"))) if step.get("parent") is not None else None
            span_of.setdefault(str(step.get("id")), span_id)  # only earlier steps can be parents: no cycles
            spans += self.step(step, i, span_id, parent or self.root_id)
        return spans

    def step(self, step: dict[str, Any], i: int, span_id: str, parent: str) -> list[dict[str, Any]]:
        start = _num(step.get("start")) or self.start
        end = _num(step.get("end")) or self.end  # a step still open at a timeout ends with the example
        doc_ids = step.get("doc_ids")
        attrs = {"pipemend.step.id": _text(step.get("id"), 100), "pipemend.step.kind": _text(step.get("kind") or "other", 50),
                 "pipemend.step.source": step.get("source") if isinstance(step.get("source"), str) else None,
                 "pipemend.step.inputs": _text(step.get("inputs")) if step.get("inputs") is not None else None,
                 "pipemend.step.output": _text(step.get("output")) if step.get("output") is not None else None,
                 "pipemend.step.doc_ids": [_text(d, 200) for d in doc_ids[:200]] if isinstance(doc_ids, list) else None}
        span = _span(self.trace_id, span_id, parent, str(step.get("name") or "step"), SPAN_KIND_INTERNAL, start,
                     end, attrs)
        span["events"] += _log_events(step.get("logs"), end)
        _apply_error(span, step.get("error"), end)
        return [span] + self.calls(step.get("llm_calls"), span_id, str(i), start, max(start, end))

    def calls(self, calls: Any, parent: str, key: str, start: float, end: float) -> list[dict[str, Any]]:
        return [self.chat(call, parent, f"call:{key}:{j}", start, end)
                for j, call in enumerate((calls if isinstance(calls, list) else [])[:MAX_CALLS]) if isinstance(call, dict)]

    def chat(self, call: dict[str, Any], parent: str, key: str, start: float, end: float) -> dict[str, Any]:
        """A ``chat {model}`` CLIENT span: the trace's record of the call, completed from the call log."""
        call_id = call.get("call_id") if isinstance(call.get("call_id"), str) else None
        logged = self.ctx.calls.get(call_id or "", {})
        model = call.get("gen_ai.request.model") or call.get("model") or logged.get("model")
        operation = call.get("gen_ai.operation.name") or "chat"
        if logged.get("t") is not None:
            c_start = logged["t"]
            c_end = c_start + (logged.get("latency_s") or 0.0)
        else:  # no call-log row: the call ended by its step's end, and took duration_s
            c_end = end
            c_start = max(start, c_end - (_num(call.get("duration_s")) or 0.0))

        def tokens(name: str) -> int | None:
            logged_n = logged.get(f"{name}_tokens")
            return logged_n if logged_n is not None else _int(call.get(f"gen_ai.usage.{name}_tokens"))

        status = _int(call.get("http.response.status_code"))
        attrs = {
            "gen_ai.operation.name": _text(operation, 50),
            "gen_ai.provider.name": call_provider(call) or API_PROVIDERS.get(str(logged.get("api")), "anthropic"),
            "gen_ai.request.model": _text(model, 200) if model else None,
            "gen_ai.response.model": logged.get("response_model") or call.get("gen_ai.response.model"),
            "gen_ai.response.id": logged.get("response_id"),
            "gen_ai.usage.input_tokens": tokens("input"), "gen_ai.usage.output_tokens": tokens("output"),
            "gen_ai.response.finish_reasons": logged.get("finish_reasons"),
            "pipemend.call_id": call_id,
            "pipemend.cache_hit": (logged["cache"] == "hit") if isinstance(logged.get("cache"), str)
            else call.get("pipemend.cache_hit") if isinstance(call.get("pipemend.cache_hit"), bool) else None,
            "pipemend.cost_usd": logged.get("cost_usd"),
            "http.response.status_code": status,
        }
        if self.ctx.include_messages:
            attrs.update({"gen_ai.system_instructions": logged.get("system_instructions"),
                          "gen_ai.input.messages": logged.get("input_messages"),
                          "gen_ai.output.messages": logged.get("output_messages")})
        name = f"{operation} {model}" if model else str(operation)
        span = _span(self.trace_id, span_id_of(self.trace_id, key), parent, name, SPAN_KIND_CLIENT, c_start, c_end,
                     attrs)
        error = logged.get("error") or ({"type": str(status), "message": f"HTTP {status}"}
                                        if status is not None and status >= 400 else None)
        if error:
            etype = _error_text(error)[0]
            span["attributes"] += attributes({"error.type": etype})
            _apply_error(span, error, c_end)
        return span


# --------------------------------------------------------------------------- a whole run


def _finished(eval_dir: Path) -> bool:
    """An evaluation folder whose scores are written (``write_eval`` writes summary.json last)."""
    return (eval_dir.is_dir() and not eval_dir.is_symlink() and (eval_dir / "scored.jsonl").is_file()
            and (eval_dir / "summary.json").is_file())


def _look_number(path: Path) -> int:
    tail = path.name.removeprefix("val-look")
    return int(tail) if tail.isdigit() else 0


def finished_evaluations(run_dir: Path) -> list[tuple[str, Path]]:
    """``(candidate label, eval dir)`` of each finished evaluation a run exports (the module's docstring says
    which), baseline first, then candidates by number; each in train, val, test order."""
    run_dir = Path(run_dir)
    out: list[tuple[str, Path]] = []
    for split in SPLITS:
        for name in (f"baseline-{split}", split):  # optimize runs; eval runs
            if _finished(run_dir / "evals" / name):
                out.append((BASELINE, run_dir / "evals" / name))
    cdir = run_dir / "candidates"
    nums = sorted(int(p.name) for p in cdir.iterdir()
                  if p.name.isdigit() and p.is_dir() and not p.is_symlink()) if cdir.is_dir() else []
    for n in nums:
        evals = cdir / str(n) / "evals"
        if evals.is_symlink() or not evals.is_dir():
            continue
        for split in SPLITS:
            if _finished(evals / split):
                out.append((candidate_label(n), evals / split))
            elif split == "val":
                looks = sorted((p for p in evals.glob("val-look*") if _look_number(p) and _finished(p)), key=_look_number)
                out += [(candidate_label(n), p) for p in looks]
    return out


def run_id_of(run_dir: Path) -> str:
    run = _json_object(Path(run_dir) / "run.json") or {}
    return str(run.get("run_id") or Path(run_dir).name)


def run_requests(run_dir: Path, *, include_messages: bool = False,
                 candidates: set[str] | None = None) -> Iterator[tuple[str, Path, dict]]:
    """``(candidate label, eval dir, request)`` for each finished evaluation of the run (``finished_evaluations``),
    only the labels in ``candidates`` when given (``"baseline"``, ``"cand-<n>"``)."""
    run_dir = Path(run_dir)
    ctx = RunContext.of(run_dir, run_id=run_id_of(run_dir), include_messages=include_messages)
    for label, eval_dir in finished_evaluations(run_dir):
        if candidates is None or label in candidates:
            spans = [s for _, trace in example_traces(ctx, eval_dir, candidate=label) for s in trace]
            yield label, eval_dir, request_of(ctx, label, spans)


def request_traces(request: dict[str, Any]) -> list[str]:
    """The distinct trace ids of a request, in order."""
    seen: dict[str, None] = {}
    for rs in request.get("resourceSpans") or []:
        for ss in rs.get("scopeSpans") or []:
            for span in ss.get("spans") or []:
                seen.setdefault(span.get("traceId"), None)
    return list(seen)


MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""A request pushed to a collector is split (by whole traces) above this many bytes of JSON (gRPC-fronted
collectors refuse more than 4 MiB by default)."""


def split_request(request: dict[str, Any], max_bytes: int = MAX_REQUEST_BYTES) -> list[dict[str, Any]]:
    """``request`` as is when its JSON fits ``max_bytes``, else as several requests of whole traces each (a trace
    larger than ``max_bytes`` goes alone)."""
    size = len(json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode())
    if size <= max_bytes:
        return [request]
    out: list[dict[str, Any]] = []
    for rs in request.get("resourceSpans") or []:
        for ss in rs.get("scopeSpans") or []:
            by_trace: dict[str, list[dict[str, Any]]] = {}
            for span in ss.get("spans") or []:
                by_trace.setdefault(span.get("traceId"), []).append(span)
            group: list[dict[str, Any]] = []
            used = 0
            for spans in by_trace.values():
                n = len(json.dumps(spans, separators=(",", ":"), ensure_ascii=False).encode())
                if group and used + n > max_bytes:
                    out.append({"resourceSpans": [{**rs, "scopeSpans": [{**ss, "spans": group}]}]})
                    group, used = [], 0
                group += spans
                used += n
            if group:
                out.append({"resourceSpans": [{**rs, "scopeSpans": [{**ss, "spans": group}]}]})
    return out
