"""Parse a unified ``git diff`` by its structure, not by the look of its lines.

A file section is a ``diff --git`` header, then extended headers (modes, new or
deleted file, renames, ``index``), then either a binary marker or ``---``/``+++``
and hunks. Each hunk is read by the line counts of its ``@@ -a,b +c,d @@``
header, so a content line that reads ``++ /dev/null`` (shown as ``+++ /dev/null``)
or ``diff --git ...`` (shown as ``+diff --git ...``) is content, never a header.

The input is hostile (a candidate chose every content byte): the parser is one
pass over the lines, does constant work per character, uses only anchored regular
expressions on header lines, splits lines on ``\\n`` alone (never on ``\\r``,
``\\x0c`` or ``\\u2028``, which ``str.splitlines`` would take for line ends), and
raises ``DiffError`` on anything it does not recognise instead of guessing.

It expects what ``git diff`` writes with ``--src-prefix=a/ --dst-prefix=b/``
(the default prefixes); combined diffs (``diff --cc``) are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["DiffError", "FileDiff", "Hunk", "parse_diff", "added_lines", "symlink_paths"]

SYMLINK_MODE = "120000"
_HUNK = re.compile(r"@@ -(\d{1,10})(?:,(\d{1,10}))? \+(\d{1,10})(?:,(\d{1,10}))? @@")
_MODE = re.compile(r"[0-7]{6}")
_INDEX = re.compile(r"index ([0-9a-f]{4,64})\.\.([0-9a-f]{4,64})(?: ([0-7]{6}))?")
_OCTAL = re.compile(r"[0-7]{3}")
_SIMILARITY = re.compile(r"(?:dis)?similarity index \d{1,3}%")
_MODE_HEADERS = ("old mode ", "new mode ", "new file mode ", "deleted file mode ")
_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}


class DiffError(ValueError):
    """The text is not a well-formed ``git diff``; the message names the line."""


@dataclass
class Hunk:
    old_start: int
    old_count: int
    new_start: int
    new_count: int
    lines: list[str] = field(default_factory=list)
    """Body lines as written, each starting with ' ', '-', '+' or '\\' (an empty context line is ' ')."""


@dataclass
class FileDiff:
    old_path: str | None
    """Path before the change (``None`` for an added file)."""
    new_path: str | None
    """Path after the change (``None`` for a deleted file)."""
    status: str
    """``added``, ``deleted``, ``modified``, ``renamed`` or ``copied``."""
    old_mode: str | None = None
    new_mode: str | None = None
    is_binary: bool = False
    """Git showed the file as binary (``Binary files ... differ`` or ``GIT binary patch``): no lines known."""
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    hunks: list[Hunk] = field(default_factory=list)
    old_no_newline: bool = False
    """The old side's last line has no newline (``\\ No newline at end of file``)."""
    new_no_newline: bool = False

    @property
    def path(self) -> str:
        """The new path, or the old one for a deletion."""
        return self.new_path if self.new_path is not None else self.old_path  # type: ignore[return-value]

    @property
    def is_symlink(self) -> bool:
        """Either side is a symlink (mode 120000)."""
        return SYMLINK_MODE in (self.old_mode, self.new_mode)


# --------------------------------------------------------------------------- public helpers


def added_lines(diff: str) -> dict[str, list[str]]:
    """Lines the diff adds, per path on the new side."""
    return added_by_path(parse_diff(diff))


def added_by_path(files: list[FileDiff]) -> dict[str, list[str]]:
    """Lines the parsed files add, per path on the new side."""
    out: dict[str, list[str]] = {}
    for f in files:
        if f.new_path is not None:
            out.setdefault(f.new_path, []).extend(f.added)
    return out


def symlink_paths(diff: str) -> set[str]:
    """Every path (old and new side) of a file that is a symlink on either side."""
    return {p for f in parse_diff(diff) if f.is_symlink for p in (f.old_path, f.new_path) if p is not None}


# --------------------------------------------------------------------------- the parser


def parse_diff(diff: str | bytes) -> list[FileDiff]:
    """Every file section of a ``git diff``, in order. Raises ``DiffError`` on malformed input."""
    if isinstance(diff, bytes):
        try:
            diff = diff.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DiffError(f"the diff is not UTF-8 (byte {e.start})") from None
    lines = diff.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return _Parser(lines).files()


class _Parser:
    def __init__(self, lines: list[str]):
        self.lines = lines
        self.i = 0

    def error(self, problem: str, at: int | None = None) -> DiffError:
        n = (self.i if at is None else at) + 1
        text = self.lines[n - 1] if 0 < n <= len(self.lines) else ""
        shown = text if len(text) <= 80 else text[:77] + "..."
        return DiffError(f"diff line {n}: {problem}: {shown!r}")

    def peek(self) -> str | None:
        return self.lines[self.i] if self.i < len(self.lines) else None

    def files(self) -> list[FileDiff]:
        out = []
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if not line.startswith("diff --git "):
                combined = line.startswith(("diff --cc ", "diff --combined "))
                raise self.error("combined diffs are not supported" if combined else "expected 'diff --git'")
            out.append(self.file())
        return out

    def file(self) -> FileDiff:
        start = self.i
        header_names = _git_header_names(self.lines[self.i][len("diff --git "):])
        self.i += 1
        old_mode = new_mode = index_mode = None
        status = "modified"
        renamed: dict[str, str] = {}
        # extended headers
        while (line := self.peek()) is not None:
            if line.startswith(("--- ", "Binary files ", "GIT binary patch", "diff --git ", "@@")):
                break
            mode_header = next((h for h in _MODE_HEADERS if line.startswith(h)), None)
            if mode_header is not None:
                mode = line[len(mode_header):]
                if not _MODE.fullmatch(mode):
                    raise self.error("bad file mode")
                if mode_header in ("old mode ", "deleted file mode "):
                    old_mode = mode
                else:
                    new_mode = mode
                status = {"new file mode ": "added", "deleted file mode ": "deleted"}.get(mode_header, status)
            elif line.startswith(("rename from ", "rename to ", "copy from ", "copy to ")):
                kind, side, name = line.split(" ", 2)
                renamed[side] = _unquote(name, self.error("bad path"))
                status = "renamed" if kind == "rename" else "copied"
            elif _SIMILARITY.fullmatch(line):
                pass
            elif (m := _INDEX.fullmatch(line)) is not None:
                index_mode = m.group(3)
            else:
                raise self.error("unknown extended header")
            self.i += 1
        if index_mode is not None:
            old_mode = old_mode or (index_mode if status != "added" else None)
            new_mode = new_mode or (index_mode if status != "deleted" else None)

        old_path, new_path = renamed.get("from"), renamed.get("to")
        if header_names is not None:
            old_path = old_path or header_names[0]
            new_path = new_path or header_names[1]
        fd = FileDiff(old_path=None, new_path=None, status=status, old_mode=old_mode, new_mode=new_mode)

        line = self.peek()
        if line is not None and line.startswith("Binary files ") and line.endswith(" differ"):
            fd.is_binary = True
            self.i += 1
        elif line is not None and line == "GIT binary patch":
            fd.is_binary = True
            self.i += 1
            while (line := self.peek()) is not None and not line.startswith("diff --git "):
                self.i += 1  # base85 data: its lines never start with "diff --git "
        elif line is not None and line.startswith("--- "):
            minus = self._side_path(line[4:], "a/")
            self.i += 1
            plus_line = self.peek()
            if plus_line is None or not plus_line.startswith("+++ "):
                raise self.error("expected '+++' after '---'")
            plus = self._side_path(plus_line[4:], "b/")
            self.i += 1
            if minus is None and plus is None:
                raise self.error("both sides are /dev/null", self.i - 1)
            if (minus is None) != (fd.status == "added") or (plus is None) != (fd.status == "deleted"):
                raise self.error("'---'/'+++' disagree with the file's status", self.i - 1)
            if header_names is not None and status not in ("renamed", "copied") and (
                    (minus is not None and minus != header_names[0]) or (plus is not None and plus != header_names[1])):
                raise self.error("'---'/'+++' name other files than 'diff --git'", self.i - 1)
            old_path = minus if minus is not None else old_path
            new_path = plus if plus is not None else new_path
            if self.peek() is None or not self.peek().startswith("@@"):
                raise self.error("expected a hunk after '+++'")
            while (line := self.peek()) is not None and line.startswith("@@"):
                self._hunk(fd)
        elif line is not None and not line.startswith("diff --git "):
            raise self.error("expected '---', a binary marker or the next 'diff --git'")

        if fd.status == "added":
            old_path = None
        if fd.status == "deleted":
            new_path = None
        if old_path is None and new_path is None:
            raise self.error("cannot tell the file's name from its 'diff --git' line", start)
        fd.old_path, fd.new_path = old_path, new_path
        if fd.status == "added":
            fd.old_mode = None
        if fd.status == "deleted":
            fd.new_mode = None
        return fd

    def _side_path(self, text: str, prefix: str) -> str | None:
        if text == "/dev/null":
            return None
        if text.startswith('"'):
            name = _unquote(text, self.error("bad quoted path"))
        else:
            name = text[:-1] if text.endswith("\t") else text  # git adds a TAB after a name holding a space
        if not name.startswith(prefix):
            raise self.error(f"expected a path starting with {prefix!r}")
        return name[len(prefix):]

    def _hunk(self, fd: FileDiff) -> None:
        m = _HUNK.match(self.lines[self.i])
        if m is None:
            raise self.error("bad hunk header")
        old_start, new_start = int(m.group(1)), int(m.group(3))
        old_left = 1 if m.group(2) is None else int(m.group(2))
        new_left = 1 if m.group(4) is None else int(m.group(4))
        hunk = Hunk(old_start, old_left, new_start, new_left)
        fd.hunks.append(hunk)
        self.i += 1
        last = ""
        while old_left > 0 or new_left > 0 or (self.peek() or "").startswith("\\"):
            line = self.peek()
            if line is None:
                raise self.error("the diff ends inside a hunk", self.i - 1)
            op = line[:1]
            if op in (" ", ""):
                if old_left == 0 or new_left == 0:
                    raise self.error("more context lines than the hunk header counts")
                old_left -= 1
                new_left -= 1
                line = " " + line[1:]
            elif op == "-":
                if old_left == 0:
                    raise self.error("more removed lines than the hunk header counts")
                old_left -= 1
                fd.removed.append(line[1:])
            elif op == "+":
                if new_left == 0:
                    raise self.error("more added lines than the hunk header counts")
                new_left -= 1
                fd.added.append(line[1:])
            elif op == "\\":
                if last in ("", "\\"):
                    raise self.error("'\\ No newline' marker not after a line")
                if last in (" ", "-"):
                    fd.old_no_newline = True
                if last in (" ", "+"):
                    fd.new_no_newline = True
            else:
                raise self.error("expected a hunk line (' ', '-', '+' or '\\')")
            last = line[:1]
            hunk.lines.append(line)
            self.i += 1


# --------------------------------------------------------------------------- names


def _unquote(text: str, err: DiffError) -> str:
    """A C-quoted git path (``"a/x\\ty"``, octal escapes for bytes) or a plain one, as text."""
    if not text.startswith('"'):
        return text
    out = bytearray()
    i, n = 1, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            if i != n - 1:
                raise err
            try:
                return out.decode("utf-8")
            except UnicodeDecodeError:
                raise err from None
        if c == "\\":
            if i + 1 >= n:
                raise err
            e = text[i + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
            elif _OCTAL.fullmatch(octal := text[i + 1:i + 4]):
                out.append(int(octal, 8) & 0xFF)
                i += 4
            else:
                raise err
        else:
            out.extend(c.encode("utf-8"))
            i += 1
    raise err


def _git_header_names(rest: str) -> tuple[str, str] | None:
    """Old and new path from what follows ``diff --git ``, when they can be told apart.

    Quoted names are unambiguous. Unquoted names can hold spaces, so they are read
    only when both sides name the same path (``a/P b/P``); otherwise (a rename) the
    ``rename``/``---``/``+++`` headers name them, and ``None`` is returned here."""
    err = DiffError(f"bad 'diff --git' line: {rest[:80]!r}")
    if rest.startswith('"'):
        end = _quoted_end(rest)
        first, second = _unquote(rest[:end], err), rest[end:]
        if not second.startswith(" "):
            raise err
        second = _unquote(second[1:], err)
    elif rest.endswith('"'):
        start = rest.rfind(' "')
        if start < 0:
            raise err
        first, second = rest[:start], _unquote(rest[start + 1:], err)
    else:
        if (len(rest) - 5) % 2 or len(rest) < 7:
            return None
        half = (len(rest) - 5) // 2
        name = rest[2:2 + half]
        if rest != f"a/{name} b/{name}":
            return None
        return name, name
    if not first.startswith("a/") or not second.startswith("b/"):
        raise err
    return first[2:], second[2:]


def _quoted_end(text: str) -> int:
    """Index just past the closing quote of the quoted string starting ``text``."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    raise DiffError(f"unterminated quoted path: {text[:80]!r}")
