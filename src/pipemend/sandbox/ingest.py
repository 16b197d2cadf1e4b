"""What a sandbox writes is hostile: a scratch folder outside the run directory, and a careful ingest.

Every sandbox run gets a fresh scratch folder (``Scratch``) in the system's temp
folder, named ``pipemend-scratch-<run id>-<owner>-<random>`` so that ``reap``
can find what a killed pipemend left behind. The sandbox writes only into
``scratch/out``; the run directory is never mounted or handed to a pipeline.
Afterwards ``ingest`` copies into ``job.out_dir`` only what the runner is
expected to write, by name:

- ``results.jsonl``;
- ``runner.json`` (the runner's start-up time, charged to the evaluation);
- ``egress.json`` (model calls and hosts the runner saw go around the gateway);
- ``traces/<id>.json`` for the job's own example ids (read from the host's
  inputs file, never from the sandbox).

Each one must be a regular file, opened relative to an already opened folder with
``O_NOFOLLOW`` at every step (so no symlink is followed anywhere: not the file,
not ``traces/``, not ``out/``), ``O_NONBLOCK`` (a FIFO cannot stall the host),
and no larger than its cap. Anything else is ignored and noted; an example
whose trace or result did not come through scores "no result" downstream.
The scratch folder is then removed (``shutil.rmtree`` does not follow links).

While the sandbox runs, ``LiveResults`` mirrors ``results.jsonl`` the same way
into ``job.out_dir`` every half second, so progress bars keep working.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..fsutil import atomic_write_bytes, read_regular_at
from ..protocols import SandboxJob, SandboxOutcome

SCRATCH_PREFIX = "pipemend-scratch-"
RESULTS = "results.jsonl"
RUNNER = "runner.json"
EGRESS = "egress.json"
RUNNER_CAP = 64 * 1024
"""Largest ``runner.json`` or ``egress.json`` taken in (bytes)."""
TRACES = "traces"
RESULTS_CAP = 64 * 1024 * 1024
"""Largest ``results.jsonl`` taken in (bytes); a larger one is refused whole."""
TRACE_CAP = 16 * 1024 * 1024
"""Largest single trace taken in (bytes)."""
_SAFE_RUN = re.compile(r"[^A-Za-z0-9_.]")


def safe_run_id(run_id: str | None) -> str:
    """A run id as it may appear in a folder name or a Docker label (``adhoc`` when there is none)."""
    text = _SAFE_RUN.sub("_", run_id or "adhoc")[:64]
    return text or "adhoc"


def run_id_of(out_dir: Path) -> str:
    """The run a job belongs to: the nearest folder above ``out_dir`` holding a ``run.json`` (else ``adhoc``).

    Jobs made by ``evaluate`` write into ``RUN_DIR/evals/<name>`` or
    ``RUN_DIR/candidates/<n>/evals/<name>``; a job built by hand elsewhere has no run.
    """
    run_dir = run_dir_of(out_dir)
    return safe_run_id(run_dir.name) if run_dir is not None else "adhoc"


def run_dir_of(out_dir: Path) -> Path | None:
    """The nearest folder above ``out_dir`` holding a ``run.json``, or None."""
    for parent in Path(out_dir).resolve().parents:
        if (parent / "run.json").is_file():
            return parent
    return None


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone: pid + this names one process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


PROCESS_RECORD = "process.json"
"""In a scratch folder: the sandbox's process group (the sandbox cannot write there), for ``reap``."""


def record_process(scratch: Scratch, pgid: int) -> None:
    """Note the sandbox's process group in its scratch folder (the sandbox cannot write there)."""
    (scratch.root / PROCESS_RECORD).write_text(json.dumps({"pgid": pgid, "start": process_start_time(pgid)}))


def owner_token(pid: int | None = None) -> str:
    """``<pid>.<start time>`` of this process (or ``pid``): who owns a scratch folder or a container."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{process_start_time(pid) or 0}"


def owner_alive(token: str) -> bool:
    """Whether the process a token names still runs (the same process, not a reused pid)."""
    pid, _, start = token.partition(".")
    if not pid.isdigit():
        return False
    return process_start_time(int(pid)) == start


@dataclass
class Scratch:
    """One sandbox run's scratch folder: ``root/out`` is all the sandbox may write."""

    root: Path
    run_id: str
    report: "IngestReport | None" = None

    @property
    def out(self) -> Path:
        return self.root / "out"

    @classmethod
    def create(cls, run_id: str, base: Path | None = None) -> "Scratch":
        """A fresh scratch folder in ``base`` (``$PIPEMEND_SCRATCH`` or the temp folder), outside any run directory."""
        base = Path(base or os.environ.get("PIPEMEND_SCRATCH") or tempfile.gettempdir())
        run = safe_run_id(run_id)
        root = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{run}-{owner_token()}-", dir=base))
        os.chmod(root, 0o711)  # the sandbox user may pass through to out/, not list it
        (root / "out").mkdir(mode=0o700)
        return cls(root, run)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class IngestReport:
    """What came in from a sandbox's scratch folder, and what was refused (``name: why``)."""

    results: bool = False
    traces: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def read_regular(dir_fd: int, name: str, cap: int) -> bytes:
    """The bytes of ``name`` inside the open folder ``dir_fd`` (``fsutil.read_regular_at``), a plain name only.

    Raises ``OSError`` (the reason in its text) for a bad name, a link, a FIFO, a device, a folder, a
    missing file or one over the cap.
    """
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise OSError(errno.EINVAL, f"not a plain file name: {name!r}")
    return read_regular_at(name, cap, dir_fd=dir_fd)


def open_dir(path: Path | str, *, dir_fd: int | None = None) -> int:
    """Open a folder without following a link (``O_NOFOLLOW | O_DIRECTORY``)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def expected_ids(inputs_file: Path) -> list[str]:
    """The example ids of a job, from the inputs file the host wrote (rows ``{"id", "inputs"}``)."""
    ids = []
    with open(inputs_file, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    ids.append(str(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    continue
    return ids


def trace_name(example_id: str) -> str | None:
    """``<id>.json`` when that is a plain file name, else None (such an example has no trace file)."""
    name = f"{example_id}.json"
    if "/" in example_id or "\0" in example_id or example_id in ("", ".", "..") or len(name.encode()) > 255:
        return None
    return name


def ingest(scratch_out: Path, out_dir: Path, ids: list[str], *, results_cap: int = RESULTS_CAP,
           trace_cap: int = TRACE_CAP) -> IngestReport:
    """Copy ``results.jsonl`` and ``traces/<id>.json`` (for ``ids`` only) from ``scratch_out`` into ``out_dir``.

    ``out_dir`` is the host's: whatever was there for these names is replaced,
    or removed when the sandbox produced nothing acceptable, so a stale result
    can never pass for a new one.
    """
    report = IngestReport()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        top = open_dir(scratch_out)
    except OSError as e:
        report.refused.append(f"out/: {e.strerror or e}")
        _drop_stale(out_dir, ids, keep_results=False, kept=set())
        return report
    try:
        try:
            atomic_write_bytes(out_dir / RESULTS, read_regular(top, RESULTS, results_cap))
            report.results = True
        except OSError as e:
            if e.errno != errno.ENOENT:
                report.refused.append(f"{RESULTS}: {e.strerror or e}")
        for name in (RUNNER, EGRESS):
            (out_dir / name).unlink(missing_ok=True)
            try:
                atomic_write_bytes(out_dir / name, read_regular(top, name, RUNNER_CAP))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    report.refused.append(f"{name}: {e.strerror or e}")
        traces_fd = None
        try:
            traces_fd = open_dir(TRACES, dir_fd=top)
        except OSError as e:
            if e.errno != errno.ENOENT:
                report.refused.append(f"{TRACES}/: {e.strerror or e}")
        if traces_fd is not None:
            try:
                for ex_id in dict.fromkeys(ids):
                    name = trace_name(ex_id)
                    if name is None:
                        continue
                    try:
                        data = read_regular(traces_fd, name, trace_cap)
                    except OSError as e:
                        if e.errno != errno.ENOENT:
                            report.refused.append(f"{TRACES}/{name}: {e.strerror or e}")
                        continue
                    atomic_write_bytes(out_dir / TRACES / name, data)
                    report.traces.append(ex_id)
            finally:
                os.close(traces_fd)
    finally:
        os.close(top)
    _drop_stale(out_dir, ids, keep_results=report.results, kept=set(report.traces))
    return report


def _drop_stale(out_dir: Path, ids: list[str], *, keep_results: bool, kept: set[str]) -> None:
    if not keep_results:
        (out_dir / RESULTS).unlink(missing_ok=True)
    for ex_id in ids:
        name = trace_name(ex_id)
        if name and ex_id not in kept:
            (out_dir / TRACES / name).unlink(missing_ok=True)


class LiveResults:
    """While a sandbox runs, mirror its ``results.jsonl`` into ``out_dir`` (same checks as ``ingest``) for progress."""

    def __init__(self, scratch_out: Path, out_dir: Path, every_s: float = 0.5, cap: int = RESULTS_CAP):
        self.src, self.dst, self.every_s, self.cap = Path(scratch_out), Path(out_dir), every_s, cap
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipemend-live-results", daemon=True)
        self._last = -1

    def __enter__(self) -> "LiveResults":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                top = open_dir(self.src)
            except OSError:
                continue
            try:
                data = read_regular(top, RESULTS, self.cap)
            except OSError:
                continue
            finally:
                os.close(top)
            if len(data) != self._last and not self._stop.is_set():
                self._last = len(data)
                atomic_write_bytes(self.dst / RESULTS, data[: data.rfind(b"\n") + 1])


@contextmanager
def sandbox_output(job: SandboxJob) -> Iterator[Scratch]:
    """A fresh scratch folder for one sandbox run; afterwards its expected files are ingested and it is removed.

    Every sandbox's ``run(job)`` goes through this, so ``job.out_dir`` (inside the
    run directory) is written by the host only. ``scratch.report`` holds what
    was ingested and refused once the block ends.
    """
    scratch = Scratch.create(run_id_of(job.out_dir))
    job.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with LiveResults(scratch.out, job.out_dir):
            yield scratch
    finally:
        try:
            scratch.report = ingest(scratch.out, job.out_dir, expected_ids(job.inputs_file))
        finally:
            scratch.remove()


def noted(outcome: SandboxOutcome, report: IngestReport | None) -> SandboxOutcome:
    """``outcome`` with what the host refused to take from the sandbox added to its stderr tail."""
    if report is None or not report.refused:
        return outcome
    note = "[pipemend] refused from the sandbox's output: " + "; ".join(report.refused[:20])
    return dataclasses.replace(outcome, stderr_tail=((outcome.stderr_tail or "") + "\n" + note).strip())
