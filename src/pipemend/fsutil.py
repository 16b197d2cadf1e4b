"""Atomic writes and append-only JSONL journals.

Every state file pipemend writes goes through ``atomic_write_*``: written to a
temporary file in the same folder, fsynced, then moved into place with
``os.replace`` so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator

_append_lock = threading.Lock()
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
"""Mode of files written atomically: what ``open()`` would give (mkstemp alone gives 0600)."""


@contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file in the same folder, fsynced, then moved into place.

    If the block raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one record as one line; written with a single write call and fsynced."""
    append_jsonl_many(path, [record])


def append_jsonl_many(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    """Append records as lines with one write call and one fsync (a crash leaves at most a torn last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((json.dumps(r, default=str, separators=(",", ":")) + "\n").encode("utf-8") for r in records)
    with _append_lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def read_jsonl(path: str | os.PathLike[str], *, tolerate_torn_tail: bool = True) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL file.

    A last line cut short by a crash is skipped when ``tolerate_torn_tail``;
    any other bad line raises ``ValueError`` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            is_last = all(not rest.strip() for rest in lines[i:])
            if tolerate_torn_tail and is_last:
                return
            raise ValueError(f"{path}: line {i}: not valid JSON ({e.msg})") from e
