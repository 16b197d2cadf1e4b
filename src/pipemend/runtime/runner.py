"""``python -m pipemend.runtime.runner``: runs a target pipeline over examples, inside the sandbox.

Part of ``pipemend.runtime``: it imports only the standard library and its
own package, so it runs on whatever Python the sandbox has (the image's, a
target's venv) from pipemend's folder mounted read-only.
``python -m pipemend.runner`` is the same command.

::

    python -m pipemend.runtime.runner --target DIR --entrypoint module:function \\
        --inputs INPUTS.jsonl --out OUT_DIR [--concurrency N] [--timeout SECONDS] \\
        [--gateway-url URL | --gateway-socket PATH] [--model M]

Reads rows ``{"id", "inputs"}`` (any other key is refused: the label seal),
calls ``function(inputs)`` once per example in its own thread and
``contextvars`` context, with bounded concurrency and a per-example timeout,
and writes ``OUT/results.jsonl`` (one row per example as it finishes) and
``OUT/traces/<id>.json``. An example that raises, hangs or returns something
that is not a string or JSON-able dict/list is recorded as that example's
error; the run goes on. Exit 0 when every example ran, 2 for bad usage or
input (unimportable entrypoint, bad inputs file), 3 when it stopped early
because the pipeline called a model around the gateway (``egress.py``: the
finding is in ``OUT/egress.json``, which also lists hosts it was refused). Progress goes to stderr as
``[runner] 3/10 done``; stdout stays quiet. Results are whole lines (one
``write`` each) and traces are replaced atomically, both without fsync: a lost
result only means the example is re-run or scored "no result".

Every httpx request of the process gets ``x-pipemend-example`` and
``x-pipemend-step`` headers from the trace context (values are
percent-encoded UTF-8 when not plain ASCII), and a gateway response's
``x-pipemend-*`` headers become an LLM call on the current step. Every
request also carries ``x-pipemend-eval`` (``$PIPEMEND_EVAL``, else a random
token) and ``x-pipemend-sample`` (``$PIPEMEND_SAMPLE``, the evaluation's sample
index: ``runtime/sampling.py``), and one made outside any example is tagged ``<startup>`` (while the
entrypoint imports) or ``<outside>``; the import's duration goes to
``OUT/runner.json``: the host charges both to the evaluation. When the pipeline has imported DSPy or
LangChain, their calls become steps through those libraries' callbacks (``frameworks.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import functools
import importlib
import inspect
import json
import logging
import os
import queue
import re
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO
from urllib.parse import quote

from . import egress, frameworks, trace
from .forwarder import Forwarder
from .sampling import SAMPLE_ENV, SAMPLE_HEADER, sample_index

ALLOWED_KEYS = frozenset({"id", "inputs"})
EXIT_UNROUTED = 3
"""The runner's exit code when it stopped because the pipeline calls a model around the gateway."""
GATEWAY_DUMMY_KEY = "pipemend-gateway"
_PROVIDER_PREFIXES = ("ANTHROPIC_", "OPENAI_")
_KEEP_ENV = ("ANTHROPIC_BASE_URL", "ANTHROPIC_LOG", "OPENAI_BASE_URL", "OPENAI_LOG")
"""The only inherited ``ANTHROPIC_*`` and ``OPENAI_*`` variables kept: every other one may carry a
credential or an identity (API keys, auth tokens, organization and project ids, custom headers) and
is removed."""
OPENAI_PATH = "/v1"
"""``OPENAI_BASE_URL`` is the gateway's URL and this: the OpenAI SDK appends ``/chat/completions``."""
_OTHER_SECRET_ENV = ("CLAUDE_CODE_OAUTH_TOKEN",)
_UNSAFE_ID = re.compile(r"[/\\\x00-\x1f]")


class RunnerUsageError(Exception):
    """Bad usage or input: the runner prints the message and exits 2."""


# --------------------------------------------------------------------------- inputs (the label seal)


@dataclass
class InputRow:
    id: str
    inputs: dict[str, Any]


def load_inputs(path: Path) -> list[InputRow]:
    """Read and check every row before anything runs. Rows must be exactly ``{"id", "inputs"}``."""
    if not path.is_file():
        raise RunnerUsageError(f"inputs file not found: {path}")
    rows: list[InputRow] = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunnerUsageError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise RunnerUsageError(f"{where}: expected a JSON object {{\"id\", \"inputs\"}}")
        extra = sorted(set(row) - ALLOWED_KEYS)
        if extra:
            raise RunnerUsageError(
                f"{where}: refused key(s) {', '.join(map(repr, extra))}: the runner takes only "
                f"\"id\" and \"inputs\" (labels such as expected/evidence must never reach the sandbox)"
            )
        ex_id, inputs = row.get("id"), row.get("inputs")
        if not isinstance(ex_id, str) or not ex_id or ex_id in (".", "..") or _UNSAFE_ID.search(ex_id):
            raise RunnerUsageError(f"{where}: \"id\" must be a non-empty string usable as a file name, got {ex_id!r}")
        if ex_id in seen:
            raise RunnerUsageError(f"{where}: duplicate id {ex_id!r}")
        if not isinstance(inputs, dict):
            raise RunnerUsageError(f"{where}: \"inputs\" must be a JSON object, got {type(inputs).__name__}")
        seen.add(ex_id)
        rows.append(InputRow(ex_id, inputs))
    return rows


# --------------------------------------------------------------------------- httpx / httpx2 hook

_hook_lock = threading.Lock()

# --- start-up accounting: work a pipeline does outside its examples counts against it (OUT/runner.json)
EVAL_HEADER = "x-pipemend-eval"
EVAL_ENV = "PIPEMEND_EVAL"
"""The evaluation's token, set by the host in the sandbox's environment (else the runner makes one):
sent on every request so the gateway can tie a call made outside any example to its evaluation."""
STARTUP_TAG = "<startup>"
"""``x-pipemend-example`` of a call made while the entrypoint module imports."""
OUTSIDE_TAG = "<outside>"
"""``x-pipemend-example`` of a call made after start-up outside any example (a background thread)."""
RUNNER_JSON = "runner.json"
RUNNER_FORMAT = "pipemend-runner-1"
_eval_token = os.environ.get(EVAL_ENV) or uuid.uuid4().hex
_sample = sample_index(os.environ.get(SAMPLE_ENV))
"""The evaluation's sample index (``$PIPEMEND_SAMPLE``; 0 when unset or not a small non-negative integer):
sent on every request, so the gateway draws this evaluation's samples for its sampled calls."""
_outside_tag = STARTUP_TAG


def end_startup(out: Path, startup_s: float, progress: TextIO) -> None:
    """Start-up is over: later calls outside examples are tagged ``<outside>``, and ``OUT/runner.json``
    ``{"format", "startup_s", "eval"}`` is replaced atomically (never through a link). A write that fails
    is reported, not fatal: the host then charges the start-up calls' own latency."""
    global _outside_tag
    _outside_tag = OUTSIDE_TAG
    write_json_file(out, RUNNER_JSON, {"format": RUNNER_FORMAT, "startup_s": round(startup_s, 6), "eval": _eval_token},
                    progress)


def write_json_file(out: Path, name: str, obj: dict[str, Any], progress: TextIO) -> None:
    """``OUT/<name>`` replaced atomically (a fresh temporary file, never through a link); a failure is reported."""
    tmp = out / f".{name}.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            _write_all(fd, json.dumps(obj).encode())
        finally:
            os.close(fd)
        os.replace(tmp, out / name)
    except OSError as e:
        progress.write(f"[runner] could not write {name}: {e}\n")


def header_value(value: str) -> str:
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")


def _tag(request: Any) -> None:
    watch = egress.current()
    if watch is not None:
        watch.note_request(str(request.url), trace.current_example_id(), request.headers.get("user-agent"))
    request.headers[EVAL_HEADER] = header_value(_eval_token)
    request.headers[SAMPLE_HEADER] = str(_sample)
    ex_id = trace.current_example_id()
    if ex_id is None:  # import-time or background work: charged to the evaluation, not to an example
        request.headers["x-pipemend-example"] = _outside_tag
        return
    request.headers["x-pipemend-example"] = header_value(ex_id)
    name = trace.current_step_name()
    if name is not None:
        request.headers["x-pipemend-step"] = header_value(name)
        request.headers["x-pipemend-step-id"] = trace.current_step_id() or ""


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _request_model(request: Any) -> str | None:
    try:
        body = json.loads(request.content)  # raises for a streamed request body: then no model
        model = body.get("model") if isinstance(body, dict) else None
        return model if isinstance(model, str) else None
    except Exception:
        return None


def _is_openai(request: Any) -> bool:
    """Whether a request went to the gateway's OpenAI Chat Completions route."""
    try:
        return str(request.url.path).rstrip("/").endswith("/chat/completions")
    except Exception:
        return False


def _record(request: Any, response: Any, duration_s: float) -> None:
    h = response.headers
    call_id = h.get("x-pipemend-call-id")
    if call_id is None or trace.current_example_id() is None:
        return
    call: dict[str, Any] = {"call_id": call_id, "model": _request_model(request)}
    if _is_openai(request):
        call[trace.PROVIDER_KEY] = "openai"  # the trace's default is anthropic
    call["input_tokens"] = _int(h.get("x-pipemend-input-tokens"))
    call["output_tokens"] = _int(h.get("x-pipemend-output-tokens"))
    cache = h.get("x-pipemend-cache")
    if cache is not None:
        call["cache"] = cache
    call["http.response.status_code"] = response.status_code
    call["duration_s"] = round(duration_s, 6)
    trace.record_llm_call(call)


HTTP_CLIENT_MODULES = ("httpx", "httpx2")
"""Patched when importable: ``openai`` and older ``anthropic`` SDKs use httpx, anthropic 2.x uses httpx2."""


def _patch(mod: Any) -> None:
    sync_send = mod.Client.send
    async_send = mod.AsyncClient.send

    def send(self, request, *args, **kwargs):
        try:
            _tag(request)
        except Exception:
            trace.log.warning("pipemend: could not tag an HTTP request", exc_info=True)
        t0 = time.monotonic()
        response = sync_send(self, request, *args, **kwargs)
        try:
            _record(request, response, time.monotonic() - t0)
        except Exception:
            trace.log.warning("pipemend: could not record an LLM call", exc_info=True)
        return response

    async def asend(self, request, *args, **kwargs):
        try:
            _tag(request)
        except Exception:
            trace.log.warning("pipemend: could not tag an HTTP request", exc_info=True)
        t0 = time.monotonic()
        response = await async_send(self, request, *args, **kwargs)
        try:
            _record(request, response, time.monotonic() - t0)
        except Exception:
            trace.log.warning("pipemend: could not record an LLM call", exc_info=True)
        return response

    for wrapper, original in ((send, sync_send), (asend, async_send)):
        functools.update_wrapper(wrapper, original)
        wrapper._pipemend_original = original  # type: ignore[attr-defined]
    mod.Client.send = send
    mod.AsyncClient.send = asend


def install_httpx_hook() -> list[str]:
    """Patch ``Client.send`` and ``AsyncClient.send`` of httpx and httpx2, once each.

    Headers are added before a request goes out and the response's headers
    read after; the body is never touched, so streaming responses stream.
    Returns the names of the patched modules.
    """
    patched = []
    with _hook_lock:
        for name in HTTP_CLIENT_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            if not hasattr(mod.Client.send, "_pipemend_original"):
                _patch(mod)
            patched.append(name)
    return patched


def uninstall_httpx_hook() -> None:
    """Undo ``install_httpx_hook`` (for tests and embedding)."""
    with _hook_lock:
        for name in HTTP_CLIENT_MODULES:
            mod = sys.modules.get(name)
            if mod is None:
                continue
            for cls in (mod.Client, mod.AsyncClient):
                original = getattr(cls.send, "_pipemend_original", None)
                if original is not None:
                    cls.send = original


# --------------------------------------------------------------------------- environment and entrypoint


def prepare_environment(gateway_url: str | None, model: str | None) -> None:
    """Drop real credentials, then point the pipeline at the gateway with a dummy key, under both APIs:
    ``ANTHROPIC_BASE_URL`` (and LiteLLM's ``ANTHROPIC_API_BASE``) is the gateway's URL,
    ``OPENAI_BASE_URL`` (and the older ``OPENAI_API_BASE``) that URL plus ``/v1``, and
    ``ANTHROPIC_API_KEY`` and ``OPENAI_API_KEY`` the dummy key. ``$PIPEMEND_SAMPLE`` is rewritten as
    the index the runner sends, so a pipeline that seeds its own randomness with it agrees with the gateway."""
    for name in list(os.environ):
        if (name.startswith(_PROVIDER_PREFIXES) and name not in _KEEP_ENV) or name in _OTHER_SECRET_ENV:
            del os.environ[name]
    os.environ["ANTHROPIC_API_KEY"] = GATEWAY_DUMMY_KEY
    os.environ["OPENAI_API_KEY"] = GATEWAY_DUMMY_KEY
    os.environ[SAMPLE_ENV] = str(_sample)
    if gateway_url:
        base = gateway_url.rstrip("/")
        os.environ["ANTHROPIC_BASE_URL"] = os.environ["ANTHROPIC_API_BASE"] = base
        os.environ["OPENAI_BASE_URL"] = os.environ["OPENAI_API_BASE"] = base + OPENAI_PATH
    if model:
        os.environ["PIPEMEND_MODEL"] = model


def load_entrypoint(target: Path, spec: str) -> Callable[[dict[str, Any]], Any]:
    """Import ``module:function`` with ``target`` first on sys.path (and as cwd)."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise RunnerUsageError(f"--entrypoint {spec!r}: expected module:function")
    os.chdir(target)
    sys.path.insert(0, str(target))
    try:
        module = importlib.import_module(module_name)
    except BaseException as e:  # SyntaxError, SystemExit from a bad import...
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        raise RunnerUsageError(
            f"cannot import entrypoint module {module_name!r} from {target}: {type(e).__name__}: {e}\n{tb}"
        ) from None
    fn = getattr(module, func_name, None)
    if fn is None:
        raise RunnerUsageError(f"entrypoint {spec!r}: module {module_name!r} has no attribute {func_name!r}")
    if not callable(fn):
        raise RunnerUsageError(f"entrypoint {spec!r}: {func_name!r} is not callable")
    return fn


# --------------------------------------------------------------------------- running examples


def check_output(value: Any) -> str | None:
    """None when ``value`` is a valid pipeline output, else why not."""
    if isinstance(value, str):
        return None
    if isinstance(value, (dict, list)):
        try:
            json.dumps(value, allow_nan=False)
            return None
        except (TypeError, ValueError) as e:
            return f"output is not JSON-able: {e}"
    return f"output must be a string or a JSON-able dict/list, got {type(value).__name__}"


@dataclass
class _Running:
    row: InputRow
    thread: threading.Thread
    started: float
    holder: dict[str, Any] = field(default_factory=dict)  # "trace": the ExampleTrace once started


def _call(fn: Callable, inputs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return asyncio.run(fn(inputs))
    result = fn(inputs)
    if inspect.isawaitable(result):
        async def _await():
            return await result
        return asyncio.run(_await())
    return result


def _run_one(fn: Callable, row: InputRow, holder: dict[str, Any], done: queue.Queue) -> None:
    """Runs in the example's thread, inside its own copied context."""
    ex = trace.start_example(row.id)
    holder["trace"] = ex
    frameworks.install()  # a framework the pipeline imported lazily is hooked from this example on
    t0 = time.monotonic()
    output, error = None, None
    try:
        output = _call(fn, row.inputs)
    except BaseException as e:  # noqa: BLE001 - one example failing is data
        error = e
    done.put((row.id, output, error, time.monotonic() - t0))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_trace(path: Path, trace_dict: dict) -> None:
    """Write a trace atomically: a reader sees the whole old file or the whole new one, never a torn one.

    Not fsynced, on purpose: the runner's outputs need no power-loss durability
    (an example whose trace or result is lost is re-run or scored "no result"),
    and an fsync per example was most of the runner's per-example cost.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    data = (json.dumps(trace_dict, indent=2, default=str) + "\n").encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ResultsLog:
    """``results.jsonl``, truncated when opened: each row appended as one whole line in one ``write``, no fsync."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)

    def append(self, row: dict[str, Any]) -> None:
        _write_all(self.fd, (json.dumps(row, default=str, separators=(",", ":")) + "\n").encode("utf-8"))

    def close(self) -> None:
        os.close(self.fd)


class Runner:
    """Runs rows through ``fn``; writes results and traces under ``out``."""

    def __init__(self, fn: Callable, out: Path, concurrency: int, timeout_s: float, progress: TextIO):
        self.fn = fn
        self.out = out
        self.concurrency = max(1, concurrency)
        self.timeout_s = timeout_s
        self.progress = progress
        self.results_path = out / "results.jsonl"
        self.n_done = self.n_errors = self.n_timeouts = self.total = 0
        self.stopped_unrouted = False
        """The egress watch saw a model call that bypasses the gateway: the run stopped after that example."""

    def run(self, rows: list[InputRow]) -> None:
        (self.out / "traces").mkdir(parents=True, exist_ok=True)
        self.results = ResultsLog(self.results_path)  # this run's results only
        try:
            self._run(rows)
        finally:
            self.results.close()

    def _run(self, rows: list[InputRow]) -> None:
        self._say(f"{len(rows)} examples, concurrency {self.concurrency}, timeout {self.timeout_s:g}s")
        done: queue.Queue = queue.Queue()
        pending = list(reversed(rows))
        running: dict[str, _Running] = {}
        total = self.total = len(rows)
        watch = egress.current()
        while pending or running:
            if watch is not None and watch.found_unrouted and not self.stopped_unrouted:
                self.stopped_unrouted = True  # no point running the rest: every example would fail the same way
                self._say(f"stopping: {egress.describe(watch.to_json())}")
                pending.clear()
                if not running:
                    break
            while pending and len(running) < self.concurrency:
                row = pending.pop()
                holder: dict[str, Any] = {}
                ctx = contextvars.copy_context()
                th = threading.Thread(
                    target=ctx.run, args=(_run_one, self.fn, row, holder, done),
                    name=f"pipemend-example-{row.id}", daemon=True,
                )
                running[row.id] = _Running(row, th, time.monotonic(), holder)
                th.start()
            next_deadline = min(r.started for r in running.values()) + self.timeout_s
            try:
                ex_id, output, error, duration = done.get(timeout=max(0.0, next_deadline - time.monotonic()))
            except queue.Empty:
                pass
            else:
                r = running.pop(ex_id, None)
                if r is not None:  # else: it finished after its timeout was recorded
                    self._finish(r, output, error, duration)
            now = time.monotonic()
            for ex_id in [i for i, r in running.items() if now - r.started >= self.timeout_s]:
                self._time_out(running.pop(ex_id), now)
        self._say(f"finished: {self.n_done}/{total} ran, {self.n_errors} errors, {self.n_timeouts} timed out")
        if watch is not None and (watch.unrouted or watch.blocked or watch.sdks):
            write_json_file(self.out, egress.EGRESS_JSON, watch.to_json(), self.progress)

    def _finish(self, r: _Running, output: Any, error: BaseException | None, duration: float) -> None:
        ex: trace.ExampleTrace = r.holder.get("trace") or trace.ExampleTrace(r.row.id)
        if error is not None:
            self._write(r.row.id, None, f"{type(error).__name__}: {error}", False, duration, ex.finish(error=error))
            return
        problem = check_output(output)
        if problem is None:
            self._write(r.row.id, output, None, False, duration, ex.finish(output=output))
            return
        err = {"type": "InvalidOutput", "message": problem, "traceback": None}
        self._write(r.row.id, None, problem, False, duration, ex.finish(output=output, error=err))

    def _time_out(self, r: _Running, now: float) -> None:
        ex: trace.ExampleTrace = r.holder.get("trace") or trace.ExampleTrace(r.row.id)
        message = f"timeout after {self.timeout_s:g}s"
        frame = sys._current_frames().get(r.thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else None
        err = {"type": "Timeout", "message": message, "traceback": stack}
        self._write(r.row.id, None, message, True, now - r.started, ex.finish(error=err))

    def _write(self, ex_id: str, output: Any, error: str | None, timed_out: bool, duration: float, trace_dict: dict) -> None:
        try:
            write_trace(self.out / "traces" / f"{ex_id}.json", trace_dict)
        except Exception as e:  # a trace that cannot be written must not lose the result
            self._say(f"could not write the trace of {ex_id!r}: {type(e).__name__}: {e}")
        self.results.append({
            "id": ex_id, "output": output, "error": error, "timed_out": timed_out, "duration_s": round(duration, 6),
        })
        self.n_done += 1
        self.n_errors += error is not None
        self.n_timeouts += timed_out
        self._say(f"{self.n_done}/{self.total} done" + (f" ({ex_id}: {error.splitlines()[0]})" if error else ""))

    def _say(self, msg: str) -> None:
        try:
            self.progress.write(f"[runner] {msg}\n")
            self.progress.flush()
        except Exception:
            pass


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit 2 through the runner's own message path
        raise RunnerUsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipemend.runtime.runner", description="Run a target pipeline over examples.")
    p.add_argument("--target", required=True, type=Path, help="the target pipeline's folder (put on sys.path, made cwd)")
    p.add_argument("--entrypoint", required=True, help="module:function, called with each example's inputs dict")
    p.add_argument("--inputs", required=True, type=Path, help='JSONL rows {"id", "inputs"} only')
    p.add_argument("--out", required=True, type=Path, help="writes results.jsonl and traces/<id>.json here")
    p.add_argument("--concurrency", type=int, default=4, help="examples run at once (threads)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per example before it is recorded timed out")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gateway-url", help="the gateway's http URL (becomes ANTHROPIC_BASE_URL; OPENAI_BASE_URL is it + /v1)")
    g.add_argument("--gateway-socket", help="the gateway's unix socket; a local TCP forwarder is started for it")
    p.add_argument("--model", help="value of PIPEMEND_MODEL for the pipeline")
    return p


def main(argv: list[str] | None = None) -> int:
    progress = sys.stderr
    try:
        args = _parser().parse_args(argv)
        if args.concurrency < 1:
            raise RunnerUsageError(f"--concurrency must be >= 1, got {args.concurrency}")
        if not args.timeout > 0:
            raise RunnerUsageError(f"--timeout must be > 0, got {args.timeout}")
        target = args.target.resolve()
        if not target.is_dir():
            raise RunnerUsageError(f"--target {args.target}: not a folder")
        out = args.out.resolve()
        rows = load_inputs(args.inputs.resolve())  # the label seal: checked before anything is imported or run

        gateway_url = args.gateway_url
        if args.gateway_socket:
            if not Path(args.gateway_socket).exists():
                raise RunnerUsageError(f"--gateway-socket {args.gateway_socket}: no such socket")
            gateway_url = Forwarder(args.gateway_socket).start().url
            progress.write(f"[runner] forwarding {gateway_url} -> unix:{args.gateway_socket}\n")
        prepare_environment(gateway_url, args.model)
        egress.install(egress.EgressWatch(gateway_url), trace.current_example_id)

        # stdout stays quiet: prints outside examples pass through to stderr, inside they join the trace.
        trace.install_capture(stdout_passthrough=progress, stderr_passthrough=progress)
        root = logging.getLogger()
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)  # so a pipeline's info logs reach its steps
        install_httpx_hook()
        t_import = time.monotonic()
        fn = load_entrypoint(target, args.entrypoint)
        end_startup(out, time.monotonic() - t_import, progress)
        hooked = frameworks.install()  # DSPy / LangChain calls become steps when the pipeline imported them
        if hooked:
            progress.write(f"[runner] framework hooks: {', '.join(hooked)}\n")
    except RunnerUsageError as e:
        progress.write(f"[runner] error: {e}\n")
        progress.flush()
        return 2

    runner = Runner(fn, out, args.concurrency, args.timeout, progress)
    runner.run(rows)
    return EXIT_UNROUTED if runner.stopped_unrouted else 0


def cli() -> None:
    """Run ``main()`` as a process: flush every stream, then exit at once with its code.

    ``os._exit``: abandoned (timed-out) example threads must not keep the process alive.
    """
    real_stderr = sys.stderr
    code = main()
    for stream in (sys.stdout, sys.stderr, real_stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


if __name__ == "__main__":
    cli()
