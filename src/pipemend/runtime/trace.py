"""The trace SDK a target pipeline imports: ``from pipemend import trace``.

Mark steps with a context manager or a decorator::

    with trace.step("retrieve", kind="retrieval", query=q) as s:
        docs = search(q)
        s.output(docs)                       # doc ids taken from [{"id": ...}, ...]

    @trace.step(kind="generation")
    def answer(question, docs): ...

Keyword arguments of ``step`` are the step's recorded inputs (``kind`` and
``doc_ids`` are reserved). Inside a step, ``logging`` records and ``print``s
of that thread/context, errors, timings and LLM calls are recorded into it.

Each example's trace lives in a ``contextvars`` context
(``start_example`` / ``ExampleTrace.finish``), so concurrent examples in
threads never mix. Outside an example, ``step`` is a cheap no-op and the code
just runs. Tracing never breaks the pipeline: a fault in recording is logged
to the ``pipemend.trace`` logger and the step goes on.

``current_step_name()`` is the innermost step's own name (``"retrieve"``, not
``"hop2.retrieve"``): the name the pipeline wrote, which is what the gateway
logs and a reader searches for; nesting is in the trace's ``parent`` links.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import io
import logging
import math
import sys
import threading
import time
import traceback
from typing import Any, Callable, TextIO

TRACE_FORMAT = "pipemend-2"
"""``pipemend-2``: an LLM call's provider is ``gen_ai.provider.name``; ``pipemend-1`` traces wrote ``gen_ai.system``
(read either with ``call_provider``)."""
PROVIDER_KEY = "gen_ai.provider.name"
OLD_PROVIDER_KEY = "gen_ai.system"
"""The provider's key in ``pipemend-1`` traces (the GenAI conventions' name before ``gen_ai.provider.name``)."""
KINDS = ("retrieval", "generation", "parse", "tool", "other")
MAX_STR = 20_000
"""Longer strings in inputs, outputs and logs are cut here, with a marker saying how much was cut."""
MAX_ITEMS = 2_000
"""Longer lists and dicts are cut here, with a marker."""
MAX_DEPTH = 24
CUT_MARK = "…[pipemend: truncated"
"""Begins the marker that stands where a string or a list was cut."""

log = logging.getLogger("pipemend.trace")

_example: contextvars.ContextVar[ExampleTrace | None] = contextvars.ContextVar("pipemend_example", default=None)
_step: contextvars.ContextVar[_StepRecord | None] = contextvars.ContextVar("pipemend_step", default=None)

# --------------------------------------------------------------------------- JSON-safe values


def _cut(s: str) -> str:
    if len(s) <= MAX_STR:
        return s
    return s[:MAX_STR] + f"{CUT_MARK} {len(s) - MAX_STR} chars]"


def _safe_repr(value: Any) -> str:
    try:
        return _cut(repr(value))
    except Exception as e:  # a __repr__ that raises
        return f"<unrepresentable {type(value).__name__}: {type(e).__name__}>"


def jsonable(value: Any, _depth: int = 0) -> Any:
    """A JSON-safe copy of ``value``: containers copied, strings cut, anything else its ``repr``."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return _cut(value)
    if isinstance(value, bytes):
        return _safe_repr(value)
    if _depth >= MAX_DEPTH:
        return _safe_repr(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(value.items()):
            if i >= MAX_ITEMS:
                out["…pipemend"] = f"truncated {len(value) - MAX_ITEMS} items"
                break
            out[k if isinstance(k, str) else _safe_repr(k)] = jsonable(v, _depth + 1)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        out_list = [jsonable(v, _depth + 1) for v in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            out_list.append(f"{CUT_MARK} {len(items) - MAX_ITEMS} items]")
        return out_list
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump) and not isinstance(value, type):
        try:
            return jsonable(dump(), _depth + 1)
        except Exception:
            pass
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        try:
            return jsonable(dataclasses.asdict(value), _depth + 1)
        except Exception:
            pass
    return _safe_repr(value)


def _record_value(value: Any, what: str) -> Any:
    """``jsonable(value)``, or a marker (and a logged warning) when copying it fails."""
    try:
        return jsonable(value)
    except Exception as e:
        log.warning("pipemend: could not record %s (%s: %s); stored a marker instead", what, type(e).__name__, e)
        return f"<pipemend: could not record {type(value).__name__}: {type(e).__name__}>"


def _error_dict(exc: BaseException) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"type": type(exc).__name__, "message": _cut(str(exc)), "traceback": _cut(tb)}


def _ids_of(value: Any) -> list[str] | None:
    """Ids of a non-empty list of dicts that all have ``"id"``, else None."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(d, dict) and "id" in d for d in value):
        return [str(d["id"]) for d in value]
    return None


def _doc_ids_from_inputs(inputs: dict[str, Any]) -> list[str] | None:
    found: list[str] = []
    for v in inputs.values():
        found.extend(_ids_of(v) or [])
    return list(dict.fromkeys(found)) or None


# --------------------------------------------------------------------------- records


class _StepRecord:
    """One step of one example; mutated only under the example's lock."""

    __slots__ = ("example", "data", "pending", "parent")

    def __init__(self, example: ExampleTrace, data: dict[str, Any], parent: _StepRecord | None):
        self.example = example
        self.data = data
        self.parent = parent
        self.pending = {"stdout": "", "stderr": ""}


class ExampleTrace:
    """The trace of one example. Made active in the current context by ``start_example``."""

    def __init__(self, example_id: str):
        self.example_id = str(example_id)
        self.start = time.time()
        self.steps: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []  # emitted inside the example but outside any step
        self.llm_calls: list[dict[str, Any]] = []  # made inside the example but outside any step
        self.pending = {"stdout": "", "stderr": ""}
        self.lock = threading.RLock()
        self.finished: dict[str, Any] | None = None
        self._token: contextvars.Token | None = None
        self._step_token: contextvars.Token | None = None

    # internal: called with the example's lock held
    def _new_step_id(self) -> str:
        return f"s{len(self.steps) + 1}"

    def _add_log(self, step: _StepRecord | None, entry: dict[str, Any]) -> None:
        with self.lock:
            if self.finished is None:
                (step.data["logs"] if step else self.logs).append(entry)

    def _write(self, step: _StepRecord | None, source: str, text: str) -> None:
        """Route a stream write into log lines (one entry per completed line)."""
        with self.lock:
            holder = step if step is not None else self
            buf = holder.pending[source] + text
            *lines, rest = buf.split("\n")
            holder.pending[source] = rest
            now = time.time()
        for line in lines:
            self._add_log(step, {"t": now, "source": source, "message": _cut(line)})

    def _flush_pending(self, step: _StepRecord | None) -> None:
        holder = step if step is not None else self
        for source in ("stdout", "stderr"):
            with self.lock:
                rest, holder.pending[source] = holder.pending[source], ""
            if rest:
                self._add_log(step, {"t": time.time(), "source": source, "message": _cut(rest)})

    def finish(self, output: Any = None, error: BaseException | dict[str, Any] | str | None = None) -> dict[str, Any]:
        """Close the trace and return it as a ``TRACE_FORMAT`` JSON-safe dict.

        Safe to call from another thread (the runner does, on timeout); steps
        still open then keep ``"end": null``. Later recording is ignored.
        """
        with self.lock:
            if self.finished is not None:
                return self.finished
            self._flush_pending(None)
            if isinstance(error, BaseException):
                err: dict[str, Any] | None = _error_dict(error)
            elif isinstance(error, str):
                err = {"type": "Error", "message": _cut(error), "traceback": None}
            else:
                err = jsonable(error)
            out = _record_value(output, "the example's output")
            self.finished = {
                "trace_format": TRACE_FORMAT,
                "example_id": self.example_id,
                "start": self.start,
                "end": time.time(),
                "error": err,
                "output": out,
                "steps": [_copy_step(s) for s in self.steps],
                "logs": list(self.logs),
                "llm_calls": list(self.llm_calls),
            }
        if self._token is not None:
            try:
                _example.reset(self._token)
                if self._step_token is not None:
                    _step.reset(self._step_token)
            except ValueError:  # finished from another context (a timeout): nothing to reset here
                pass
            self._token = None
        return self.finished


def _copy_step(s: dict[str, Any]) -> dict[str, Any]:
    d = dict(s)
    d["logs"] = list(s["logs"])
    d["llm_calls"] = list(s["llm_calls"])
    return d


def _live_step() -> _StepRecord | None:
    """The innermost step still open in this context. A framework hook's step closed in another context (an
    async generator's last chunk) can stay set here after it ended: it, and any ended parent, is skipped."""
    st = _step.get()
    while st is not None and st.data["end"] is not None:
        st = st.parent
    return st


def start_example(example_id: str) -> ExampleTrace:
    """Begin tracing one example in the current context (each example in its own ``copy_context()``)."""
    install_capture()
    ex = ExampleTrace(example_id)
    ex._token = _example.set(ex)
    ex._step_token = _step.set(None)
    return ex


def current_example_id() -> str | None:
    ex = _example.get()
    return ex.example_id if ex is not None else None


def current_step_name() -> str | None:
    """The innermost active step's own name, or None outside any step."""
    st = _live_step()
    return st.data["name"] if st is not None else None


def current_step_id() -> str | None:
    st = _live_step()
    return st.data["id"] if st is not None else None


_OTEL_KEYS = {
    "model": "gen_ai.request.model",
    "response_model": "gen_ai.response.model",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "cache_hit": "pipemend.cache_hit",
}


def call_provider(call: Any) -> str | None:
    """The provider of a trace's LLM call record, in either trace format (``gen_ai.provider.name``, or
    ``pipemend-1``'s ``gen_ai.system``); None when the record names none."""
    if not isinstance(call, dict):
        return None
    value = call.get(PROVIDER_KEY, call.get(OLD_PROVIDER_KEY))
    return value if isinstance(value, str) and value else None


def record_llm_call(call: dict[str, Any]) -> None:
    """Attach one LLM call to the current step (or to the example, outside any step).

    Plain keys (``model``, ``input_tokens``, ``output_tokens``, ``cache_hit``
    or ``cache: "hit"|"miss"``) are renamed to their OpenTelemetry GenAI
    names; ``call_id``, ``duration_s`` and other keys are kept as given.
    """
    ex = _example.get()
    if ex is None:
        return
    try:
        rec: dict[str, Any] = {PROVIDER_KEY: "anthropic", "gen_ai.operation.name": "chat"}
        for k, v in call.items():
            if k == "cache":
                rec["pipemend.cache_hit"] = v == "hit" if isinstance(v, str) else bool(v)
            else:
                rec[_OTEL_KEYS.get(k, k)] = jsonable(v)
        st = _live_step()
        with ex.lock:
            if ex.finished is None:
                (st.data["llm_calls"] if st is not None else ex.llm_calls).append(rec)
    except Exception:
        log.warning("pipemend: could not record an LLM call", exc_info=True)


# --------------------------------------------------------------------------- steps


class Step:
    """Handle of an active step: ``s.output(value, doc_ids=None)``, ``s.log(message)``."""

    __slots__ = ("_rec", "_output_set")

    def __init__(self, rec: _StepRecord | None):
        self._rec = rec
        self._output_set = False

    @property
    def id(self) -> str | None:
        return self._rec.data["id"] if self._rec else None

    def output(self, value: Any, doc_ids: list[Any] | None = None) -> Any:
        """Record the step's output (and the documents it returned or used); returns ``value``."""
        self._output_set = True
        rec = self._rec
        if rec is None:
            return value
        try:
            safe = _record_value(value, f"the output of step {rec.data['name']!r}")
            ids = [str(i) for i in doc_ids] if doc_ids is not None else None
            if ids is None and rec.data["kind"] == "retrieval":
                ids = _ids_of(value)
            with rec.example.lock:
                rec.data["output"] = safe
                if ids is not None:
                    rec.data["doc_ids"] = ids
        except Exception:
            log.warning("pipemend: could not record the output of step %r", rec.data.get("name"), exc_info=True)
        return value

    def log(self, message: Any) -> None:
        rec = self._rec
        if rec is None:
            return
        try:
            msg = message if isinstance(message, str) else _safe_repr(message)
            rec.example._add_log(rec, {"t": time.time(), "source": "step", "message": _cut(msg)})
        except Exception:
            log.warning("pipemend: could not record a log line", exc_info=True)


class _StepSpec:
    """What ``trace.step(...)`` returns: a context manager and a decorator."""

    def __init__(self, name: str | None, kind: str, doc_ids: list[Any] | None, inputs: dict[str, Any]):
        self.name = name
        self.kind = kind
        self.doc_ids = doc_ids
        self.inputs = inputs
        self._active: list[tuple[Step, contextvars.Token | None]] = []

    # ---- context manager
    def __enter__(self) -> Step:
        handle, token = _open(self.name or "step", self.kind, self.inputs, self.doc_ids)
        self._active.append((handle, token))
        return handle

    def __exit__(self, exc_type, exc, tb) -> bool:
        handle, token = self._active.pop()
        _close(handle, token, exc)
        return False  # never swallow the pipeline's exception

    # ---- decorator
    def __call__(self, fn: Callable) -> Callable:
        name = self.name or getattr(fn, "__name__", "step")
        kind, doc_ids, fixed = self.kind, self.doc_ids, self.inputs

        def one_call(args: tuple, kwargs: dict) -> _StepSpec:
            # A fresh spec per call, so concurrent calls never share a stack of handles.
            return _StepSpec(name, kind, doc_ids, _bound_inputs(fn, args, kwargs, fixed))

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args, **kwargs):
                if _example.get() is None:
                    return await fn(*args, **kwargs)
                with one_call(args, kwargs) as handle:
                    result = await fn(*args, **kwargs)
                    if not handle._output_set:
                        handle.output(result)
                return result

            return awrapper

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if _example.get() is None:
                return fn(*args, **kwargs)
            with one_call(args, kwargs) as handle:
                result = fn(*args, **kwargs)
                if not handle._output_set:
                    handle.output(result)
            return result

        return wrapper


def step(name: str | Callable | None = None, *, kind: str = "other", doc_ids: list[Any] | None = None, **inputs: Any):
    """A traced step: ``with trace.step("name", kind=..., **inputs) as s`` or ``@trace.step(kind=...)``.

    ``kind`` is one of retrieval, generation, parse, tool, other (anything
    else is recorded as "other" with a warning). ``doc_ids`` sets the step's
    document ids up front. Bare ``@trace.step`` works too.
    """
    if callable(name):  # bare @trace.step
        return _StepSpec(None, kind, doc_ids, inputs)(name)
    return _StepSpec(name, kind, doc_ids, inputs)


def _bound_inputs(fn: Callable, args: tuple, kwargs: dict, fixed: dict[str, Any]) -> dict[str, Any]:
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        params = list(inspect.signature(fn).parameters)
        if params and params[0] in ("self", "cls"):
            values.pop(params[0], None)
    except Exception:
        values = {"args": list(args), **kwargs}
    return {**fixed, **values}


def _open(name: str, kind: str, inputs: dict[str, Any], doc_ids: list[Any] | None, *, under: Step | None = None,
          source: str | None = None) -> tuple[Step, contextvars.Token | None]:
    """Open a step under the current step (or under ``under``, an open step's handle, and in its example) and make
    it the current one; ``source`` marks a step that a framework hook recorded (``frameworks.py``)."""
    parent = under._rec if under is not None else None
    ex = parent.example if parent is not None else _example.get()
    if ex is None:
        return Step(None), None
    try:
        if kind not in KINDS:
            log.warning("pipemend: unknown step kind %r for step %r; recorded as 'other' (valid: %s)", kind, name, ", ".join(KINDS))
            kind = "other"
        if parent is None:
            parent = _live_step()
        ids: list[str] | None
        if doc_ids is not None:
            ids = [str(i) for i in doc_ids]
        elif kind == "generation":
            ids = _doc_ids_from_inputs(inputs)
        else:
            ids = None
        safe_inputs = {str(k): _record_value(v, f"input {k!r} of step {name!r}") for k, v in inputs.items()}
        with ex.lock:
            if parent is not None:
                ex._flush_pending(parent)
            else:
                ex._flush_pending(None)
            data = {
                "id": ex._new_step_id(),
                "parent": parent.data["id"] if parent is not None else None,
                "name": str(name),
                "kind": kind,
                "inputs": safe_inputs,
                "output": None,
                "doc_ids": ids,
                "logs": [],
                "error": None,
                "start": time.time(),
                "end": None,
                "llm_calls": [],
            }
            if source is not None:
                data["source"] = source
            if ex.finished is None:
                ex.steps.append(data)
        rec = _StepRecord(ex, data, parent)
        return Step(rec), _step.set(rec)
    except Exception:
        log.warning("pipemend: could not open step %r; running it untraced", name, exc_info=True)
        return Step(None), None


def _close(handle: Step, token: contextvars.Token | None, exc: BaseException | None) -> None:
    rec = handle._rec
    if rec is None:
        return
    try:
        rec.example._flush_pending(rec)
        with rec.example.lock:
            if exc is not None:
                rec.data["error"] = _error_dict(exc)
            rec.data["end"] = time.time()
    except Exception:
        log.warning("pipemend: could not close step %r", rec.data.get("name"), exc_info=True)
    finally:
        if token is not None:
            try:
                _step.reset(token)
            except ValueError:  # closed in another context than it was opened in
                _step.set(rec.parent)


def open_step(name: str, kind: str = "other", inputs: dict[str, Any] | None = None, *, under: Step | None = None,
              source: str | None = None) -> tuple[Step, contextvars.Token | None]:
    """Open a step without a ``with`` block, for framework hooks whose start and end are two callbacks.

    The step nests under ``under`` (the handle of a step still open, in its example) or else under the current
    step of the current example, and becomes the current step (LLM calls and ``x-pipemend-step`` headers are
    then its). ``source`` is recorded as the step's ``"source"``. Outside an example the handle is a no-op.
    Close it with ``close_step(handle, token, ...)``."""
    return _open(name, kind, inputs or {}, None, under=under, source=source)


def close_step(handle: Step, token: contextvars.Token | None, *, error: BaseException | None = None) -> None:
    """Close a step opened by ``open_step`` (set its output first with ``handle.output``); ``error`` is recorded
    as the step's error. The current step goes back to the one before it (to its parent when closed in another
    context than it was opened in)."""
    _close(handle, token, error)


def note(message: str, *, under: Step | None = None, source: str = "pipemend") -> None:
    """A log line ``{"t", "source", "message"}`` on ``under`` (an open step's handle), else on the current step or
    the current example; nothing outside an example. Never raises."""
    try:
        rec = under._rec if under is not None else None
        ex = rec.example if rec is not None else _example.get()
        if ex is not None:
            ex._add_log(rec if rec is not None else _live_step(), {"t": time.time(), "source": source,
                                                                  "message": _cut(str(message))})
    except Exception:
        log.warning("pipemend: could not record a note", exc_info=True)


# --------------------------------------------------------------------------- capture of print and logging


class _StreamRouter(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr: inside an example, writes go to the current step's logs;
    otherwise they pass through to the original stream."""

    def __init__(self, source: str, passthrough: TextIO):
        self.source = source
        self.passthrough = passthrough

    def write(self, s: str) -> int:
        ex = _example.get()
        if ex is None or ex.finished is not None:
            return self.passthrough.write(s)
        try:
            ex._write(_live_step(), self.source, str(s))
        except Exception:
            return self.passthrough.write(s)
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self.passthrough.flush()
        except Exception:
            pass

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.passthrough.fileno()

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self.passthrough, "encoding", "utf-8")

    def __getattr__(self, name: str):
        return getattr(self.passthrough, name)


class _TraceLogHandler(logging.Handler):
    """Root handler: a record emitted inside a step (in that context) joins the step's logs."""

    def emit(self, record: logging.LogRecord) -> None:
        ex = _example.get()
        if ex is None:
            # Outside examples, behave like logging's last-resort handler when we are the only handler.
            if record.levelno >= logging.WARNING and logging.getLogger().handlers == [self]:
                try:
                    sys.stderr.write(record.getMessage() + "\n")
                except Exception:
                    pass
            return
        try:
            msg = record.getMessage()
            if record.exc_info and record.exc_info[0] is not None:
                msg += "\n" + "".join(traceback.format_exception(*record.exc_info))
            ex._add_log(_live_step(), {
                "t": record.created,
                "source": "logging",
                "level": record.levelname,
                "logger": record.name,
                "message": _cut(msg),
            })
        except Exception:
            pass  # never let logging of the pipeline fail because of us


_install_lock = threading.Lock()
_handler: _TraceLogHandler | None = None


def install_capture(stdout_passthrough: TextIO | None = None, stderr_passthrough: TextIO | None = None) -> None:
    """Route ``print`` and ``logging`` inside examples into their steps. Idempotent.

    Installed by ``start_example`` on first use (a pipeline run by hand never
    installs it). The runner calls it early with ``stdout_passthrough`` set to
    stderr, so nothing the pipeline prints outside an example reaches stdout.
    """
    global _handler
    with _install_lock:
        if not isinstance(sys.stdout, _StreamRouter):
            sys.stdout = _StreamRouter("stdout", stdout_passthrough or sys.stdout)
        if not isinstance(sys.stderr, _StreamRouter):
            sys.stderr = _StreamRouter("stderr", stderr_passthrough or sys.stderr)
        root = logging.getLogger()
        if _handler is None or _handler not in root.handlers:
            _handler = _TraceLogHandler(level=logging.DEBUG)
            root.addHandler(_handler)


def uninstall_capture() -> None:
    """Undo ``install_capture`` (for tests and embedding)."""
    global _handler
    with _install_lock:
        for name in ("stdout", "stderr"):
            s = getattr(sys, name)
            if isinstance(s, _StreamRouter):
                setattr(sys, name, s.passthrough)
        if _handler is not None:
            logging.getLogger().removeHandler(_handler)
            _handler = None


__all__ = [
    "CUT_MARK",
    "KINDS",
    "TRACE_FORMAT",
    "PROVIDER_KEY",
    "OLD_PROVIDER_KEY",
    "call_provider",
    "ExampleTrace",
    "Step",
    "current_example_id",
    "current_step_id",
    "current_step_name",
    "install_capture",
    "close_step",
    "jsonable",
    "note",
    "open_step",
    "record_llm_call",
    "start_example",
    "step",
    "uninstall_capture",
]
