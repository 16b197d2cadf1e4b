"""The guarded tools a proposer works through: the only way it reads or writes the candidate.

Paths are relative to the target folder inside the candidate worktree. A path is
refused (``PathRefused``; the agent gets the message as a tool error) when it is
absolute, has a ``..`` part, resolves outside the target folder, is or passes
through a symlink, lies under ``.git`` or a ``.pipemend*`` folder, or, for
writes, matches a protected glob or no editable glob.

Protected files are never written, and never read either (the manifest
``pipemend.yaml`` excepted): the dataset file holds every split, so reading it
would leak val and test labels. Train examples reach a proposer one by one
through ``ProposalContext.train_examples``.

Calls into the rest of pipemend (``run_train``, ``read_trace``, ``diagnose``,
``diff``) run in a daemon thread with a deadline of ``tool_timeout_s``; past it
the tool raises ``ToolTimeout`` and the agent is told so. The thread cannot be
killed, so the callables should bound their own work too.

A write that would break a Python file (it no longer compiles) or a Jinja2
template (it no longer parses) is refused before it lands (``EditRejected``,
naming the file, line and message; ``syntax.py``), so a broken file never
reaches an evaluation; a file that did not parse before the edit is not held to it.

Globs are ``pipemend.globs`` (the one matcher, shared with the manifest checks
and the gate's editable check).

Everything the agent passes in is bounded: paths and globs by shape and length,
files read or searched by size (regular files only, never through a link),
writes by size, listings and search hits by count, and the regex ``search``
runs in a subprocess with a hard deadline (``search_timeout_s``): a
catastrophic pattern is killed there and the agent told so, the run goes on.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from ..errors import PipemendError
from ..fsutil import atomic_write_text, read_regular_at
from ..globs import MAX_GLOB_CHARS, glob_match, is_relative_glob, matches_any, walk_files
from ..manifest import MANIFEST_NAME
from ..runtime.trace import call_provider
from .syntax import is_checked, syntax_error

MAX_READ_CHARS = 60_000
"""A numbered read (what the agent sees) is cut here."""
MAX_FILE_BYTES = 2_000_000
"""Files larger than this are neither read nor edited nor searched."""
MAX_WRITE_CHARS = 2_000_000
MAX_LIST = 500
MAX_WALK_FILES = 20_000
"""A listing or search takes no more matching files than this."""
MAX_SEARCH_HITS = 100
MAX_SEARCH_BYTES = 20_000_000
"""Text one search reads in all; past it the search stops and says so."""
MAX_PATTERN_CHARS = 500
MAX_PATH_CHARS = 1_000
MAX_ID_CHARS = 200
SEARCH_TIMEOUT_S = 10.0
"""Hard deadline of one regex search (the subprocess running it is killed past it)."""
SEARCH_MEMORY_BYTES = 1 << 30
HIT_LINE_CHARS = 300

__all__ = [
    "EditRejected", "MAX_FILE_BYTES", "MAX_PATTERN_CHARS", "MAX_WRITE_CHARS", "PathRefused", "ProposerTools", "ReadOnlyTree",
    "ToolError", "ToolTimeout", "format_trace", "run_search",
]


class ToolError(PipemendError):
    """A tool call that could not be done; its message goes back to the agent as a tool error."""


class PathRefused(ToolError):
    """A path the proposer may not read or write, with the reason."""


class ToolTimeout(ToolError):
    """A tool call ran past its deadline."""


class EditRejected(ToolError):
    """A write that would leave a Python file that does not compile or a Jinja2 template that does not parse;
    the file is left as it was."""


# --------------------------------------------------------------------------- guarded folder


def _clean_relative(path: str, root_label: str) -> str:
    """Validate the shape of a relative path and return it normalised (POSIX, no ``.`` parts)."""
    if not isinstance(path, str) or not path.strip():
        raise PathRefused("empty path: give a path relative to the " + root_label)
    if len(path) > MAX_PATH_CHARS or "\0" in path:
        raise PathRefused(f"{path[:80]!r}...: a path is at most {MAX_PATH_CHARS} characters, without NUL")
    raw = path.strip().replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or raw.startswith("~"):
        raise PathRefused(f"{path!r}: absolute paths are refused; give a path relative to the {root_label}")
    parts = [p for p in PurePosixPath(raw).parts if p not in ("", ".")]
    if ".." in parts:
        raise PathRefused(f"{path!r}: '..' is refused; stay inside the {root_label}")
    if not parts:
        return "."
    return "/".join(parts)


def _check_glob(glob: str, root_label: str) -> str:
    """An agent's glob, checked: a string, relative, without ``..``, not too long."""
    if not isinstance(glob, str):
        raise ToolError("glob must be a string")
    if len(glob) > MAX_GLOB_CHARS:
        raise ToolError(f"glob is {len(glob)} characters; at most {MAX_GLOB_CHARS}")
    if not is_relative_glob(glob):
        raise ToolError(f"glob {glob!r} must be relative to the {root_label}, without '..'")
    return glob


def _resolve_inside(root: Path, rel: str, root_label: str) -> Path:
    """``root / rel`` after checking that no part of it is a symlink and it stays under ``root``."""
    if rel == ".":
        return root
    cur = root
    for part in rel.split("/"):
        cur = cur / part
        if cur.is_symlink():
            raise PathRefused(f"{rel!r}: symlinks are refused ({cur.relative_to(root)} is a symlink)")
    resolved = cur.resolve()
    if resolved != root and root not in resolved.parents:
        raise PathRefused(f"{rel!r}: resolves outside the {root_label}")
    return cur


def _read_regular(full: Path, rel: str, label: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A regular file's UTF-8 text, opened without following a link and refused past ``max_bytes``."""
    try:
        data = read_regular_at(full, max_bytes)
    except FileNotFoundError:
        raise ToolError(f"{rel!r}: no such file in the {label}") from None
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise ToolError(f"{rel!r}: no such file in the {label} (not a regular file)") from None
        if e.errno == errno.EFBIG:
            raise ToolError(f"{rel!r} is too large ({e.strerror}); files over {max_bytes} bytes are not read") from None
        raise PathRefused(f"{rel!r}: cannot be opened as a regular file ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError(f"{rel!r} is not a UTF-8 text file") from None


def _number(lines: list[str], first: int) -> str:
    return "\n".join(f"{first + i:>5}\t{line}" for i, line in enumerate(lines))


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... [truncated: {len(text) - limit} more characters]"


# The regex search runs here, in `python -I -S -c`, fed the files' text on stdin: a pattern that
# backtracks forever is killed with its process, and its memory is capped. Standard library only.
_SEARCH_WORKER = r"""
import json, re, sys
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
except Exception:
    pass
req = json.load(sys.stdin)
try:
    rx = re.compile(req["pattern"])
except (re.error, RecursionError, OverflowError) as e:
    print(json.dumps({"error": str(e)}), flush=True)
    sys.exit(0)
hits = 0
for rel, text in req["files"]:
    for n, line in enumerate(text.split("\n"), start=1):
        if rx.search(line):
            print(json.dumps({"hit": [rel, n, line[: req["line_chars"]]]}), flush=True)
            hits += 1
            if hits >= req["max_hits"]:
                print(json.dumps({"stopped": hits}), flush=True)
                sys.exit(0)
print(json.dumps({"done": hits}), flush=True)
"""


def run_search(pattern: str, files: list[tuple[str, str]], *, timeout_s: float, max_hits: int = MAX_SEARCH_HITS) -> list[str]:
    """``path:line:text`` for each line of ``files`` (``(rel, text)``) matching ``pattern``, in a killable subprocess.

    ``ToolError`` for a bad pattern; ``ToolTimeout`` (hits so far in the message)
    when it runs past ``timeout_s``, the subprocess then killed.
    """
    request = json.dumps({"pattern": pattern, "files": files, "max_hits": max_hits, "line_chars": HIT_LINE_CHARS})
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _SEARCH_WORKER, str(SEARCH_MEMORY_BYTES)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
    )
    timed_out = False
    try:
        out, err = proc.communicate(request, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        out, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    hits: list[str] = []
    end: dict[str, Any] = {}
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "hit" in msg:
            rel, n, text = msg["hit"]
            hits.append(f"{rel}:{n}:{text}")
        else:
            end = msg
    if "error" in end:
        raise ToolError(f"bad regular expression {pattern!r}: {end['error']}")
    if timed_out:
        raise ToolTimeout(
            f"search {pattern!r} did not finish within {timeout_s:g} s and was stopped "
            f"({len(hits)} hits by then); simplify the pattern (nested or overlapping repeats backtrack) or narrow the glob"
        )
    if "stopped" in end:
        hits.append(f"... [stopped at {max_hits} hits; narrow the pattern or glob]")
    elif "done" not in end:
        tail = (err or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise ToolError(f"search {pattern!r} failed: {tail[0][:300]}")
    return hits


class ReadOnlyTree:
    """List, read and search one folder, refusing escapes and symlinks. Used for the history folder."""

    def __init__(self, root: Path, *, label: str = "history folder", unreadable: list[str] | None = None,
                 search_timeout_s: float = SEARCH_TIMEOUT_S):
        self.root = Path(root).resolve()
        self.label = label
        self.unreadable = list(unreadable or [])
        self.search_timeout_s = float(search_timeout_s)

    # subclasses add the write rules; reads share this
    def _path(self, path: str) -> tuple[str, Path]:
        rel = _clean_relative(path, self.label)
        parts = rel.split("/")
        if any(p == ".git" or p.startswith(".pipemend") for p in parts) and rel != ".":
            raise PathRefused(f"{path!r}: .git and .pipemend* folders are refused")
        return rel, _resolve_inside(self.root, rel, self.label)

    def _check_readable(self, rel: str) -> None:
        if self.unreadable and matches_any(rel, self.unreadable):
            raise PathRefused(
                f"{rel!r} is protected and may not be read (data files hold val/test labels); "
                "train examples are shown one by one by the train-example tools"
            )

    def _walk(self, glob: str) -> list[str]:
        return walk_files(self.root, _check_glob(glob, self.label), limit=MAX_WALK_FILES)

    def list_files(self, glob: str = "**/*") -> list[str]:
        """Relative paths of the regular files matching ``glob`` (links, .git and caches skipped), capped."""
        return self._walk(glob or "**/*")[:MAX_LIST]

    def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None,
                  *, numbered: bool = False) -> str:
        """The file's text, or lines ``start_line..end_line`` (1-based, inclusive); a numbered read is capped."""
        rel, full = self._path(path)
        self._check_readable(rel)
        text = _read_regular(full, rel, self.label)
        if start_line is None and end_line is None:
            if not numbered:
                return text
            lines, first = text.split("\n"), 1
        else:
            all_lines = text.split("\n")
            first = max(1, int(start_line or 1))
            last = min(len(all_lines), int(end_line or len(all_lines)))
            if first > last:
                raise ToolError(f"{rel!r}: empty line range {first}..{last} (the file has {len(all_lines)} lines)")
            lines = all_lines[first - 1 : last]
            if not numbered:
                return "\n".join(lines)
        return _truncate(_number(lines, first), MAX_READ_CHARS)

    def search(self, pattern: str, glob: str | None = None) -> list[str]:
        """``path:line:text`` for each line matching the regex ``pattern``; unreadable, large and binary files skipped.

        The regex runs in a subprocess killed after ``search_timeout_s``
        (``ToolTimeout``); the pattern, the files and the hits are capped.
        """
        if not isinstance(pattern, str) or not pattern:
            raise ToolError("give a non-empty regular expression")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ToolError(f"the pattern is {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
        files: list[tuple[str, str]] = []
        total, note = 0, None
        for rel in self._walk(glob or "**/*"):
            if self.unreadable and matches_any(rel, self.unreadable):
                continue
            try:
                text = _read_regular(self.root / rel, rel, self.label)
            except ToolError:
                continue  # large, binary, vanished or replaced by something else
            if total + len(text) > MAX_SEARCH_BYTES:
                note = f"... [searched the first {len(files)} files ({total} bytes); narrow the glob to search the rest]"
                break
            files.append((rel, text))
            total += len(text)
        hits = run_search(pattern, files, timeout_s=self.search_timeout_s) if files else []
        return hits + [note] if note else hits


# --------------------------------------------------------------------------- the candidate's tools


def _with_deadline(fn: Callable[..., Any], args: tuple, timeout_s: float, what: str) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name=f"pipemend-tool-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ToolTimeout(f"{what} did not finish within {timeout_s:g} s and was abandoned")
    if "error" in box:
        err = box["error"]
        if isinstance(err, ToolError):
            raise err
        raise ToolError(f"{what} failed: {type(err).__name__}: {err}") from err
    return box.get("value")


def _check_id(example_id: Any) -> str:
    if not isinstance(example_id, str) or not example_id or len(example_id) > MAX_ID_CHARS:
        raise ToolError(f"{str(example_id)[:80]!r}: an example id is a string of 1-{MAX_ID_CHARS} characters")
    return example_id


class ProposerTools(ReadOnlyTree):
    """Guarded file tools over ``worktree / target_subdir`` plus train runs, traces, diagnosis and diff."""

    def __init__(
        self,
        *,
        worktree: Path,
        target_subdir: str,
        editable: list[str],
        protected: list[str],
        run_train: Callable[[list[str] | None], list[dict]],
        read_trace: Callable[[str], dict | None],
        diagnose: Callable[[], dict],
        diff: Callable[[], str],
        tool_timeout_s: float = 300.0,
    ):
        self.worktree = Path(worktree).resolve()
        sub = (target_subdir or "").strip("/")
        root = self.worktree / sub if sub else self.worktree
        if root.is_symlink() or (root.resolve() != self.worktree and self.worktree not in root.resolve().parents):
            raise PathRefused(f"target folder {sub!r} is a symlink or lies outside the worktree")
        super().__init__(root, label="target folder",
                         unreadable=[p for p in protected if not glob_match(MANIFEST_NAME, p)],
                         search_timeout_s=min(SEARCH_TIMEOUT_S, float(tool_timeout_s)))
        self.target_subdir = sub
        self.editable = list(editable)
        self.protected = list(protected)
        self._run_train = run_train
        self._read_trace = read_trace
        self._diagnose = diagnose
        self._diff = diff
        self.tool_timeout_s = float(tool_timeout_s)
        self.written: list[str] = []
        """Relative paths written so far, in order (duplicates removed)."""
        self.revision = 0
        """How many writes changed a file's content so far (a call repeated at the same revision sees the same files)."""

    # ----------------------------------------------------------------- write rules

    def check_writable(self, path: str) -> tuple[str, Path]:
        """The normalised relative path and full path, or ``PathRefused`` saying why not."""
        rel, full = self._path(path)
        if rel == ".":
            raise PathRefused("the target folder itself is not a file")
        if matches_any(rel, self.protected):
            raise PathRefused(f"{rel!r} is protected (manifest `protected` or data/metric/manifest) and may not be changed")
        if not matches_any(rel, self.editable):
            raise PathRefused(f"{rel!r} matches no editable glob; editable: {', '.join(self.editable)}")
        if full.exists() and not full.is_file():
            raise PathRefused(f"{rel!r} is not a regular file")
        return rel, full

    def is_writable(self, path: str) -> bool:
        try:
            self.check_writable(path)
            return True
        except PathRefused:
            return False

    def write_file(self, path: str, content: str) -> str:
        """Create or replace a file (atomically, keeping its mode). Returns a one-line confirmation."""
        if not isinstance(content, str):
            raise ToolError("content must be a string")
        if len(content) > MAX_WRITE_CHARS:
            raise ToolError(f"content is {len(content)} characters; a file written by a proposer is at most {MAX_WRITE_CHARS}")
        rel, full = self.check_writable(path)
        before = self._current_text(full, rel)
        if is_checked(rel) and before != content:
            self._check_syntax(rel, content, before)
        mode = full.stat().st_mode & 0o777 if full.exists() else None
        atomic_write_text(full, content)
        if mode is not None:
            os.chmod(full, mode)
        if rel not in self.written:
            self.written.append(rel)
        if before != content:
            self.revision += 1
        return f"wrote {rel} ({len(content.splitlines())} lines)"

    def _current_text(self, full: Path, rel: str) -> str | None:
        """The file's text now (None: no file, or not a readable UTF-8 regular file)."""
        if not full.exists():
            return None
        try:
            return _read_regular(full, rel, self.label)
        except ToolError:
            return None

    @staticmethod
    def _check_syntax(rel: str, content: str, before: str | None) -> None:
        """``EditRejected`` when ``content`` breaks a Python file or Jinja2 template that parsed before (or is new)."""
        problem = syntax_error(rel, content)
        if problem is None or (before is not None and syntax_error(rel, before) is not None):
            return  # it parses, or it did not parse before this edit either: the edit broke nothing
        raise EditRejected(f"{problem}. The edit was not applied; {rel} is unchanged. Fix the text and try again.")

    def edit_file(self, path: str, old: str, new: str) -> str:
        """Replace the one exact occurrence of ``old`` by ``new``."""
        rel, full = self.check_writable(path)
        if not full.is_file():
            raise ToolError(f"{rel!r}: no such file; use write_file to create it")
        if not isinstance(old, str) or not isinstance(new, str):
            raise ToolError("`old` and `new` must be strings")
        if not old:
            raise ToolError("`old` is empty; give the exact text to replace")
        if old == new:
            raise ToolError("`old` and `new` are the same; nothing would change")
        text = _read_regular(full, rel, self.label)
        n = text.count(old)
        if n == 0:
            raise ToolError(f"{rel!r}: `old` was not found; read the file and copy the text exactly")
        if n > 1:
            raise ToolError(f"{rel!r}: `old` occurs {n} times; include more surrounding text so it is unique")
        return self.write_file(rel, text.replace(old, new, 1)).replace("wrote", "edited", 1)

    def describe(self, rel: str) -> str:
        """``editable``, ``protected`` or ``read-only`` for a relative path."""
        if matches_any(rel, self.protected):
            return "protected"
        return "editable" if matches_any(rel, self.editable) else "read-only"

    # ----------------------------------------------------------------- the rest of pipemend

    def run_train(self, ids: list[str] | None = None) -> list[dict]:
        """Run the candidate on these train ids (None: all train) and return the scored rows."""
        if ids is not None:
            if not isinstance(ids, list):
                raise ToolError("ids must be a list of train example ids")
            ids = [_check_id(i) for i in ids]
        return _with_deadline(self._run_train, (ids,), self.tool_timeout_s, "run_train") or []

    def read_trace_raw(self, example_id: str) -> dict | None:
        example_id = _check_id(example_id)
        return _with_deadline(self._read_trace, (example_id,), self.tool_timeout_s, "read_trace")

    def read_trace(self, example_id: str, *, max_chars: int = 20_000) -> str:
        """The latest train trace of ``example_id``, step by step, each field truncated."""
        trace = self.read_trace_raw(example_id)
        if not trace:
            return f"no trace for {example_id!r} yet (run_train it first)"
        return format_trace(trace, max_chars=max_chars)

    def diagnose(self) -> dict:
        return _with_deadline(self._diagnose, (), self.tool_timeout_s, "diagnose") or {}

    def show_diff(self) -> str:
        return _with_deadline(self._diff, (), self.tool_timeout_s, "diff") or ""


def _short(value: Any, limit: int) -> str:
    """``value`` as one field of the text, cut at ``limit`` characters (whatever a hostile trace put there)."""
    if isinstance(value, str):
        text = value[: limit + 1]
        more = len(value) - limit
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            text = f"<{type(value).__name__}>"
        more = len(text) - limit
    text = text[:limit].replace("\n", "\n      ")
    return text if more <= 0 else text + f" ... [+{more} chars]"


def _dicts(value: Any, limit: int) -> list[dict]:
    return [v for v in value[:limit] if isinstance(v, dict)] if isinstance(value, list) else []


def _key(value: Any) -> str:
    return value if isinstance(value, str) else ""


MAX_TRACE_STEPS = 300
MAX_TRACE_DEPTH = 12


def format_trace(trace: dict, *, max_chars: int = 20_000, field_chars: int = 1_500) -> str:
    """A ``pipemend-1`` trace as readable text: one block per step, in start order.

    The trace was written inside the sandbox, so nothing in it is trusted: fields
    of the wrong type are shown as they are or skipped, and steps, nesting, logs,
    calls and every field are capped.
    """
    if not isinstance(trace, dict):
        return f"(unreadable trace: a {type(trace).__name__}, not an object)"
    lines = [f"example {_short(trace.get('example_id'), 200)}  (trace format {_short(trace.get('trace_format'), 50)})"]
    if trace.get("error"):
        err = trace["error"]
        msg = f"{err.get('type')}: {err.get('message')}" if isinstance(err, dict) else err
        lines.append(f"ERROR: {_short(msg, field_chars)}")
    lines.append(f"final output: {_short(trace.get('output'), field_chars)}")
    steps = _dicts(trace.get("steps"), MAX_TRACE_STEPS)
    depth: dict[str, int] = {}
    size = sum(len(line) for line in lines)
    for n, step in enumerate(steps, start=1):
        parent = _key(step.get("parent"))
        d = min(depth.get(parent, -1) + 1, MAX_TRACE_DEPTH) if parent else 0
        depth[_key(step.get("id")) or f"#{n}"] = d
        pad = "  " * d
        dur = ""
        start, end = step.get("start"), step.get("end")
        if isinstance(start, (int, float)) and isinstance(end, (int, float)) and not isinstance(start, bool):
            dur = f" {end - start:.2f}s"
        block = [f"{pad}[{n}] {_short(step.get('name'), 200)} ({_short(step.get('kind'), 50)}){dur}",
                 f"{pad}    inputs: {_short(step.get('inputs'), field_chars)}"]
        if step.get("doc_ids") is not None:
            block.append(f"{pad}    doc_ids: {_short(step.get('doc_ids'), field_chars)}")
        block.append(f"{pad}    output: {_short(step.get('output'), field_chars)}")
        if step.get("error"):
            err = step["error"]
            msg = f"{err.get('type')}: {err.get('message')}" if isinstance(err, dict) else err
            block.append(f"{pad}    error: {_short(msg, field_chars)}")
        for log in _dicts(step.get("logs"), 10):
            block.append(f"{pad}    log[{_short(log.get('source'), 20)}]: {_short(log.get('message'), 300)}")
        for call in _dicts(step.get("llm_calls"), 50):
            block.append(
                f"{pad}    llm call: model={_short(call.get('gen_ai.request.model'), 100)} "
                f"in={_short(call.get('gen_ai.usage.input_tokens'), 20)} "
                f"out={_short(call.get('gen_ai.usage.output_tokens'), 20)} "
                f"cache_hit={_short(call.get('pipemend.cache_hit'), 10)}"
                + (f" provider={_short(call_provider(call), 50)}" if call_provider(call) else "")
            )
        lines += block
        size += sum(len(line) + 1 for line in block)
        if size > max_chars:
            break
    return _truncate("\n".join(lines), max_chars)
