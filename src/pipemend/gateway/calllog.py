"""The call log, ``RUN_DIR/gateway/calls.jsonl``: one append-only row per call.

Rows go through a writer thread that appends what has queued up with one
write and one fsync, so a reply never waits for the disk (an fsync costs
milliseconds here, more than a cache hit may take). ``flush()`` waits until
every queued row is on disk; ``close()`` flushes and stops the writer.
A kill -9 can lose the rows of the last few milliseconds, never a cached answer.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

from ..fsutil import append_jsonl_many

FORMAT = "pipemend-call-1"
log = logging.getLogger("pipemend.gateway")
_STOP = object()


class CallLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
                    append_jsonl_many(self.path, rows)
            except OSError:
                log.exception("cannot append %d rows to %s", len(rows), self.path)
            finally:
                for _ in items:
                    self._queue.task_done()
            if len(rows) != len(items):
                return

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
