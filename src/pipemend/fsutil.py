"""Atomic writes and append-only JSONL journals.

Every state file pipemend writes goes through ``atomic_write_*``: written to a
temporary file in the same folder, fsynced, then moved into place with
``os.replace`` so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
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


MAX_REGULAR_BYTES = 16 * 1024 * 1024


def open_regular(name: str | os.PathLike[str], *, dir_fd: int | None = None) -> int:
    """A read-only descriptor on ``name``, which must be a regular file: its last component is opened without
    following a link (``O_NOFOLLOW``) or blocking (a FIFO answers at once), and checked on the descriptor.
    Raises ``OSError`` otherwise (``EINVAL`` for a FIFO, device or folder). The caller closes it."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def read_regular_at(name: str | os.PathLike[str], cap: int, *, dir_fd: int | None = None) -> bytes:
    """The bytes of ``name`` (inside the open folder ``dir_fd`` when given): a regular file, at most ``cap``.

    For files a sandbox may have written. The last component is opened without following a link
    (``O_NOFOLLOW``) and without blocking (a FIFO answers at once), and checked to be regular on the open
    descriptor, so a swap between the check and the read changes nothing. Raises ``OSError`` (the reason
    in its text) for a link, a FIFO, a device, a folder, a missing file or one over the cap.
    """
    fd = open_regular(name, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if st.st_size > cap:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes, over the cap of {cap}")
        chunks, left = [], cap + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > cap:
            raise OSError(errno.EFBIG, f"grew over the cap of {cap} bytes")
        return data
    finally:
        os.close(fd)


def read_regular(path: str | os.PathLike[str], *, max_bytes: int = MAX_REGULAR_BYTES) -> bytes | None:
    """``read_regular_at(path)``, or None where it refuses (missing, a link, not regular, too big)."""
    try:
        return read_regular_at(path, max_bytes)
    except OSError:
        return None


def read_json_object(path: str | os.PathLike[str], *, max_bytes: int = MAX_REGULAR_BYTES) -> dict[str, Any] | None:
    """A JSON object a sandbox wrote, read as ``read_regular`` does; None for anything else."""
    data = read_regular(path, max_bytes=max_bytes)
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def copy_regular(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                 max_bytes: int = MAX_REGULAR_BYTES) -> bool:
    """Copy ``src`` to ``dst`` (atomically) only if it is a regular file within ``max_bytes``; False if not."""
    data = read_regular(src, max_bytes=max_bytes)
    if data is None:
        return False
    atomic_write_bytes(dst, data)
    return True


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one record as one line; written with a single write call and fsynced."""
    append_jsonl_many(path, [record])


def append_jsonl_many(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    """Append records as lines with one write call and one fsync (a crash leaves at most a torn last line).

    A torn last line left by an earlier crash is mended first (``repair_jsonl_tail``),
    so the new records start on a line of their own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((json.dumps(r, default=str, separators=(",", ":")) + "\n").encode("utf-8") for r in records)
    with _append_lock:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _mend_tail(fd)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _mend_tail(fd: int) -> str | None:
    """End the file behind ``fd`` (opened read-write, append) on a newline; what was done, or None.

    A last line without its newline is either a whole record cut just before
    the newline (the newline is added) or a torn one (it is cut off).
    """
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return None
    start, pos = 0, size
    while pos > 0:
        lo = max(0, pos - 65536)
        nl = os.pread(fd, pos - lo, lo).rfind(b"\n")
        if nl != -1:
            start = lo + nl + 1
            break
        pos = lo
    if _is_record(os.pread(fd, size - start, start)):
        os.write(fd, b"\n")
        return "completed"
    os.ftruncate(fd, start)
    return f"dropped a torn last line ({size - start} bytes)"


def repair_jsonl_tail(path: str | os.PathLike[str]) -> str | None:
    """Make a JSONL file that a crash cut mid-write end on a whole line (fsynced); what was done, or None."""
    path = Path(path)
    if not path.is_file():
        return None
    with _append_lock:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            done = _mend_tail(fd)
            if done:
                os.fsync(fd)
            return done
        finally:
            os.close(fd)


def read_jsonl(path: str | os.PathLike[str], *, tolerate_torn_tail: bool = True) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL file.

    A last line cut short by a crash (not JSON, or not UTF-8) is skipped when
    ``tolerate_torn_tail``; any other bad line raises ``ValueError`` naming the
    file and line.
    """
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            is_last = all(not rest.strip() for rest in lines[i:])
            if tolerate_torn_tail and is_last:
                return
            why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise ValueError(f"{path}: line {i}: not valid JSON ({why})") from e
