"""The default executor: tasks are threads on this machine, each running ``sandbox.run`` on its shard.

With one shard per batch (the default) a batch is exactly the one sandbox job ``evaluate`` always ran: the
same sandbox, worktree, hidden paths and wall clock (the task's timeout). Each task writes into a folder of its
own, ``<out_dir>/tasks/<n>/`` (its ``inputs.jsonl``; the sandbox takes its output in there through
``sandbox/ingest.py``); what came back is read from there as hostile data (``read_task_output``) and the
folder is removed.

A thread cannot be killed, so the timeout is the sandbox's own wall clock (it kills the runner's process group
or container); the host stops waiting for a task ``host_grace_s`` after that, and ``cancel`` stops waiting at
once: the sandbox still ends the job at its wall clock.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import atomic_write_text
from ..protocols import Sandbox, SandboxJob, SandboxOutcome
from .base import ShardedExecutor, Task, TaskOutput, read_task_output

TASKS_DIR = "tasks"
POLL_S = 0.05


def count_lines(path: Path) -> int:
    """Complete lines of a file (0 when it is missing)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


@dataclass
class _Thread:
    task: Task
    out_dir: Path
    thread: threading.Thread | None = None
    box: dict[str, SandboxOutcome] = field(default_factory=dict)
    finished_at: int = 0
    """The task's place in the order tasks finished (``LocalTasks.ready`` sorts by it)."""


def run_never_raising(sandbox: Sandbox, job: SandboxJob) -> SandboxOutcome:
    """``sandbox.run(job)``; a sandbox that raises is an outcome with the error (a dead sandbox is data)."""
    try:
        return sandbox.run(job)
    except BaseException as e:  # noqa: BLE001 - a dead sandbox is data, not a dead run
        return SandboxOutcome(sandbox=getattr(sandbox, "name", "?"), returncode=None,
                              error=f"sandbox raised {type(e).__name__}: {e}")


class LocalTasks:
    """``TaskRunner`` of threads running one sandbox job each."""

    host_grace_s = 60.0

    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox
        self.name = getattr(sandbox, "name", "?")
        self._lock = threading.Lock()
        self._finish_order = itertools.count(1)

    def start(self, task: Task) -> _Thread:
        out_dir = task.job.out_dir / TASKS_DIR / str(task.index)
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        inputs = out_dir / "inputs.jsonl"
        atomic_write_text(inputs, "".join(line + "\n" for line in task.lines))
        job = dataclasses.replace(task.job, inputs_file=inputs, out_dir=out_dir, wall_timeout_s=task.timeout_s)
        h = _Thread(task, out_dir)

        def run() -> None:
            outcome = run_never_raising(self.sandbox, job)
            with self._lock:
                h.finished_at = next(self._finish_order)
                h.box["outcome"] = outcome

        h.thread = threading.Thread(target=run, name=f"pipemend-task-{task.index}", daemon=True)
        h.thread.start()
        return h

    def ready(self, handles: list[_Thread], timeout: float) -> list[_Thread]:
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                done = sorted((h for h in handles if "outcome" in h.box), key=lambda h: h.finished_at)
            if done or time.monotonic() >= end:
                return done
            time.sleep(min(POLL_S, max(0.0, end - time.monotonic())))

    def output(self, handle: _Thread) -> TaskOutput:
        try:
            return read_task_output(handle.out_dir, handle.task.ids, handle.box["outcome"])
        finally:
            shutil.rmtree(handle.out_dir, ignore_errors=True)

    def cancel(self, handle: _Thread) -> None:
        """Stop waiting: the sandbox's wall clock ends the job; its folder goes when it does."""
        def remove_after() -> None:
            if handle.thread is not None:
                handle.thread.join()
            shutil.rmtree(handle.out_dir, ignore_errors=True)

        threading.Thread(target=remove_after, name="pipemend-task-cleanup", daemon=True).start()

    def live(self, handle: _Thread) -> int:
        return count_lines(handle.out_dir / "results.jsonl")


class LocalExecutor(ShardedExecutor):
    """``Executor`` on this machine (``ShardedExecutor``); by default one task per batch and no retries: exactly
    the one sandbox job ``evaluate`` always ran (a pipeline that crashes its runner would crash it again)."""

    name = "local"

    def __init__(self, sandbox: Sandbox, *, shard_size: int | None = None, max_retries: int = 0,
                 max_running: int | None = None):
        super().__init__(LocalTasks(sandbox), shard_size=shard_size, max_retries=max_retries, max_running=max_running)
