"""Snapshot a target into git, and one worktree per candidate.

If the target lives in a git repo, the run's branches are made in *that* repo
(so a reviewer sees them with ``git branch``); the base branch is its HEAD plus
the uncommitted and untracked (non-ignored) files under the target folder,
built through a temporary index so the user's working tree, index and current
branch are never touched. A target outside any repo is snapshotted into a bare
repo under ``RUN_DIR/repo``.

Every git call goes through gitpython (or, where bytes matter, ``candidate.run_git``)
with hooks disabled, signing off and a fixed pipemend identity, so a user's git
configuration cannot make a run fail. Candidate commits are built by
``build_candidate`` and worktrees checked out by ``checkout_exact`` (``candidate.py``):
the tree that is checked is the tree that is evaluated and the tree that is kept.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import git

from ..errors import UsageError
from .candidate import IDENTITY, CandidateTree, Refusal, build_candidate, checkout_exact, reword_commit

__all__ = ["CandidateTree", "Refusal", "Snapshot", "snapshot_target"]

SNAPSHOT_FORMAT = "pipemend-snapshot-1"

_IDENTITY = IDENTITY
_CONFIG = ["-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false", "-c", "core.quotepath=false",
           "-c", "core.fsmonitor=false"]
# What a snapshot repo of a non-git target leaves out (a user's repo has its own .gitignore).
_DEFAULT_EXCLUDES = "__pycache__/\n*.pyc\n.venv/\n.pipemend-cache/\n.pytest_cache/\n"


def _git(cwd: Path, *args: str, env: dict[str, str] | None = None, git_dir: Path | None = None) -> str:
    """Run ``git <args>`` in ``cwd`` (through gitpython) and return stripped stdout."""
    cmd = ["git", *_CONFIG]
    if git_dir is not None:
        cmd += [f"--git-dir={git_dir}", f"--work-tree={cwd}"]
    full_env = dict(_IDENTITY)
    if env:
        full_env.update(env)
    return git.Git(str(cwd)).execute(cmd + list(args), env=full_env)


@contextmanager
def _temp_index() -> Iterator[dict[str, str]]:
    """A throwaway index file, so the snapshot commit never touches a user's index."""
    with tempfile.TemporaryDirectory(prefix="pipemend-index-") as d:
        yield {"GIT_INDEX_FILE": str(Path(d) / "index")}


@dataclass
class Snapshot:
    """The run's git repo, where the target sits in it, and where candidate worktrees go."""

    repo: Path
    """Git repo holding the run's branches: the user's repo, or ``RUN_DIR/repo`` (bare)."""
    target_subdir: str
    """Target folder relative to the repo root ('' if the root)."""
    run_id: str
    base_branch: str
    """``pipemend/<run-id>/base``."""
    worktrees_dir: Path
    """``RUN_DIR/worktrees``: one folder per live candidate worktree."""

    # ------------------------------------------------------------------ worktrees

    def add_worktree(self, name: str, ref: str, *, without: Collection[str] = ()) -> Path:
        """A new worktree at ``worktrees_dir/name``, detached at ``ref``; a stale one there is replaced.

        It holds exactly the commit's blobs, byte for byte (no smudge filter or eol conversion from
        ``.gitattributes``), except the repo-relative ``without`` paths (files, or folders meaning every
        file under them), which are not on disk at all: sealed label files for a candidate or evaluation
        worktree. Git still reports the worktree clean (those paths carry skip-worktree in this
        worktree's own index); ``RunFailed`` if it does not."""
        if not name or "/" in name or name in (".", ".."):
            raise UsageError(f"worktree name {name!r} must be a single path component")
        path = self.worktrees_dir / name
        if path.exists() or self._registered(path):
            self.remove_worktree(path)
        self.worktrees_dir.mkdir(parents=True, exist_ok=True)
        sha = self.resolve(ref)
        _git(self.repo, "worktree", "add", "--detach", "--no-checkout", "--quiet", str(path), sha)
        checkout_exact(git_dir=self.git_dir(), worktree=path, sha=sha, without=without)
        return path

    def remove_worktree(self, path: Path) -> None:
        """Remove a worktree (its branch or ref, if any, stays). Missing worktrees are fine."""
        path = Path(path)
        if self._registered(path):
            try:
                _git(self.repo, "worktree", "remove", "--force", "--force", str(path))
            except git.GitCommandError:
                pass
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        _git(self.repo, "worktree", "prune")

    def prune(self) -> None:
        """Remove this run's leftover worktrees (after a crash): registered ones and stray folders, and
        the ref lock files a killed git left under this run's refs."""
        self.clear_stale_ref_locks()
        root = self.worktrees_dir.resolve()
        for wt in self._worktree_paths():
            if wt.parent == root:
                self.remove_worktree(wt)
        if self.worktrees_dir.is_dir():
            for child in self.worktrees_dir.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
        _git(self.repo, "worktree", "prune")

    def clear_stale_ref_locks(self) -> list[Path]:
        """Delete ``*.lock`` files under ``refs/heads/pipemend/<run>/`` and ``refs/pipemend/<run>/``.

        A git killed inside ``update-ref`` leaves ``<ref>.lock`` behind and every later update of that
        ref fails. Only this run's driver writes these refs, and it holds the run lock, so a lock file
        found there when the run starts or resumes is stale."""
        common = self.git_dir()
        removed = []
        for namespace in (f"refs/heads/pipemend/{self.run_id}", f"refs/pipemend/{self.run_id}"):
            folder = common / namespace
            if folder.is_dir():
                for lock in sorted(folder.rglob("*.lock")):
                    lock.unlink(missing_ok=True)
                    removed.append(lock)
        return removed

    # ------------------------------------------------------------------ commits and refs

    def build_candidate(self, worktree: Path, base_sha: str, *, message: str, is_editable: Callable[[str], bool],
                        sealed: Collection[str]) -> CandidateTree:
        """The candidate commit for ``worktree``: ``base_sha``'s tree plus the worktree's acceptable changes.

        Built in a fresh temporary index from the files on disk alone (the worktree's index, flags,
        ``.gitignore`` and ``.gitattributes`` are never read; git never runs inside it). Paths are
        repo-relative: ``is_editable(path)`` says whether a change there may be kept (the caller's
        editable-and-not-protected globs); ``sealed`` paths (files, or folders) keep the base's blob and
        may be absent. Every other change is a ``Refusal`` (symlink, special_file, outside_target,
        not_editable, sealed, binary, hidden, bad_name, too_large, ...) and the commit keeps the base's
        version there. ``sha`` is ``None`` when the commit would equal the base; the author and committer
        are "pipemend <pipemend@localhost>"; ``diff`` is ``git diff`` base..candidate with attributes,
        textconv and external drivers off and text forced (``pipemend.diffs.parse_diff`` reads it)."""
        return build_candidate(git_dir=self.git_dir(), worktree=Path(worktree), base_sha=base_sha,
                               target_subdir=self.target_subdir, message=message, is_editable=is_editable,
                               sealed=sealed)

    def reword(self, sha: str, message: str) -> str:
        """A commit with exactly ``sha``'s tree and parents and a new message (e.g. the verdict, known only
        after the candidate commit was evaluated); returns its sha."""
        return reword_commit(git_dir=self.git_dir(), sha=self.resolve(sha), message=message)

    def git_dir(self) -> Path:
        """The repo's common git directory (objects and refs), absolute."""
        common = Path(_git(self.repo, "rev-parse", "--git-common-dir"))
        return (common if common.is_absolute() else self.repo / common).resolve()

    def set_branch(self, name: str, sha: str) -> None:
        """Create or move ``refs/heads/<name>`` to ``sha``."""
        try:
            _git(self.repo, "check-ref-format", "--branch", name)
        except git.GitCommandError as e:
            raise UsageError(f"{name!r} is not a valid branch name") from e
        _git(self.repo, "update-ref", f"refs/heads/{name}", sha)

    def set_ref(self, ref: str, sha: str) -> None:
        """Create or move any ref, e.g. ``refs/pipemend/<run>/rejected/3``."""
        if not ref.startswith("refs/"):
            raise UsageError(f"ref {ref!r} must start with 'refs/'")
        _git(self.repo, "update-ref", ref, sha)

    def resolve(self, ref: str) -> str:
        """The commit sha a ref or branch names."""
        return _git(self.repo, "rev-parse", "--verify", f"{ref}^{{commit}}")

    def tree_of(self, ref: str) -> str:
        """The tree id of a commit: what two commits with the same files share, whatever their messages."""
        return _git(self.repo, "rev-parse", "--verify", f"{ref}^{{tree}}")

    def show(self, ref: str, path: str) -> str:
        """The text of repo-relative ``path`` in commit ``ref`` (raises when absent)."""
        return _git(self.repo, "show", f"{ref}:{path}")

    def delete_ref(self, ref: str) -> None:
        """Remove a ref (``refs/...``) if it exists."""
        if not ref.startswith("refs/"):
            raise UsageError(f"ref {ref!r} must start with 'refs/'")
        _git(self.repo, "update-ref", "-d", ref)

    def refs(self, prefix: str) -> dict[str, str]:
        """Every ref under ``prefix`` (e.g. ``refs/heads/pipemend/<run>/``) with the commit it points at."""
        out = _git(self.repo, "for-each-ref", "--format=%(refname) %(objectname)", prefix)
        return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())

    # ------------------------------------------------------------------ persistence

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "repo": str(self.repo),
            "target_subdir": self.target_subdir,
            "run_id": self.run_id,
            "base_branch": self.base_branch,
            "worktrees_dir": str(self.worktrees_dir),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Snapshot":
        if d.get("format") != SNAPSHOT_FORMAT:
            raise UsageError(f"snapshot record has format {d.get('format')!r}, expected {SNAPSHOT_FORMAT!r}")
        return cls(
            repo=Path(d["repo"]),
            target_subdir=d["target_subdir"],
            run_id=d["run_id"],
            base_branch=d["base_branch"],
            worktrees_dir=Path(d["worktrees_dir"]),
        )

    # ------------------------------------------------------------------ internals

    def _worktree_paths(self) -> list[Path]:
        out = _git(self.repo, "worktree", "list", "--porcelain")
        return [Path(line[len("worktree "):]).resolve() for line in out.splitlines() if line.startswith("worktree ")]

    def _registered(self, path: Path) -> bool:
        return Path(path).resolve() in self._worktree_paths()


# --------------------------------------------------------------------------- making a snapshot


def snapshot_target(target_dir: Path, run_id: str, run_dir: Path) -> Snapshot:
    """Make the run's base branch ``pipemend/<run-id>/base`` from the target, touching nothing of the user's."""
    target_dir = Path(target_dir).resolve()
    run_dir = Path(run_dir).resolve()
    if not target_dir.is_dir():
        raise UsageError(f"target {target_dir} is not a folder")
    base_branch = f"pipemend/{run_id}/base"
    try:
        _git(Path.cwd(), "check-ref-format", "--branch", base_branch)
    except git.GitCommandError as e:
        raise UsageError(f"run id {run_id!r} cannot be part of a git branch name") from e
    user_repo = _enclosing_repo(target_dir)
    if user_repo is not None:
        subdir = target_dir.relative_to(user_repo).as_posix()
        subdir = "" if subdir == "." else subdir
        sha = _commit_from_user_repo(user_repo, subdir, run_id)
        repo = user_repo
    else:
        repo = run_dir / "repo"
        subdir = ""
        sha = _commit_into_snapshot_repo(repo, target_dir, run_id)
    snap = Snapshot(repo, subdir, run_id, base_branch, run_dir / "worktrees")
    snap.set_branch(base_branch, sha)
    return snap


def _enclosing_repo(target_dir: Path) -> Path | None:
    """The root of the git repo holding ``target_dir``, unless the target is git-ignored there."""
    try:
        repo = git.Repo(target_dir, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    if repo.bare or repo.working_tree_dir is None:
        return None
    root = Path(repo.working_tree_dir).resolve()
    if root != target_dir:
        try:
            _git(root, "check-ignore", "-q", "--no-index", target_dir.relative_to(root).as_posix())
            return None  # the target is ignored by its repo: treat it as outside any repo
        except git.GitCommandError:
            pass
    return root


def _has_head(cwd: Path, git_dir: Path | None = None) -> bool:
    try:
        _git(cwd, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", git_dir=git_dir)
        return True
    except git.GitCommandError:
        return False


def _commit_from_user_repo(root: Path, subdir: str, run_id: str) -> str:
    """HEAD plus the working-tree state under ``subdir``, committed without touching index or HEAD."""
    has_head = _has_head(root)
    with _temp_index() as env:
        if has_head:
            _git(root, "read-tree", "HEAD", env=env)
        _git(root, "add", "--all", "--", subdir or ".", env=env)
        tree = _git(root, "write-tree", env=env)
    parents = ["-p", "HEAD"] if has_head else []
    msg = f"pipemend {run_id}: snapshot of {subdir or 'the repo root'} (HEAD + uncommitted changes)"
    return _git(root, "commit-tree", tree, *parents, "-m", msg)


def _commit_into_snapshot_repo(repo: Path, target_dir: Path, run_id: str) -> str:
    """A bare repo at ``repo`` whose first commit is the target folder's files."""
    if not (repo / "HEAD").exists():
        repo.mkdir(parents=True, exist_ok=True)
        _git(repo, "init", "--quiet", "--bare")
        (repo / "info").mkdir(exist_ok=True)
        (repo / "info" / "exclude").write_text(_DEFAULT_EXCLUDES, encoding="utf-8")
    with _temp_index() as env:
        _git(target_dir, "add", "--all", ".", env=env, git_dir=repo)
        tree = _git(target_dir, "write-tree", env=env, git_dir=repo)
    sha = _git(repo, "commit-tree", tree, "-m", f"pipemend {run_id}: snapshot of {target_dir}")
    _git(repo, "symbolic-ref", "HEAD", f"refs/heads/pipemend/{run_id}/base")
    return sha

