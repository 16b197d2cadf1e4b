"""Which files of a target are sealed: unreadable by the pipeline, absent from candidate worktrees and proposers.

"Protected" only means "not editable"; "sealed" means "not readable". The
label seal needs more than the dataset file: anything from which labels can be
derived (a seeded generator, a copy of the data, a link to it) must be sealed
too. ``plan_seals`` decides, from the manifest and the target folder, and
``Manifest.sealed_paths`` is the one entry point the rest of pipemend calls.

Sealed, always (``declared``):
- the dataset files (``dataset.path`` or ``dataset.files``) and a custom metric file;
- every file matched by a ``sealed`` glob.

Sealed (``declared``) unless matched by a ``runtime`` glob: the evidence corpus (``dataset.corpus``); a
pipeline that retrieves from it declares it ``runtime`` and reads it.

Sealed by default, unless matched by a ``runtime`` glob (flagged, so a person sees why):
- every file inside the dataset's folder, when that folder is not the target's root
  (a corpus beside the questions must be declared ``runtime`` to stay readable);
- every file whose bytes contain a dataset file's name (e.g. ``questions.jsonl``):
  that is how a generator that writes the dataset is detected; compiled ``.pyc``
  files are scanned too;
- every file with a dataset file's name, or with a dataset file's exact content
  (a copy, e.g. a run directory's frozen data inside the target);
- every symlink that leaves the target folder.

Sealed whatever ``runtime`` says (a ``runtime`` glob that matches one is a ``ConfigError``):
- a symlink (to a file or a folder) that leads to a sealed file, a hard link to
  one, and the file inside the target that a sealed symlink points at.

A file can never be both sealed and editable, nor be the entrypoint's module:
both are a ``ConfigError`` naming the manifest, the key and what to do.
``.git``, ``.venv`` and ``node_modules`` folders are not walked.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from .errors import ConfigError
from .fsutil import open_regular
from .globs import glob_match

SKIP_DIRS = frozenset({".git", ".venv", "node_modules"})
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Seal:
    """One sealed path of a target: ``path`` relative to the target folder (POSIX), why, and whether the
    manifest named it (dataset, metric, a ``sealed`` glob) or pipemend sealed it by default."""

    path: str
    reason: str
    declared: bool


# --------------------------------------------------------------------------- the target's tree, never following links


@dataclass
class _Tree:
    root: Path
    files: dict[str, os.stat_result]
    """Regular files (lstat)."""
    links: set[str]
    """Symlinks, to files or folders (never followed by the walk)."""

    def entries(self) -> set[str]:
        return set(self.files) | self.links


def _walk(root: Path) -> _Tree:
    files: dict[str, os.stat_result] = {}
    links: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        kept = []
        for d in dirnames:
            rel = d if rel_dir == "." else f"{rel_dir}/{d}"
            if os.path.islink(os.path.join(dirpath, d)):
                links.add(rel)
            elif d not in SKIP_DIRS:
                kept.append(d)
        dirnames[:] = kept
        for f in filenames:
            rel = f if rel_dir == "." else f"{rel_dir}/{f}"
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                links.add(rel)
            elif stat.S_ISREG(st.st_mode):
                files[rel] = st
    return _Tree(root, files, links)


def _matches(entries: Iterable[str], pattern: str) -> set[str]:
    """Entries the glob names, or that lie inside a folder it names (as ``protected`` globs work)."""
    return {e for e in entries if glob_match(e, pattern)}


def _norm(rel: str) -> str | None:
    if not rel or PurePosixPath(rel).is_absolute():
        return None
    n = posixpath.normpath(rel)
    return None if n == ".." or n.startswith("../") else n


# --------------------------------------------------------------------------- reading files, without following links


def _open_regular(path: Path) -> int | None:
    try:
        return open_regular(path)
    except OSError:
        return None


def _contains_any(path: Path, needles: list[bytes]) -> bytes | None:
    fd = _open_regular(path)
    if fd is None or not needles:
        if fd is not None:
            os.close(fd)
        return None
    keep = max(len(n) for n in needles) - 1
    tail = b""
    try:
        while chunk := os.read(fd, _CHUNK):
            buf = tail + chunk
            for n in needles:
                if n in buf:
                    return n
            tail = buf[-keep:] if keep else b""
    finally:
        os.close(fd)
    return None


def _sha256(path: Path) -> str | None:
    fd = _open_regular(path)
    if fd is None:
        return None
    h = hashlib.sha256()
    try:
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


# --------------------------------------------------------------------------- the plan


def dataset_files(manifest: Any) -> list[str]:
    """The dataset files the manifest names, target-relative, normalized."""
    ds = manifest.dataset
    raw = [ds.path] if ds.path else []
    if ds.files is not None:
        raw += [ds.files.train, ds.files.val, ds.files.test]
    return list(dict.fromkeys(n for n in map(_norm, raw) if n))


def metric_files(manifest: Any) -> list[str]:
    """The custom metric files (a weighted metric may name several), target-relative, normalized."""
    return [n for n in map(_norm, manifest.metric_files()) if n]


class _Planner:
    def __init__(self, manifest: Any, target_dir: Path, manifest_name: str):
        self.m = manifest
        self.mp = target_dir / manifest_name
        self.manifest_name = manifest_name
        self.root = target_dir.resolve()
        self.tree = _walk(self.root)
        self.entries = self.tree.entries()
        self.seals: dict[str, Seal] = {}
        self.runtime = self._globs("runtime", manifest.runtime)

    def _globs(self, key: str, globs: list[str]) -> dict[int, set[str]]:
        out = {}
        for i, g in enumerate(globs):
            hits = _matches(self.entries, g)
            if not hits:
                raise ConfigError(self.mp, f"{key}[{i}]", f"glob {g!r} matches no file in {self.root}",
                                  "a glob that matches at least one file (or remove it)")
            out[i] = hits
        return out

    def _runtime_key(self, rel: str) -> str | None:
        for i, hits in self.runtime.items():
            if rel in hits:
                return f"runtime[{i}]"
        return None

    def seal(self, rel: str, reason: str, declared: bool, *, overrides_runtime: bool) -> bool:
        if rel in self.seals:
            return False
        key = self._runtime_key(rel)
        if key is not None:
            if not overrides_runtime:
                return False
            i = int(key[len("runtime["):-1])
            raise ConfigError(self.mp, key, f"glob {self.m.runtime[i]!r} matches {rel}, which is always sealed ({reason})",
                              "runtime globs that match only files the pipeline must read (a corpus, a model file)")
        self.seals[rel] = Seal(rel, reason, declared)
        return True

    def _dest(self, rel: str) -> str | None:
        """Where a link leads, target-relative; None when it leaves the target (or loops)."""
        try:
            dest = (self.root / rel).resolve()
        except (OSError, RuntimeError):
            return None
        if dest == self.root:
            return "."
        try:
            return dest.relative_to(self.root).as_posix()
        except ValueError:
            return None

    def plan(self) -> list[Seal]:
        ds = dataset_files(self.m)
        for rel in ds:
            self.seal(rel, "the dataset (labels)", True, overrides_runtime=True)
        for metric in metric_files(self.m):
            self.seal(metric, "the custom metric", True, overrides_runtime=True)
        corpus = _norm(self.m.dataset.corpus or "")
        if corpus:
            self.seal(corpus, "the evidence corpus (dataset.corpus)", True, overrides_runtime=False)
        for i, hits in self._globs("sealed", self.m.sealed).items():
            for rel in sorted(hits):
                key = self._runtime_key(rel)
                if key is not None:
                    raise ConfigError(self.mp, f"sealed[{i}]", f"glob {self.m.sealed[i]!r} matches {rel}, which {key} declares read at run time",
                                      "a file either sealed or runtime, not both")
                self.seal(rel, f"sealed by {self.m.sealed[i]!r}", True, overrides_runtime=True)
        self._by_default(ds)
        self._links_and_copies()
        self._check_conflicts()
        return [self.seals[k] for k in sorted(self.seals)]

    def _by_default(self, ds: list[str]) -> None:
        names = {PurePosixPath(rel).name for rel in ds}
        folders = {posixpath.dirname(rel) for rel in ds} - {""}
        present = [rel for rel in ds if rel in self.tree.files]
        sizes = {self.tree.files[rel].st_size for rel in present}
        digests = {d for d in (_sha256(self.root / rel) for rel in present) if d}
        needles = sorted({n.encode("utf-8") for n in names})
        for rel in sorted(self.entries):
            if rel in self.seals or rel == self.manifest_name:
                continue
            folder = next((f for f in folders if rel.startswith(f + "/")), None)
            if folder is not None:
                self.seal(rel, f"inside the dataset's folder {folder}/", False, overrides_runtime=False)
            elif PurePosixPath(rel).name in names:
                self.seal(rel, "has a dataset file's name (a copy of the data?)", False, overrides_runtime=False)
            elif rel in self.tree.files:
                st = self.tree.files[rel]
                if st.st_size in sizes and _sha256(self.root / rel) in digests:
                    self.seal(rel, "has a dataset file's exact content", False, overrides_runtime=False)
                elif hit := _contains_any(self.root / rel, needles):
                    name = hit.decode("utf-8", "replace")
                    self.seal(rel, f"names the dataset file {name} (does it write the dataset?)", False, overrides_runtime=False)

    def _links_and_copies(self) -> None:
        changed = True
        while changed:  # a link to a link to a sealed file: repeat until nothing new is sealed
            changed = False
            for rel in [r for r in sorted(self.seals) if r in self.tree.links]:
                dest = self._dest(rel)
                if dest not in (None, ".") and dest in self.entries:
                    changed |= self.seal(dest, f"where the sealed link {rel} points", False, overrides_runtime=True)
            for rel in sorted(self.tree.links - set(self.seals)):
                dest = self._dest(rel)
                if dest is None:
                    changed |= self.seal(rel, "a symlink that leaves the target folder", False, overrides_runtime=False)
                    continue
                hit = next((s for s in sorted(self.seals) if dest == "." or s == dest or s.startswith(dest + "/")), None)
                if hit is not None:
                    changed |= self.seal(rel, f"a symlink to the sealed {hit}", False, overrides_runtime=True)
            inodes = {(st.st_dev, st.st_ino): rel for rel, st in self.tree.files.items() if rel in self.seals}
            for rel, st in sorted(self.tree.files.items()):
                if rel not in self.seals and st.st_nlink > 1 and (st.st_dev, st.st_ino) in inodes:
                    changed |= self.seal(rel, f"a hard link to the sealed {inodes[(st.st_dev, st.st_ino)]}", False, overrides_runtime=True)

    def _check_conflicts(self) -> None:
        for i, g in enumerate(self.m.editable):
            for rel in sorted(_matches(self.seals, g)):
                s = self.seals[rel]
                raise ConfigError(self.mp, f"editable[{i}]", f"glob {g!r} matches {rel}, which is sealed ({s.reason})",
                                  "a sealed file that no editable glob matches: declare it under `runtime` if the pipeline "
                                  "must read it and it cannot derive labels, or move it out of the target folder")
        mod = self.m.entrypoint.split(":", 1)[0].replace(".", "/")
        for rel in (f"{mod}.py", f"{mod}/__init__.py"):
            if rel in self.seals:
                raise ConfigError(self.mp, "entrypoint", f"the entrypoint's module {rel} is sealed ({self.seals[rel].reason})",
                                  "an entrypoint module the pipeline can read: declare it under `runtime`, or move what it must not hold out of it")


def plan_seals(manifest: Any, target_dir: str | Path, *, manifest_name: str) -> list[Seal]:
    """Every sealed path of the target (see the module's docstring for the rules), sorted by path.

    Paths are target-relative POSIX paths of regular files and of symlinks
    (by their own path: a link is sealed, never followed). Raises ``ConfigError``
    for a ``sealed``/``runtime`` glob that matches nothing or climbs out, a
    ``runtime`` glob that matches an always-sealed file, and a sealed file that
    is editable or is the entrypoint's module.
    """
    return _Planner(manifest, Path(target_dir), manifest_name).plan()
