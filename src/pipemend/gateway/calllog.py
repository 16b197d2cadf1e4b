"""The call log, ``RUN_DIR/gateway/calls.jsonl``: one append-only row per call.

Rows go through a writer thread that appends what has queued up with one
write and one fsync, so a reply never waits for the disk (an fsync costs
milliseconds here, more than a cache hit may take). ``flush()`` waits until
every queued row is on disk; ``close()`` flushes and stops the writer.
A kill -9 can lose the rows of the last few milliseconds, never a cached answer.

A crash in the middle of a write leaves a torn last line; ``repair_torn_tail``
(run when a ``CallLog`` opens, before the gateway reads its spend or appends)
drops that fragment, so the next row starts on a line of its own and every
reader (spend, stats, scoring joins, resume) sees whole rows only. A writer
fault on one row (it cannot be serialized) loses that row, never the writer.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

from ..fsutil import append_jsonl_many

FORMAT = "pipemend-call-1"
log = logging.getLogger("pipemend.gateway")
_STOP = object()
_BLOCK = 1 << 16


def repair_torn_tail(path: Path) -> int:
    """Make ``path`` end with a whole line: a last line without its newline is dropped, or, if it is a
    whole JSON object (the crash came just before the newline), completed. Returns the bytes dropped.
    A missing file is fine; a link is refused (OSError), like every file the host reads."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        end, cut = size, -1
        while end > 0 and cut < 0:  # find the last newline, reading backwards
            start = max(0, end - _BLOCK)
            block = os.pread(fd, end - start, start)
            at = block.rfind(b"\n")
            if at >= 0:
                cut = start + at + 1
            end = start
        cut = max(cut, 0)
        if cut == size:
            return 0
        fragment = os.pread(fd, size - cut, cut)
        try:
            whole = isinstance(json.loads(fragment), dict)
        except ValueError:
            whole = False
        if whole:
            os.pwrite(fd, b"\n", size)
            os.fsync(fd)
            return 0
        os.ftruncate(fd, cut)
        os.fsync(fd)
        log.warning("%s: dropped a torn last line (%d bytes) left by a crash mid-write", path, size - cut)
        return size - cut
    finally:
        os.close(fd)


class CallLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._write_loop, name="pipemend-calllog", daemon=True)
        self._thread.start()

    def append(self, row: dict[str, Any]) -> None:
        self._queue.put({"format": FORMAT, **row})

    def _write_loop(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [i for i in items if i is not _STOP]
            try:
                if rows:
                    self._append(rows)
            finally:
                for _ in items:
                    self._queue.task_done()
            if len(rows) != len(items):
                return

    def _append(self, rows: list[dict[str, Any]]) -> None:
        try:
            append_jsonl_many(self.path, rows)
            return
        except OSError:
            log.exception("cannot append %d rows to %s", len(rows), self.path)
            return
        except Exception:  # a row that cannot be serialized: write the others one by one
            pass
        for row in rows:
            try:
                append_jsonl_many(self.path, [row])
            except Exception as e:  # noqa: BLE001 - the writer must outlive any row
                log.error("call %s not logged: %s: %s", row.get("call_id"), type(e).__name__, e)

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
