"""The candidate commit, built from the files themselves; and a checkout that is exactly a commit.

``build_candidate`` trusts nothing in the candidate worktree but its regular
files. It never runs git inside the worktree (its ``.git`` file, index, flags such
as skip-worktree, assume-unchanged or intent-to-add, ``.gitignore`` and
``.gitattributes`` are all the candidate's to forge): it walks the folder itself
through directory file descriptors (no symlink is ever followed), compares each
file's bytes with the base commit's blob, and stages the changes it accepts
into a FRESH temporary index seeded from the base tree, writing blobs with
``git hash-object -w --no-filters`` (no clean filter, no eol conversion). Every
change it does not accept is a ``Refusal``, never silently dropped; the commit
holds the base's version of a refused path.

Attributes. A candidate cannot add or change a dot-file, so a ``.gitattributes``
can only be the base's (the user's). Nothing here reads one: blobs are written
without filters, and the diff is run in a scratch git setup whose work tree and
index are empty temporary ones (attributes are read from the work tree and the
index, never from the commits being compared), with ``core.attributesFile`` set to
``/dev/null``, ``GIT_ATTR_NOSYSTEM=1``, ``attr.tree``/``GIT_ATTR_SOURCE`` pointed at
the empty tree (newer gits read a bare repo's attributes from HEAD otherwise),
and ``--text --no-textconv --no-ext-diff``. What remains is the user's own
``$GIT_DIR/info/attributes``, which ``--text --no-textconv --no-ext-diff``
overrides for everything that changes a diff's lines.

``checkout_exact`` writes a commit's blobs to a worktree byte for byte (no smudge
filter, no eol conversion, whatever the tree's ``.gitattributes`` says), leaves
``without`` paths off the disk with skip-worktree set in that worktree's own
index (pipemend wrote that index, so its flags are trusted there), and checks
that git reports the worktree clean. So the folder that is evaluated holds
exactly the blobs of the commit that was checked and is kept. A consequence:
a file stored through a filter (Git LFS) appears as what the commit stores (its
pointer), as it would to ``git show``.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tempfile
import unicodedata
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..errors import RunFailed

IDENTITY = {
    "GIT_AUTHOR_NAME": "pipemend",
    "GIT_AUTHOR_EMAIL": "pipemend@localhost",
    "GIT_COMMITTER_NAME": "pipemend",
    "GIT_COMMITTER_EMAIL": "pipemend@localhost",
}
_CONFIG = [
    "-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false", "-c", "core.quotepath=false",
    "-c", "core.attributesFile=/dev/null", "-c", "core.fsmonitor=false", "-c", "core.autocrlf=false",
    "-c", "core.safecrlf=false", "-c", "core.sparseCheckout=false", "-c", "core.symlinks=true",
    "-c", "i18n.commitEncoding=UTF-8",
]
DIFF_ARGS = ("diff", "--no-color", "--no-ext-diff", "--no-textconv", "--text", "--no-renames", "--full-index",
             "--src-prefix=a/", "--dst-prefix=b/", "--ignore-submodules=none", "--submodule=short")
"""How the candidate's diff is made: attributes, drivers, colour and renames cannot change its lines."""

MAX_FILE_BYTES = 8 * 1024 * 1024
"""A changed file larger than this is refused (``too_large``); unchanged base files may be any size."""
MAX_ENTRIES = 200_000
"""More files and folders than this in a candidate worktree: refused whole (``too_many_files``)."""
MAX_DEPTH = 64
"""Folders nested deeper than this are refused (``too_deep``)."""

_REGULAR, _EXECUTABLE, _SYMLINK, _GITLINK = "100644", "100755", "120000", "160000"

# Refusal codes
SYMLINK, SPECIAL, OUTSIDE, NOT_EDITABLE, SEALED = "symlink", "special_file", "outside_target", "not_editable", "sealed"
BINARY, HIDDEN, BAD_NAME, TOO_LARGE, TOO_DEEP, TOO_MANY, UNREADABLE = (
    "binary", "hidden", "bad_name", "too_large", "too_deep", "too_many_files", "unreadable")


@dataclass(frozen=True)
class Refusal:
    path: str
    """Repo-relative path the refusal is about."""
    code: str
    """One of the module's refusal codes: symlink, special_file, outside_target, not_editable, sealed,
    binary, hidden, bad_name, too_large, too_deep, too_many_files, unreadable."""
    text: str
    """A sentence for a verdict: what was refused and why."""

    def __str__(self) -> str:
        return f"{self.path}: {self.text}"


@dataclass
class CandidateTree:
    sha: str | None
    """The candidate commit (parent: the base), or ``None`` when nothing changed."""
    changed: list[str] = field(default_factory=list)
    """Repo-relative paths whose entry differs between the base and the candidate commit, sorted."""
    diff: str = ""
    """``git diff`` from the base commit to the candidate commit (``DIFF_ARGS``); '' when nothing changed."""
    refusals: list[Refusal] = field(default_factory=list)
    """Changes found in the worktree and left out of the commit, with why."""


@dataclass(frozen=True)
class _Entry:
    mode: str
    kind: str
    oid: str
    size: int | None


# --------------------------------------------------------------------------- git, hermetic


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The process environment without any GIT_* variable (they could redirect git), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(IDENTITY)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_ATTR_NOSYSTEM"] = "1"
    env.update(extra or {})
    return env


def run_git(cwd: Path, args: list[str], *, input: bytes | None = None, env: dict[str, str] | None = None,
            pre: Sequence[str] = ()) -> bytes:
    """``git <_CONFIG> <pre> <args>`` in ``cwd``; stdout as bytes; ``RunFailed`` naming the command on failure."""
    cmd = ["git", *_CONFIG, *pre, *args]
    proc = subprocess.run(cmd, cwd=cwd, input=input, capture_output=True, env=_clean_env(env))
    if proc.returncode != 0:
        raise RunFailed(f"git {' '.join(args[:3])} failed in {cwd}: "
                        f"{proc.stderr.decode('utf-8', 'replace').strip()[:2000]}")
    return proc.stdout


class _Store:
    """Plumbing against a repo's object store with a scratch index and an empty scratch work tree."""

    def __init__(self, git_dir: Path, scratch: Path):
        self.git_dir = git_dir
        self.scratch = scratch
        (scratch / "wt").mkdir()
        self.env = {"GIT_INDEX_FILE": str(scratch / "index")}
        self.pre = [f"--git-dir={git_dir}", f"--work-tree={scratch / 'wt'}"]
        empty_tree = self.run(["hash-object", "-w", "-t", "tree", "--stdin"], input=b"").decode().strip()
        self.env["GIT_ATTR_SOURCE"] = empty_tree
        self.pre = ["-c", f"attr.tree={empty_tree}", *self.pre]

    def run(self, args: list[str], *, input: bytes | None = None) -> bytes:
        return run_git(self.scratch / "wt", args, input=input, env=self.env, pre=self.pre)

    def ls_tree(self, sha: str) -> dict[str, _Entry]:
        out = self.run(["ls-tree", "-r", "-z", "-l", "--full-tree", sha])
        entries = {}
        for rec in out.split(b"\0"):
            if not rec:
                continue
            meta, _, raw_path = rec.partition(b"\t")
            mode, kind, oid, size = meta.decode().split()
            entries[os.fsdecode(raw_path)] = _Entry(mode, kind, oid, None if size == "-" else int(size))
        return entries

    def write_blob(self, data: bytes) -> str:
        return self.run(["hash-object", "-w", "--no-filters", "--stdin"], input=data).decode().strip()

    def blobs(self) -> "_BlobReader":
        return _BlobReader(self)


class _BlobReader:
    """``git cat-file --batch``, one object at a time."""

    def __init__(self, store: _Store):
        self.proc = subprocess.Popen(["git", *_CONFIG, *store.pre, "cat-file", "--batch"], cwd=store.scratch / "wt",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_clean_env(store.env))

    def _header(self, oid: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(oid.encode() + b"\n")
        self.proc.stdin.flush()
        header = self.proc.stdout.readline().split()
        if len(header) != 3 or header[1] != b"blob":
            raise RunFailed(f"git cat-file: {oid} is not a blob ({b' '.join(header).decode('utf-8', 'replace')})")
        return int(header[2])

    def read(self, oid: str) -> bytes:
        buf = io.BytesIO()
        self.copy(oid, buf)
        return buf.getvalue()

    def copy(self, oid: str, out: BinaryIO) -> None:
        """Write blob ``oid`` to ``out``, streamed (a base may hold large files)."""
        left = self._header(oid)
        assert self.proc.stdout is not None
        while left:
            chunk = self.proc.stdout.read(min(left, 1 << 20))
            if not chunk:
                raise RunFailed(f"git cat-file: short read of {oid}")
            out.write(chunk)
            left -= len(chunk)
        if self.proc.stdout.read(1) != b"\n":
            raise RunFailed(f"git cat-file: bad framing after {oid}")

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


@contextmanager
def _store(git_dir: Path) -> Iterator[_Store]:
    with tempfile.TemporaryDirectory(prefix="pipemend-tree-") as d:
        yield _Store(git_dir, Path(d))


def _blob_id(data: bytes, algo: str) -> str:
    h = hashlib.new(algo)
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


# --------------------------------------------------------------------------- paths


def _under(path: str, roots: Collection[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _bad_name(path: str) -> str | None:
    """Why a path name cannot be part of a candidate (None when it can)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in path):
        return "its name holds control or invisible characters"
    return None


# --------------------------------------------------------------------------- building a candidate


def build_candidate(*, git_dir: Path, worktree: Path, base_sha: str, target_subdir: str, message: str,
                    is_editable: Callable[[str], bool], sealed: Collection[str]) -> CandidateTree:
    """See ``Snapshot.build_candidate``."""
    with _store(git_dir) as store:
        base_sha = store.run(["rev-parse", "--verify", "--quiet", f"{base_sha}^{{commit}}"]).decode().strip()
        base = store.ls_tree(base_sha)
        algo = "sha256" if len(base_sha) == 64 else "sha1"
        builder = _Builder(store, base, algo, target_subdir, is_editable, set(sealed))
        builder.walk(Path(worktree))
        if builder.too_many:
            return CandidateTree(None, [], "", builder.refusals)
        builder.deletions()
        if not builder.staged:
            return CandidateTree(None, [], "", builder.refusals)
        store.run(["read-tree", base_sha])
        records = b"".join(
            (f"0 {'0' * len(base_sha)}\t" if mode is None else f"{mode} {oid}\t").encode() + os.fsencode(p) + b"\0"
            for p, (mode, oid) in sorted(builder.staged.items(), key=lambda kv: kv[1][0] is not None))
        store.run(["update-index", "--add", "--remove", "--replace", "-z", "--index-info"], input=records)
        tree = store.run(["write-tree"]).decode().strip()
        if tree == store.run(["rev-parse", f"{base_sha}^{{tree}}"]).decode().strip():
            return CandidateTree(None, [], "", builder.refusals)
        sha = store.run(["commit-tree", tree, "-p", base_sha, "-F", "-"], input=message.encode("utf-8")).decode().strip()
        changed = sorted(os.fsdecode(p) for p in store.run(
            ["diff", "--name-only", "-z", "--no-renames", base_sha, sha]).split(b"\0") if p)
        diff = store.run([*DIFF_ARGS, base_sha, sha]).decode("utf-8", errors="replace")
        return CandidateTree(sha, changed, diff, builder.refusals)


def reword_commit(*, git_dir: Path, sha: str, message: str) -> str:
    """A new commit with ``sha``'s tree and parents and ``message`` (pipemend identity)."""
    with _store(git_dir) as store:
        lines = store.run(["cat-file", "commit", sha]).split(b"\n\n", 1)[0].split(b"\n")
        parents = [ln.split()[1].decode() for ln in lines if ln.startswith(b"parent ")]
        args = ["commit-tree", f"{sha}^{{tree}}", *(a for p in parents for a in ("-p", p)), "-F", "-"]
        return store.run(args, input=message.encode("utf-8")).decode().strip()


class _Builder:
    def __init__(self, store: _Store, base: dict[str, _Entry], algo: str, target_subdir: str,
                 is_editable: Callable[[str], bool], sealed: set[str]):
        self.store, self.base, self.algo = store, base, algo
        self.target = "" if target_subdir in ("", ".") else target_subdir.strip("/")
        self.is_editable, self.sealed = is_editable, sealed
        self.gitlinks = {p for p, e in base.items() if e.mode == _GITLINK}
        self.seen: set[str] = set()
        self.blocked: set[str] = set()
        self.staged: dict[str, tuple[str | None, str | None]] = {}
        self.refusals: list[Refusal] = []
        self.entries = 0
        self.too_many = False

    def refuse(self, path: str, code: str, text: str) -> None:
        self.refusals.append(Refusal(path, code, text))
        if code in (SYMLINK, SPECIAL, UNREADABLE, TOO_DEEP):
            self.blocked.add(path)  # what the base has at or under it stays: the refusal stands for it

    # ---------------------------------------------------------------- the walk

    def walk(self, root: Path) -> None:
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            raise RunFailed(f"candidate worktree {root}: cannot open it ({e.strerror})") from e
        try:
            self._walk_dir(fd, "", 0)
        finally:
            os.close(fd)

    def _walk_dir(self, fd: int, prefix: str, depth: int) -> None:
        try:
            names = sorted(os.listdir(fd))
        except OSError as e:
            self.refuse(prefix.rstrip("/") or ".", UNREADABLE, f"folder cannot be listed ({e.strerror})")
            return
        for name in names:
            if not prefix and name == ".git":
                continue  # the worktree's link to its repo: git's, never read
            self.entries += 1
            if self.entries > MAX_ENTRIES:
                if not self.too_many:
                    self.too_many = True
                    self.refuse(".", TOO_MANY, f"the worktree holds more than {MAX_ENTRIES} files and folders")
                return
            path = prefix + name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError as e:
                self.refuse(path, UNREADABLE, f"cannot be read ({e.strerror})")
                continue
            if stat.S_ISDIR(st.st_mode):
                if path in self.gitlinks:
                    continue  # a submodule of the base: kept as the base has it
                if depth >= MAX_DEPTH:
                    self.refuse(path, TOO_DEEP, f"folders nested more than {MAX_DEPTH} deep are refused")
                    continue
                try:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as e:
                    self.refuse(path, UNREADABLE, f"folder cannot be opened ({e.strerror})")
                    continue
                try:
                    self._walk_dir(sub, path + "/", depth + 1)
                finally:
                    os.close(sub)
                continue
            self.seen.add(path)  # only non-folders: a folder where the base has a file deletes that file
            if stat.S_ISLNK(st.st_mode):
                self._symlink(fd, name, path)
            elif stat.S_ISREG(st.st_mode):
                self._file(fd, name, path)
            else:
                self.refuse(path, SPECIAL, "not a regular file (a device, FIFO or socket): refused")

    def _symlink(self, fd: int, name: str, path: str) -> None:
        entry = self.base.get(path)
        if entry is not None and entry.mode == _SYMLINK:
            try:
                target = os.fsencode(os.readlink(name, dir_fd=fd))
            except OSError:
                target = None
            if target is not None and _blob_id(target, self.algo) == entry.oid:
                return  # the base's own symlink, unchanged
        self.refuse(path, SYMLINK, "symlinks are refused")

    def _file(self, fd: int, name: str, path: str) -> None:
        try:
            ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError as e:
            self.refuse(path, UNREADABLE, f"cannot be opened ({e.strerror})")
            return
        with os.fdopen(ffd, "rb") as f:
            st = os.fstat(ffd)
            if not stat.S_ISREG(st.st_mode):
                self.refuse(path, SPECIAL, "not a regular file: refused")
                return
            mode = _EXECUTABLE if st.st_mode & stat.S_IXUSR else _REGULAR
            entry = self.base.get(path)
            if st.st_size > MAX_FILE_BYTES:
                if entry is not None and entry.mode == mode and entry.size == st.st_size and \
                        self._stream_id(f, st.st_size) == entry.oid:
                    return  # a large base file, unchanged
                self._refuse_change(path, TOO_LARGE, f"changed files over {MAX_FILE_BYTES} bytes are refused")
                return
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            self._refuse_change(path, TOO_LARGE, f"changed files over {MAX_FILE_BYTES} bytes are refused")
            return
        oid = _blob_id(data, self.algo)
        if entry is not None and entry.oid == oid and entry.mode == mode:
            return
        if not self._may_change(path, "added" if entry is None else "changed"):
            return
        if b"\0" in data:
            self.refuse(path, BINARY, "binary content (a NUL byte) is refused")
            return
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.refuse(path, BINARY, f"content that is not UTF-8 text is refused (byte {e.start})")
            return
        written = self.store.write_blob(data)
        if written != oid:
            raise RunFailed(f"{path}: git stored blob {written}, expected {oid}")
        self.staged[path] = (mode, oid)

    def _stream_id(self, f, size: int) -> str:
        h = hashlib.new(self.algo)
        h.update(b"blob %d\0" % size)
        read = 0
        while chunk := f.read(1 << 20):
            h.update(chunk)
            read += len(chunk)
        return h.hexdigest() if read == size else ""

    # ---------------------------------------------------------------- what may change

    def _may_change(self, path: str, what: str) -> bool:
        """Whether a change to ``path`` (added, changed, deleted) may enter the commit; refuses it if not."""
        if _under(path, self.sealed):
            self.refuse(path, SEALED, f"sealed file {what}: sealed files are never part of a candidate")
            return False
        if self.target and not path.startswith(self.target + "/"):
            self.refuse(path, OUTSIDE, f"{what} outside the target folder {self.target}/")
            return False
        why = _bad_name(path)
        if why:
            self.refuse(path, BAD_NAME, f"{what}, but {why}")
            return False
        rel = path[len(self.target) + 1:] if self.target else path
        if any(part.startswith(".") for part in PurePosixPath(rel).parts):
            self.refuse(path, HIDDEN, f"dot-file or dot-folder {what}: candidates may not add or change them")
            return False
        if not self.is_editable(path):
            self.refuse(path, NOT_EDITABLE, f"{what}, but it is not an editable path")
            return False
        return True

    def _refuse_change(self, path: str, code: str, text: str) -> None:
        if self._may_change(path, "added" if path not in self.base else "changed"):
            self.refuse(path, code, text)

    def deletions(self) -> None:
        for path, entry in sorted(self.base.items()):
            if path in self.seen or entry.mode == _GITLINK or _under(path, self.blocked):
                continue
            if _under(path, self.sealed):
                continue  # sealed files are absent from candidate worktrees by design: the base's copy stays
            if self._may_change(path, "deleted"):
                self.staged[path] = (None, None)


# --------------------------------------------------------------------------- an exact checkout


def checkout_exact(*, git_dir: Path, worktree: Path, sha: str, without: Collection[str] = ()) -> list[str]:
    """Write commit ``sha``'s files into the freshly added (``--no-checkout``) ``worktree``, byte for byte,
    leaving ``without`` paths (files, or folders meaning every file under them) off the disk; returns the
    repo-relative paths left out.

    Then two checks, ``RunFailed`` if either fails: the worktree, walked as ``build_candidate`` walks it,
    holds exactly the commit (less ``without``); and ``git status`` lists nothing but content that the
    user's own clean filter or eol attributes would store differently from the blob (git cannot be told to
    ignore in-tree attributes before 2.40; the bytes were just checked against the blobs)."""
    worktree = Path(worktree)
    with _store(git_dir) as store:
        entries = store.ls_tree(sha)
        hidden = sorted(p for p in entries if _under(p, without))
        _write_tree_files(store, worktree, entries, set(hidden))
        check = _Builder(store, entries, "sha256" if len(sha) == 64 else "sha1", "", lambda p: False, set(hidden))
        check.walk(worktree)
        check.deletions()
        if check.refusals or check.staged:
            found = "; ".join(str(r) for r in check.refusals[:5]) or ", ".join(sorted(check.staged)[:5])
            raise RunFailed(f"worktree {worktree} does not hold exactly commit {sha}: {found}")
    run_git(worktree, ["read-tree", sha])
    if hidden:
        run_git(worktree, ["update-index", "--skip-worktree", "-z", "--stdin"],
                input=b"".join(os.fsencode(p) + b"\0" for p in hidden))
    run_git(worktree, ["update-index", "-q", "--refresh"])
    status = run_git(worktree, ["status", "--porcelain=v1", "-z", "--untracked-files=all", "--ignore-submodules=none"])
    unexpected = [rec for rec in status.split(b"\0") if rec and not rec.startswith(b" M ")]
    if unexpected:
        shown = b"; ".join(unexpected[:10]).decode("utf-8", "replace")
        raise RunFailed(f"worktree {worktree} is not a clean checkout of {sha}: git status shows {shown}")
    return hidden


def _write_tree_files(store: _Store, worktree: Path, entries: dict[str, _Entry], hidden: set[str]) -> None:
    reader = store.blobs()
    try:
        for path, entry in sorted(entries.items()):
            if path in hidden:
                continue
            dest = worktree / path
            _make_parents(worktree, PurePosixPath(path).parent)
            if entry.mode == _GITLINK:
                dest.mkdir(exist_ok=True)
            elif entry.mode == _SYMLINK:
                os.symlink(reader.read(entry.oid), os.fsencode(dest))
            else:
                perm = 0o777 if entry.mode == _EXECUTABLE else 0o666
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, perm)
                with os.fdopen(fd, "wb") as f:
                    reader.copy(entry.oid, f)
    finally:
        reader.close()


def _make_parents(root: Path, rel: PurePosixPath) -> None:
    """Create ``root/rel`` folder by folder, refusing to pass through anything but a real folder."""
    cur = root
    for part in rel.parts:
        cur = cur / part
        try:
            os.mkdir(cur)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                raise RunFailed(f"{cur}: the commit's tree puts a file where a folder goes") from None
