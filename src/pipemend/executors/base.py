"""What every executor shares: shards, per-example retries, task deadlines, and a task's output checked as hostile.

A batch (``Executor.submit``) is the job's inputs rows cut into shards; each shard runs as one *task* (one
sandbox job over those rows). ``ShardedBatch`` keeps, per example, whether it has a result yet and how many
tasks it has been part of, so that:

- an example whose task came back without a row for it (the worker died, the runner crashed) goes into a new
  task, at most ``max_retries`` times; then it comes back with the crash as its error;
- an example with a row is never run again (retries are keyed by ``(candidate, example id)``);
- a task past its deadline is cancelled (``TaskRunner.cancel``: forcibly where the backend can) and its
  examples without a row come back timed out, like the runner's own timeouts (scored as errors).

A task's output (``TaskOutput``) is what the sandbox wrote, hostile whether it was read from a folder on this
machine or came over the wire from a Ray node: ``TaskOutput.checked`` keeps only rows and traces of the task's
own example ids, regular sizes under the ingest caps, and plain names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from ..protocols import ExampleResult, SandboxJob, SandboxOutcome
from ..sandbox.ingest import (EGRESS, RESULTS, RESULTS_CAP, RUNNER, RUNNER_CAP, TRACE_CAP, TRACES, open_dir,
                              read_regular, trace_name)

WALL_SLACK_S = 300.0
"""Added to a task's examples' time (``ceil(n / concurrency) * example_timeout_s``) for its default timeout."""
TAIL_CHARS = 4000


def task_timeout(n: int, concurrency: int, example_timeout_s: float) -> float:
    """The default timeout of a task of ``n`` examples: its examples' time at the job's concurrency, plus slack."""
    return -(-max(n, 1) // max(concurrency, 1)) * example_timeout_s + WALL_SLACK_S


@dataclass
class TaskOutput:
    """What one task brought back: the runner's rows and files, and how its sandbox ended."""

    outcome: SandboxOutcome
    rows: list[dict[str, Any]] = field(default_factory=list)
    traces: dict[str, bytes] = field(default_factory=dict)
    runner_json: bytes | None = None
    egress_json: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        """Plain data for a Ray object (no pipemend classes cross the wire)."""
        return {"outcome": dataclasses.asdict(self.outcome), "rows": self.rows, "traces": self.traces,
                "runner_json": self.runner_json, "egress_json": self.egress_json}

    @classmethod
    def checked(cls, raw: Any, ids: list[str], *, sandbox: str) -> TaskOutput:
        """A task's output from untrusted data (``to_wire``'s shape): rows and traces of ``ids`` only, each
        within the ingest caps; anything else is dropped and noted in the outcome's stderr tail."""
        notes: list[str] = []
        raw = raw if isinstance(raw, dict) else {}
        if not raw:
            notes.append("the task returned no output")
        outcome = _checked_outcome(raw.get("outcome"), sandbox)
        wanted = set(ids)
        rows: list[dict[str, Any]] = []
        raw_rows = raw.get("rows") if isinstance(raw.get("rows"), list) else []
        size = 0
        for row in raw_rows:
            if not (isinstance(row, dict) and isinstance(row.get("id"), str) and row["id"] in wanted):
                notes.append("a row of another id or shape")
                continue
            size += len(json.dumps(row, default=str))
            if size > RESULTS_CAP:
                notes.append(f"{RESULTS}: over the cap of {RESULTS_CAP} bytes")
                rows = []
                break
            rows.append(row)
        traces: dict[str, bytes] = {}
        raw_traces = raw.get("traces") if isinstance(raw.get("traces"), dict) else {}
        for ex_id, data in raw_traces.items():
            if ex_id not in wanted or trace_name(ex_id) is None:
                notes.append(f"{TRACES}/: a trace of another id")
            elif not isinstance(data, bytes) or len(data) > TRACE_CAP:
                notes.append(f"{TRACES}/{ex_id}.json: not bytes or over the cap of {TRACE_CAP}")
            else:
                traces[ex_id] = data
        small = {}
        for key, name in (("runner_json", RUNNER), ("egress_json", EGRESS)):
            data = raw.get(key)
            if data is not None and not (isinstance(data, bytes) and len(data) <= RUNNER_CAP):
                notes.append(f"{name}: not bytes or over the cap of {RUNNER_CAP}")
                data = None
            small[key] = data
        if notes:
            note = "[pipemend] refused from the task's output: " + "; ".join(dict.fromkeys(notes))
            outcome = dataclasses.replace(outcome, stderr_tail=(outcome.stderr_tail + "\n" + note).strip())
        return cls(outcome=outcome, rows=rows, traces=traces, **small)


def _checked_outcome(raw: Any, sandbox: str) -> SandboxOutcome:
    if not isinstance(raw, dict):
        return SandboxOutcome(sandbox=sandbox, returncode=None, error="the task returned no outcome")

    def text(key: str) -> str:
        v = raw.get(key)
        return v[-TAIL_CHARS:] if isinstance(v, str) else ""

    def num(key: str) -> float:
        v = raw.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else 0.0

    rc = raw.get("returncode")
    error = raw.get("error")
    return SandboxOutcome(
        sandbox=(raw.get("sandbox") if isinstance(raw.get("sandbox"), str) else sandbox)[:40],
        returncode=rc if isinstance(rc, int) and not isinstance(rc, bool) else None,
        timed_out=raw.get("timed_out") is True, error=error[:TAIL_CHARS] if isinstance(error, str) else None,
        stdout_tail=text("stdout_tail"), stderr_tail=text("stderr_tail"), startup_s=num("startup_s"),
        wall_s=num("wall_s"))


def read_task_output(out_dir: Path, ids: list[str], outcome: SandboxOutcome) -> TaskOutput:
    """What a sandbox job left in ``out_dir`` (already taken in by ``sandbox/ingest.py``), read again the same
    way (regular files, no link followed, capped) and as ``to_wire`` data, then ``TaskOutput.checked``."""
    raw: dict[str, Any] = {"outcome": dataclasses.asdict(outcome), "rows": [], "traces": {}}
    try:
        top = open_dir(out_dir)
    except OSError:
        return TaskOutput.checked(raw, ids, sandbox=outcome.sandbox)
    try:
        raw["rows"] = _rows(_read(top, RESULTS, RESULTS_CAP) or b"")
        raw["runner_json"] = _read(top, RUNNER, RUNNER_CAP)
        raw["egress_json"] = _read(top, EGRESS, RUNNER_CAP)
        try:
            traces_fd = open_dir(TRACES, dir_fd=top)
        except OSError:
            traces_fd = None
        if traces_fd is not None:
            try:
                for ex_id in dict.fromkeys(ids):
                    name = trace_name(ex_id)
                    data = _read(traces_fd, name, TRACE_CAP) if name else None
                    if data is not None:
                        raw["traces"][ex_id] = data
            finally:
                os.close(traces_fd)
    finally:
        os.close(top)
    return TaskOutput.checked(raw, ids, sandbox=outcome.sandbox)


def _read(dir_fd: int, name: str, cap: int) -> bytes | None:
    try:
        return read_regular(dir_fd, name, cap)
    except OSError:
        return None


def _rows(data: bytes) -> list[Any]:
    """The JSON lines of a ``results.jsonl`` (a torn or garbled line is skipped; the last row of an id wins later)."""
    rows = []
    for line in data.split(b"\n"):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (UnicodeDecodeError, ValueError):
                continue
    return rows


# --------------------------------------------------------------------------- tasks and the batch


@dataclass
class Task:
    """One shard of a batch, run as one sandbox job."""

    candidate: str
    index: int
    """Unique within the batch (retries get new indices)."""
    lines: list[str]
    """The shard's rows of the job's inputs file, as written (``{"id", "inputs"}``)."""
    ids: list[str]
    job: SandboxJob
    """The batch's job; a backend makes the shard's own from it (inputs, out_dir, wall clock)."""
    timeout_s: float
    """Seconds the task may run (``ExecutorBatch`` cancels it then)."""


class TaskRunner(Protocol):
    """How an executor runs tasks: ``start`` returns a handle; ``ready`` says which of them finished."""

    name: str
    host_grace_s: float
    """Seconds past a task's timeout before the host cancels it (the sandbox inside may end it first)."""

    def start(self, task: Task) -> Any: ...

    def ready(self, handles: list[Any], timeout: float) -> list[Any]:
        """The finished ones of ``handles`` (waiting up to ``timeout`` seconds for one), first finished first."""

    def output(self, handle: Any) -> TaskOutput: ...

    def cancel(self, handle: Any) -> None: ...

    def live(self, handle: Any) -> int:
        """Examples a running task has finished so far (0 where it cannot be seen)."""


@dataclass
class _Running:
    task: Task
    handle: Any
    deadline: float


def inputs_lines(inputs_file: Path) -> list[tuple[str, str]]:
    """``(id, line)`` for each row of a job's inputs file (the host wrote it: ``{"id", "inputs"}``)."""
    out = []
    for line in Path(inputs_file).read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append((str(json.loads(line)["id"]), line))
    return out


class ShardedBatch:
    """``ExecutorBatch`` over a ``TaskRunner``: shards, retries per example, deadlines, combined outcome."""

    def __init__(self, runner: TaskRunner, job: SandboxJob, *, candidate: str, shard_size: int | None,
                 max_retries: int, timeout_s: float | None, max_running: int | None = None):
        self.runner, self.job, self.candidate = runner, job, candidate
        self.max_retries, self.timeout_s = max(0, max_retries), timeout_s
        self.max_running = max_running
        rows = inputs_lines(job.inputs_file)
        self.total = len(rows)
        self._line = dict(rows)
        self._attempts: dict[tuple[str, str], int] = {}
        """``(candidate, example id)`` -> tasks it has been part of."""
        self._finished: set[str] = set()
        self._rows = 0
        """Examples that came back with a row."""
        self._queue: list[list[str]] = []
        size = shard_size or max(self.total, 1)
        ids = [i for i, _ in rows]
        for k in range(0, len(ids), size):
            self._queue.append(ids[k:k + size])
        self._running: list[_Running] = []
        self._next_index = 0
        self._outcomes: list[SandboxOutcome] = []
        self._extra: list[TaskOutput] = []
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._cancelled = False
        self._buffer: list[ExampleResult] = []
        """Results not yet handed out by ``wait``."""
        self._fill()

    # ----------------------------------------------------------------- what callers see

    @property
    def done(self) -> bool:
        return not self._running and not self._queue and not self._buffer

    def finished(self) -> int:
        live = 0
        for r in list(self._running):
            try:
                live += min(self.runner.live(r.handle), len(r.task.ids))
            except Exception:  # noqa: BLE001 - progress only
                pass
        return self._rows + live

    def results(self) -> Iterator[ExampleResult]:
        while not self.done:
            yield from self.wait(None)

    def outputs(self) -> list[TaskOutput]:
        """Each finished task's output (its ``runner.json`` and ``egress.json``), in completion order."""
        return list(self._extra)

    def wait(self, timeout: float | None = None) -> list[ExampleResult]:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.done:
                    return []
                got = self._step(end)
            if got or (end is not None and time.monotonic() >= end):
                return got

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            self._queue.clear()
            for r in self._running:
                self.runner.cancel(r.handle)
                self._outcomes.append(SandboxOutcome(sandbox=self.runner.name, returncode=None, timed_out=True,
                                                     error="cancelled"))
                self._buffer += self._timed_out(r.task, "cancelled")
            self._running.clear()

    def outcome(self) -> SandboxOutcome:
        outs = self._outcomes or [SandboxOutcome(sandbox=self.runner.name, returncode=0)]
        worst = next((o for o in outs if o.error or o.timed_out or o.returncode != 0), outs[0])
        many = len(outs) > 1
        return SandboxOutcome(
            sandbox=worst.sandbox, returncode=worst.returncode, timed_out=any(o.timed_out for o in outs),
            error="; ".join(dict.fromkeys(o.error for o in outs if o.error)) or None,
            stdout_tail=_joined([o.stdout_tail for o in outs], many), stderr_tail=_joined([o.stderr_tail for o in outs], many),
            startup_s=max(o.startup_s for o in outs), wall_s=time.monotonic() - self._t0 if many else outs[0].wall_s)

    # ----------------------------------------------------------------- the machinery

    def _fill(self) -> None:
        while self._queue and (self.max_running is None or len(self._running) < self.max_running):
            ids = self._queue.pop(0)
            for ex_id in ids:
                key = (self.candidate, ex_id)
                self._attempts[key] = self._attempts.get(key, 0) + 1
            timeout = self.timeout_s or task_timeout(len(ids), self.job.concurrency, self.job.example_timeout_s)
            task = Task(self.candidate, self._next_index, [self._line[i] for i in ids], ids, self.job, timeout)
            self._next_index += 1
            try:
                handle = self.runner.start(task)
            except Exception as e:  # noqa: BLE001 - a task that cannot start is a crashed task
                self._after(task, TaskOutput(SandboxOutcome(sandbox=self.runner.name, returncode=None,
                                                            error=f"task could not start: {type(e).__name__}: {e}")),
                            )
                continue
            self._running.append(_Running(task, handle, time.monotonic() + timeout + self.runner.host_grace_s))

    def _step(self, end: float | None) -> list[ExampleResult]:
        if self._running:
            self._poll(end)
        self._fill()
        out, self._buffer = self._buffer, []
        return out

    def _poll(self, end: float | None) -> None:
        now = time.monotonic()
        nearest = min(r.deadline for r in self._running)
        wait_s = max(0.0, min(nearest, end if end is not None else nearest) - now)
        by_handle = {id(r.handle): r for r in self._running}
        ready = [by_handle[id(h)] for h in self.runner.ready(list(r.handle for r in self._running), min(wait_s, 1.0))]
        for r in ready:  # in the order they finished
            self._running.remove(r)
            try:
                output = self.runner.output(r.handle)
            except Exception as e:  # noqa: BLE001 - a dead worker is a crashed task
                output = TaskOutput(SandboxOutcome(sandbox=self.runner.name, returncode=None,
                                                   error=f"task failed: {type(e).__name__}: {e}"))
            self._after(r.task, output)
        now = time.monotonic()
        for r in list(self._running):
            if now >= r.deadline:
                self._running.remove(r)
                self.runner.cancel(r.handle)
                self._outcomes.append(SandboxOutcome(sandbox=self.runner.name, returncode=None, timed_out=True,
                                                     error=f"task timed out after {r.task.timeout_s:g}s and was cancelled"))
                self._buffer += self._timed_out(r.task, f"task timeout after {r.task.timeout_s:g}s (cancelled)")

    def _after(self, task: Task, output: TaskOutput) -> None:
        """A finished task: its rows come back; its examples without one are retried, timed out or failed."""
        self._outcomes.append(output.outcome)
        self._extra.append(output)
        by_id = {row["id"]: row for row in output.rows}
        out = self._buffer
        lost = []
        for ex_id in task.ids:
            if ex_id in self._finished:
                continue
            row = by_id.get(ex_id)
            if row is not None:
                out.append(self._result(ex_id, row, output.traces.get(ex_id)))
            else:
                lost.append(ex_id)
        if not lost:
            return
        o = output.outcome
        if o.timed_out:
            for ex_id in lost:
                out.append(self._result(ex_id, _timeout_row(ex_id, f"task timeout after {task.timeout_s:g}s")))
            return
        retry = [i for i in lost if self._attempts[(self.candidate, i)] <= self.max_retries and not self._cancelled]
        for ex_id in lost:
            if ex_id not in retry:
                out.append(self._result(ex_id, None))
        if retry:
            self._queue.append(retry)

    def _timed_out(self, task: Task, why: str) -> list[ExampleResult]:
        return [self._result(i, _timeout_row(i, why)) for i in task.ids if i not in self._finished]

    def _result(self, ex_id: str, row: dict[str, Any] | None, trace: bytes | None = None) -> ExampleResult:
        self._finished.add(ex_id)
        self._rows += row is not None
        return ExampleResult(ex_id, row, trace, self._attempts.get((self.candidate, ex_id), 1))


class ShardedExecutor:
    """An ``Executor`` over a ``TaskRunner``: ``shard_size`` examples per task (None: the whole batch in one),
    at most ``max_running`` tasks at once (None: all), ``max_retries`` per example whose task died."""

    name = "?"

    def __init__(self, tasks: TaskRunner, *, shard_size: int | None, max_retries: int, max_running: int | None):
        self.tasks = tasks
        self.shard_size, self.max_retries, self.max_running = shard_size, max_retries, max_running
        self._batches: list[ShardedBatch] = []
        self._lock = threading.Lock()  # batches may be submitted from several threads (candidates in parallel)

    def submit(self, job: SandboxJob, *, candidate: str, timeout_s: float | None = None) -> ShardedBatch:
        batch = ShardedBatch(self.tasks, dataclasses.replace(job), candidate=candidate, shard_size=self.shard_size,
                             max_retries=self.max_retries, timeout_s=timeout_s, max_running=self.max_running)
        with self._lock:
            self._batches = [b for b in self._batches if not b.done] + [batch]
        return batch

    def close(self) -> None:
        with self._lock:
            batches, self._batches = self._batches, []
        for batch in batches:
            if not batch.done:
                batch.cancel()


def _timeout_row(ex_id: str, why: str) -> dict[str, Any]:
    return {"id": ex_id, "output": None, "error": why, "timed_out": True, "duration_s": None}


def _joined(tails: list[str], many: bool) -> str:
    if not many:
        return tails[0] if tails else ""
    text = "\n".join(f"[task {i}] {t.strip()}" for i, t in enumerate(tails) if t.strip())
    return text[-TAIL_CHARS:]
