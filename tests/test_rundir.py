"""The run directory's reports folder, in a real git repo."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipemend.errors import UsageError
from pipemend.rundir import create_run_dir, ensure_reports_dir


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "proj"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "pipeline.py").write_text("x = 1\n")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "init")
    return repo


def test_a_new_reports_folder_ignores_itself(repo: Path):
    run_dir = create_run_dir(repo / "reports", "eval-1", kind="eval", target=repo, config={})
    assert (run_dir / "run.json").is_file()
    assert (repo / "reports" / ".gitignore").read_text().splitlines()[-1] == "*"
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    # a second run in the same folder keeps it ignored
    create_run_dir(repo / "reports", "eval-2", kind="eval", target=repo, config={})
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""


def test_nested_reports_folder_parents_are_made(repo: Path):
    create_run_dir(repo / "out" / "runs", "r", kind="eval", target=repo, config={})
    assert (repo / "out" / "runs" / ".gitignore").is_file()
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""


def test_an_existing_reports_folder_is_left_alone(repo: Path):
    (repo / "reports").mkdir()
    (repo / "reports" / "notes.md").write_text("mine\n")
    git(repo, "add", "reports/notes.md")
    create_run_dir(repo / "reports", "eval-1", kind="eval", target=repo, config={})
    assert not (repo / "reports" / ".gitignore").exists()  # the user's own folder: not ours to hide


def test_a_file_in_the_way_is_a_usage_error(tmp_path: Path):
    (tmp_path / "reports").write_text("not a folder")
    with pytest.raises(UsageError):
        ensure_reports_dir(tmp_path / "reports")
