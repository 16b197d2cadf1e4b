"""The one glob matcher: editable/protected globs of the manifest, the proposer's tools and the gate.

A glob matches the whole relative POSIX path; ``*`` and ``?`` stay within one
path segment, ``[abc]`` / ``[!abc]`` / ``[a-z]`` match one character, ``**``
spans any number of segments (``**/`` may match none), and a glob naming a
folder (``prompts`` or ``prompts/``) covers everything under it. A leading
``./`` is ignored.

Globs come from manifests and from the proposer (an agent's tool input), so
matching never backtracks: a glob compiles to a bit-parallel automaton run
over the path once (a few integer operations per character, whatever the
glob), and globs longer than ``MAX_GLOB_CHARS`` match nothing.

``walk_files`` lists the files of a folder that match a glob: regular files
only, never through a symlinked folder, skipping ``.git``, caches, virtual
environments and ``.pipemend*`` folders.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

MAX_GLOB_CHARS = 1000
SKIP_DIRS = frozenset({".git", "__pycache__", ".venv", "node_modules", ".pytest_cache", ".mypy_cache"})
"""Folders never listed (nor their contents); ``.pipemend*`` folders neither."""

# token kinds: one character (a literal, `?`, a class), a loop (`*`, `**`, the `.*` of `**/`),
# or the gate in front of a `**/` (takes no character: enters its `.*/` or skips all of it)
_LIT, _ONE, _CLASS, _STAR, _ANY, _GATE = range(6)


@dataclass(frozen=True)
class _Token:
    kind: int
    char: str = ""
    ranges: tuple[tuple[str, str], ...] = ()
    negate: bool = False

    def takes(self, c: str) -> bool:
        """Whether this token consumes ``c`` (a loop: and stays where it is)."""
        if self.kind == _LIT:
            return c == self.char
        if self.kind in (_ONE, _STAR):
            return c != "/"
        if self.kind == _ANY:
            return True
        if self.kind == _GATE:
            return False
        inside = any(lo <= c <= hi for lo, hi in self.ranges)
        return inside != self.negate


def _class(body: str) -> _Token:
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    ranges: list[tuple[str, str]] = []
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            ranges.append((body[i], body[i + 2]))
            i += 3
        else:
            ranges.append((body[i], body[i]))
            i += 1
    return _Token(_CLASS, ranges=tuple(ranges), negate=negate)


def _normalise(pattern: str) -> str:
    pat = pattern.strip()
    if pat.startswith("./"):
        pat = pat[2:]
    return pat.rstrip("/")


class _Automaton:
    """A glob as a bit-parallel automaton: bit ``i`` set = "about to match token ``i``".

    Loops may match nothing (an epsilon step ``i -> i+1``). ``**/`` is three
    tokens, a gate, ``.*`` and ``/``: the gate steps into the ``.*`` or over
    all three (``i -> i+3``), which is how ``**/`` matches no folder at all.
    """

    def __init__(self, pattern: str):
        pat = _normalise(pattern)
        tokens: list[_Token] = []
        gates: list[int] = []
        i = 0
        while i < len(pat):
            c = pat[i]
            if pat.startswith("**/", i):
                if not (gates and gates[-1] == len(tokens) - 3):  # `**/**/` is `**/`
                    gates.append(len(tokens))
                    tokens += [_Token(_GATE), _Token(_ANY), _Token(_LIT, char="/")]
                i += 3
            elif pat.startswith("**", i):
                tokens.append(_Token(_ANY))
                i += 2
            elif c == "*":
                tokens.append(_Token(_STAR))
                i += 1
            elif c == "?":
                tokens.append(_Token(_ONE))
                i += 1
            elif c == "[" and (j := pat.find("]", i + 1)) != -1:
                tokens.append(_class(pat[i + 1 : j]))
                i = j + 1
            else:
                tokens.append(_Token(_LIT, char=c))
                i += 1
        self.tokens = tokens
        self.end = 1 << len(tokens)
        self.loops = sum(1 << k for k, t in enumerate(tokens) if t.kind in (_STAR, _ANY))
        self.gates = sum(1 << k for k in gates)
        self.step1 = self.loops | self.gates
        self._masks: dict[str, tuple[int, int]] = {}

    def masks(self, c: str) -> tuple[int, int]:
        """(one-character tokens that take ``c``, loops that take ``c``)."""
        got = self._masks.get(c)
        if got is None:
            takes = sum(1 << k for k, t in enumerate(self.tokens) if t.takes(c))
            got = (takes & ~self.loops, takes & self.loops)
            if len(self._masks) < 256:
                self._masks[c] = got
        return got

    def closure(self, x: int) -> int:
        while True:
            y = x | ((x & self.step1) << 1) | ((x & self.gates) << 3)
            if y == x:
                return x
            x = y

    def match(self, path: str) -> bool:
        cur = self.closure(1)
        for c in path:
            if c == "/" and cur & self.end:
                return True  # the whole glob matched a folder: everything under it is covered
            one, loop = self.masks(c)
            cur = self.closure(((cur & one) << 1) | (cur & loop))
            if not cur:
                return False
        return bool(cur & self.end)


@lru_cache(maxsize=1024)
def _automaton(pattern: str) -> _Automaton | None:
    return None if len(pattern) > MAX_GLOB_CHARS else _Automaton(pattern)


def glob_match(path: str, pattern: str) -> bool:
    """Whether the relative POSIX ``path`` matches ``pattern`` (see the module docstring)."""
    auto = _automaton(pattern)
    return auto is not None and auto.match(path)


def matches_any(path: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Whether ``path`` matches at least one of ``patterns``."""
    return any(glob_match(path, p) for p in patterns)


def is_relative_glob(pattern: str) -> bool:
    """A non-empty glob that is relative and has no ``..`` part (so it cannot name anything outside its folder)."""
    p = PurePosixPath(pattern)
    return bool(pattern.strip()) and not p.is_absolute() and ".." not in p.parts


def walk_files(root: Path, pattern: str = "**/*", *, limit: int | None = None) -> list[str]:
    """Regular files under ``root`` whose relative POSIX path matches ``pattern``, sorted by folder then name.

    Symlinks (to files or folders) are neither listed nor followed; ``SKIP_DIRS``
    and ``.pipemend*`` folders are skipped. Stops after ``limit`` matches.
    """
    root = Path(root)
    if not is_relative_glob(pattern):
        return []
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in SKIP_DIRS and not d.startswith(".pipemend") and not os.path.islink(os.path.join(dirpath, d))
        )
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                if not stat.S_ISREG(os.lstat(full).st_mode):
                    continue  # symlinks, FIFOs, sockets, devices
            except OSError:
                continue
            rel = Path(full).relative_to(root).as_posix()
            if glob_match(rel, pattern):
                out.append(rel)
                if limit is not None and len(out) >= limit:
                    return out
    return out


__all__ = ["MAX_GLOB_CHARS", "SKIP_DIRS", "glob_match", "is_relative_glob", "matches_any", "walk_files"]
