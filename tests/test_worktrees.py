"""Snapshot and worktrees against real git repos."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from pipemend.errors import UsageError
from pipemend.sandbox.worktrees import Snapshot, snapshot_target


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (the .git folder included) with its content hash."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def user_repo(tmp_path: Path) -> Path:
    """A user's repo with a target folder holding committed, modified, deleted, untracked and ignored files."""
    repo = tmp_path / "proj"
    (repo / "pipes" / "qa").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "User")
    git(repo, "config", "user.email", "user@example.com")
    (repo / ".gitignore").write_text("*.log\n")
    (repo / "README.md").write_text("top\n")
    (repo / "pipes" / "qa" / "prompt.txt").write_text("v1\n")
    (repo / "pipes" / "qa" / "gone.py").write_text("x = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    # uncommitted work: a modification, a deletion, an untracked file, an ignored file, a staged change outside
    (repo / "pipes" / "qa" / "prompt.txt").write_text("v2 uncommitted\n")
    (repo / "pipes" / "qa" / "gone.py").unlink()
    (repo / "pipes" / "qa" / "new.py").write_text("y = 2\n")
    (repo / "pipes" / "qa" / "debug.log").write_text("ignored\n")
    (repo / "README.md").write_text("top, staged edit outside the target\n")
    git(repo, "add", "README.md")
    return repo


def test_snapshot_in_user_repo_takes_uncommitted_work_and_touches_nothing(user_repo: Path, tmp_path: Path):
    before = tree_digest(user_repo)
    head, branch, status = git(user_repo, "rev-parse", "HEAD"), git(user_repo, "branch", "--show-current"), git(
        user_repo, "status", "--porcelain"
    )

    snap = snapshot_target(user_repo / "pipes" / "qa", "r1", tmp_path / "run")

    assert snap.repo == user_repo.resolve()
    assert snap.target_subdir == "pipes/qa"
    assert snap.base_branch == "pipemend/r1/base"
    base = "pipemend/r1/base"
    files = git(user_repo, "ls-tree", "-r", "--name-only", base).splitlines()
    assert "pipes/qa/new.py" in files  # untracked, not ignored
    assert "pipes/qa/gone.py" not in files  # deleted
    assert "pipes/qa/debug.log" not in files  # ignored
    assert git(user_repo, "show", f"{base}:pipes/qa/prompt.txt") == "v2 uncommitted"
    # outside the target: HEAD's version, not the staged edit
    assert git(user_repo, "show", f"{base}:README.md") == "top"
    assert git(user_repo, "rev-parse", f"{base}^") == head

    # the user's working tree, index (.git/index is in the digest), HEAD and branch are untouched
    after = tree_digest(user_repo)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    allowed = (".git/objects/", ".git/refs/heads/pipemend/", ".git/logs/refs/heads/pipemend/")
    assert all(k.startswith(allowed) for k in changed), changed
    assert ".git/index" not in changed
    assert git(user_repo, "rev-parse", "HEAD") == head
    assert git(user_repo, "branch", "--show-current") == branch
    assert git(user_repo, "status", "--porcelain") == status


def test_target_at_repo_root_and_unborn_head(tmp_path: Path):
    repo = tmp_path / "fresh"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("a\n")
    snap = snapshot_target(repo, "r2", tmp_path / "run")
    assert snap.target_subdir == ""
    assert git(repo, "ls-tree", "-r", "--name-only", "pipemend/r2/base").splitlines() == ["a.py"]
    assert git(repo, "status", "--porcelain") == "?? a.py"


def test_target_outside_any_repo_gets_a_snapshot_repo(tmp_path: Path):
    target = tmp_path / "plain"
    (target / "__pycache__").mkdir(parents=True)
    (target / "pipe.py").write_text("def run(x): return x\n")
    (target / "__pycache__" / "pipe.cpython-311.pyc").write_bytes(b"\0")
    before = tree_digest(target)

    snap = snapshot_target(target, "r3", tmp_path / "run")

    assert snap.repo == (tmp_path / "run" / "repo").resolve()
    assert snap.target_subdir == ""
    assert git(snap.repo, "ls-tree", "-r", "--name-only", "pipemend/r3/base").splitlines() == ["pipe.py"]
    assert not (target / ".git").exists()
    assert tree_digest(target) == before


def test_target_ignored_by_its_repo_is_treated_as_outside(tmp_path: Path):
    repo = tmp_path / "host"
    (repo / "scratch" / "t").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text("scratch/\n")
    (repo / "scratch" / "t" / "p.py").write_text("p\n")
    snap = snapshot_target(repo / "scratch" / "t", "r4", tmp_path / "run")
    assert snap.repo == (tmp_path / "run" / "repo").resolve()
    assert git(snap.repo, "ls-tree", "-r", "--name-only", "pipemend/r4/base").splitlines() == ["p.py"]


def test_worktree_add_edit_build_branch_remove(user_repo: Path, tmp_path: Path):
    snap = snapshot_target(user_repo / "pipes" / "qa", "r5", tmp_path / "run")
    wt = snap.add_worktree("cand-1", snap.base_branch)
    assert wt == snap.worktrees_dir / "cand-1"
    assert (wt / "pipes" / "qa" / "prompt.txt").read_text() == "v2 uncommitted\n"
    assert git(wt, "status", "--porcelain") == ""

    (wt / "pipes" / "qa" / "prompt.txt").write_text("v3\n")
    (wt / "pipes" / "qa" / "new.py").unlink()
    (wt / "pipes" / "qa" / "extra.txt").write_text("brand new\n")
    index_before = Path(git(wt, "rev-parse", "--path-format=absolute", "--git-path", "index")).read_bytes()

    tree = snap.build_candidate(wt, snap.resolve(snap.base_branch), message="candidate 1\n",
                                is_editable=lambda _path: True, sealed=())
    assert tree.changed == ["pipes/qa/extra.txt", "pipes/qa/new.py", "pipes/qa/prompt.txt"]
    d = tree.diff
    assert "+brand new" in d and "-v2 uncommitted" in d and "+v3" in d and "deleted file mode" in d
    # building the commit does not stage anything in the worktree
    assert Path(git(wt, "rev-parse", "--path-format=absolute", "--git-path", "index")).read_bytes() == index_before

    sha = tree.sha
    assert sha and snap.build_candidate(wt, sha, message="m\n", is_editable=lambda _path: True, sealed=()).sha is None
    snap.set_branch("pipemend/r5/cand-1", sha)
    snap.set_ref("refs/pipemend/r5/rejected/1", sha)
    assert snap.resolve("pipemend/r5/cand-1") == sha
    assert git(user_repo, "rev-parse", "refs/pipemend/r5/rejected/1") == sha
    assert git(user_repo, "show", f"{sha}:pipes/qa/prompt.txt") == "v3"
    assert git(user_repo, "log", "-1", "--format=%an", sha) == "pipemend"

    snap.remove_worktree(wt)
    assert not wt.exists()
    assert str(wt) not in git(user_repo, "worktree", "list")
    assert snap.resolve("pipemend/r5/cand-1") == sha  # the branch outlives its worktree
    assert git(user_repo, "branch", "--show-current") == "main"


def test_commit_ignores_the_users_hooks(user_repo: Path, tmp_path: Path):
    hook = user_repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)
    snap = snapshot_target(user_repo / "pipes" / "qa", "r6", tmp_path / "run")
    wt = snap.add_worktree("c", snap.base_branch)
    (wt / "pipes" / "qa" / "x").write_text("x\n")
    assert snap.build_candidate(wt, snap.resolve(snap.base_branch), message="m\n", is_editable=lambda _path: True,
                                sealed=()).sha


def test_prune_cleans_a_crashed_runs_worktrees(tmp_path: Path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "p.py").write_text("p\n")
    snap = snapshot_target(target, "r7", tmp_path / "run")
    a = snap.add_worktree("a", snap.base_branch)
    b = snap.add_worktree("b", snap.base_branch)
    # simulated crash: one worktree's folder vanished, a stray folder was left half-made
    import shutil

    shutil.rmtree(b)
    (snap.worktrees_dir / "half").mkdir()

    # a fresh process reloads the snapshot from its JSON form
    again = Snapshot.from_json(snap.to_json())
    again.prune()
    assert list(snap.worktrees_dir.iterdir()) == []
    listed = git(snap.repo, "worktree", "list", "--porcelain")
    assert str(a) not in listed and str(b) not in listed
    # a new worktree of the same name works after the crash
    assert (again.add_worktree("a", again.base_branch) / "p.py").exists()


def test_add_worktree_replaces_a_stale_one(tmp_path: Path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "p.py").write_text("p\n")
    snap = snapshot_target(target, "r8", tmp_path / "run")
    wt = snap.add_worktree("c", snap.base_branch)
    (wt / "junk").write_text("left over")
    wt2 = snap.add_worktree("c", snap.base_branch)
    assert wt2 == wt and not (wt / "junk").exists()


def test_bad_names_are_usage_errors(tmp_path: Path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "p.py").write_text("p\n")
    with pytest.raises(UsageError):
        snapshot_target(target, "bad..id", tmp_path / "run")
    snap = snapshot_target(target, "ok", tmp_path / "run")
    with pytest.raises(UsageError):
        snap.add_worktree("../escape", snap.base_branch)
    with pytest.raises(UsageError):
        snap.set_ref("heads/x", snap.resolve(snap.base_branch))
    with pytest.raises(UsageError):
        Snapshot.from_json({"format": "other"})


# --------------------------------------------------------------------------- worktrees without the label files


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """A user's repo whose target holds label files, a generator, a CRLF-attributed prompt and a symlink."""
    repo = tmp_path / "lab"
    (repo / "t" / "data" / "gen").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / ".gitattributes").write_text("*.txt eol=crlf\n*.md ident\n")
    (repo / "t" / "prompt.txt").write_text("line one\nline two\n")
    (repo / "t" / "notes.md").write_text("$Id$\n")
    (repo / "t" / "run.sh").write_text("#!/bin/sh\n")
    (repo / "t" / "run.sh").chmod(0o755)
    (repo / "t" / "data" / "val.jsonl").write_text('{"expected": "1887"}\n')
    (repo / "t" / "data" / "corpus.jsonl").write_text("{}\n")
    (repo / "t" / "data" / "gen" / "make.py").write_text("SEED = 1\n")
    (repo / "t" / "link").symlink_to("prompt.txt")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "init")
    return repo


def test_worktree_without_sealed_paths_is_clean_and_exact(labelled: Path, tmp_path: Path):
    snap = snapshot_target(labelled / "t", "s1", tmp_path / "run")
    sha = snap.resolve(snap.base_branch)
    user_index = (labelled / ".git" / "index").read_bytes()
    wt = snap.add_worktree("cand-1", sha, without=["t/data/val.jsonl", "t/data/gen", "t/not-in-commit.txt"])
    assert not (wt / "t" / "data" / "val.jsonl").exists()
    assert not (wt / "t" / "data" / "gen").exists()  # a folder: every file under it, and the folder itself
    assert (wt / "t" / "data" / "corpus.jsonl").read_text() == "{}\n"
    assert git(wt, "status", "--porcelain", "--untracked-files=all") == ""
    assert git(wt, "rev-parse", "HEAD") == sha
    flagged = [line for line in git(wt, "ls-files", "-v").splitlines() if line.startswith("S ")]
    assert flagged == ["S t/data/gen/make.py", "S t/data/val.jsonl"]
    # byte for byte the commit's blobs: no CRLF from eol=crlf, no $Id expansion, modes and links kept
    for path in ("t/prompt.txt", "t/notes.md", "t/run.sh", ".gitattributes"):
        assert (wt / path).read_bytes() == subprocess.run(
            ["git", "cat-file", "blob", f"{sha}:{path}"], cwd=labelled, check=True, capture_output=True).stdout
    assert (wt / "t" / "run.sh").stat().st_mode & 0o100
    assert os.readlink(wt / "t" / "link") == "prompt.txt"
    # the user's own index is untouched; the worktree's flags are its own
    assert (labelled / ".git" / "index").read_bytes() == user_index
    assert git(labelled, "ls-files", "-v", "t/data/val.jsonl") == "H t/data/val.jsonl"


def test_worktree_by_branch_name_still_works(labelled: Path, tmp_path: Path):
    snap = snapshot_target(labelled / "t", "s2", tmp_path / "run")
    wt = snap.add_worktree("c", snap.base_branch)
    assert (wt / "t" / "data" / "val.jsonl").is_file()
    assert git(wt, "status", "--porcelain", "--untracked-files=all") == ""


def test_a_forged_git_link_in_a_worktree_runs_nothing(tmp_path: Path):
    """A pipeline that rewrites the worktree's ``.git`` to a repo of its own (fsmonitor, a clean filter)
    gets no command run on the host when the candidate is built: git never runs inside the worktree."""
    target = tmp_path / "t"
    target.mkdir()
    (target / "p.txt").write_text("p\n")
    snap = snapshot_target(target, "h1", tmp_path / "run")
    wt = snap.add_worktree("c", snap.base_branch)
    evil = wt / "evil"
    git(tmp_path, "init", "-q", str(evil))
    git(evil, "-c", "user.name=a", "-c", "user.email=b", "commit", "-q", "--allow-empty", "-m", "x")
    marker = tmp_path / "pwned"
    git(evil, "config", "core.fsmonitor", f"touch {marker}; false")
    git(evil, "config", "filter.x.clean", f"touch {marker}; cat")
    (wt / ".gitattributes").write_text("* filter=x\n")
    (wt / ".git").write_text(f"gitdir: {evil / '.git'}\n")
    (wt / "p.txt").write_text("q\n")
    tree = snap.build_candidate(wt, snap.resolve(snap.base_branch), message="m\n", is_editable=lambda _path: True,
                                sealed=())
    assert "+q" in tree.diff and tree.changed == ["p.txt"]
    assert {r.code for r in tree.refusals} == {"hidden"}  # the planted .git and .gitattributes are left out
    sha = tree.sha
    assert git(snap.repo, "cat-file", "-p", f"{sha}:p.txt") == "q"
    assert not marker.exists()
