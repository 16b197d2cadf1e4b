"""Listing a run's candidates and applying a kept change to the user's branch (real git repos)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from runbuilder import PROMPT, build_run, git

from pipemend.cli import app
from pipemend.errors import UsageError
from pipemend.review import apply_candidate, list_candidates, parse_candidate

LINE1_NEW = "line one: answer with the entity only"
LINE3_NEW = "line three: copy dates exactly"


def _state(repo: Path) -> dict[str, object]:
    """Everything apply must leave alone when it refuses: HEAD, branch, index, files, worktrees, status."""
    files = {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(repo.rglob("*")) if p.is_file() and ".git" not in p.relative_to(repo).parts}
    return {"head": git(repo, "rev-parse", "HEAD"), "branch": git(repo, "symbolic-ref", "--short", "HEAD"),
            "index": hashlib.sha256((repo / ".git" / "index").read_bytes()).hexdigest(), "files": files,
            "worktrees": git(repo, "worktree", "list", "--porcelain").count("worktree "),
            "status": git(repo, "status", "--porcelain"),
            "branches": git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads")}


def test_list_candidates(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    rows = list_candidates(run.run_dir)
    assert [(r["n"], r["verdict"]) for r in rows] == [(1, "accepted"), (2, "rejected"), (3, "accepted"), (4, "rejected")]
    assert rows[0]["branch"] == "pipemend/optimize-fixture/cand-1" and rows[0]["delta"] == pytest.approx(1 / 6)
    assert rows[1]["ref"] == "refs/pipemend/optimize-fixture/rejected/2" and rows[1]["regressions"] == 1
    assert rows[3]["val_score"] is None and rows[3]["sha"] == run.shas[4]
    assert rows[2]["title"] == "Ask for exact dates"


def test_apply_best_commits_all_accepted_changes_on_the_current_branch(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    repo = run.repo
    head = git(repo, "rev-parse", "HEAD")
    sha = apply_candidate(run.run_dir, "best")
    assert git(repo, "rev-parse", "HEAD") == sha and git(repo, "rev-parse", f"{sha}^") == head
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "main"
    assert git(repo, "status", "--porcelain") == ""
    prompt = (run.target / "prompt.txt").read_text()
    assert LINE1_NEW in prompt and LINE3_NEW in prompt
    assert git(repo, "diff", "--name-only", head, sha) == "pipe/prompt.txt"
    msg = git(repo, "log", "-1", "--format=%B", sha)
    assert msg.startswith("pipemend: apply optimize-fixture best (candidates 1, 3)")
    assert "cand-1: Ask for the short answer only" in msg and "cand-3: Ask for exact dates" in msg
    assert "val 0.6667 -> 0.8333 (delta +0.1667, CI [" in msg
    assert "branch pipemend/optimize-fixture/cand-3" in msg
    assert "git worktree" not in git(repo, "worktree", "list") and git(repo, "worktree", "list").count("\n") == 0


def test_apply_one_candidate_brings_only_its_own_change(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    sha = apply_candidate(run.run_dir, 3)
    prompt = (run.target / "prompt.txt").read_text()
    assert LINE3_NEW in prompt and LINE1_NEW not in prompt  # cand-3's diff relative to its parent (cand-1)
    msg = git(run.repo, "log", "-1", "--format=%B", sha)
    assert msg.startswith("pipemend: apply optimize-fixture cand-3: Ask for exact dates")
    assert f"({run.shas[3][:12]})" in msg


def test_apply_onto_another_branch_checks_it_out_first(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    repo = run.repo
    git(repo, "branch", "review")
    main_before = git(repo, "rev-parse", "main")
    sha = apply_candidate(run.run_dir, "cand-1", onto="review")
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "review"
    assert git(repo, "rev-parse", "review") == sha and git(repo, "rev-parse", "main") == main_before
    with pytest.raises(UsageError, match="no such branch"):
        apply_candidate(run.run_dir, 1, onto="nope")


def test_apply_on_a_dirty_tree_refuses_and_changes_nothing(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    repo = run.repo
    (run.target / "app.py").write_text("def run(inputs):\n    return 'my local edit'\n")  # unstaged
    (repo / "README").write_text("staged edit\n")
    git(repo, "add", "README")
    (repo / "notes.txt").write_text("untracked\n")
    before = _state(repo)
    with pytest.raises(UsageError, match="uncommitted changes.*README"):
        apply_candidate(run.run_dir, "best")
    assert _state(repo) == before


def test_apply_of_a_conflicting_change_refuses_and_changes_nothing(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    repo = run.repo
    (run.target / "prompt.txt").write_text(PROMPT.replace("line one: answer briefly", "line one: answer in French"))
    git(repo, "commit", "-q", "-am", "user edits line one")
    before = _state(repo)
    with pytest.raises(UsageError, match="conflicts.*pipe/prompt.txt"):
        apply_candidate(run.run_dir, 1)
    assert _state(repo) == before
    git(repo, "branch", "other", "HEAD~1")  # and through --onto: back on main, nothing changed
    with pytest.raises(UsageError, match="conflicts"):
        apply_candidate(run.run_dir, "best", onto="main")
    assert {k: v for k, v in _state(repo).items() if k != "branches"} == {k: v for k, v in before.items() if k != "branches"}


def test_apply_refuses_rejected_unknown_and_bad_candidates(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    before = _state(run.repo)
    with pytest.raises(UsageError, match="candidate 2 was rejected"):
        apply_candidate(run.run_dir, 2)
    with pytest.raises(UsageError, match="not a finished candidate.*finished: 1, 2, 3, 4"):
        apply_candidate(run.run_dir, 9)
    with pytest.raises(UsageError, match="expected a candidate number"):
        apply_candidate(run.run_dir, "latest")
    assert _state(run.repo) == before
    assert parse_candidate("cand-12") == 12 and parse_candidate(" Best ") == "best"


def test_apply_twice_says_the_change_is_already_there(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    apply_candidate(run.run_dir, 1)
    with pytest.raises(UsageError, match="already"):
        apply_candidate(run.run_dir, 1)


def test_target_outside_git_gets_the_files_written(tmp_path: Path) -> None:
    run = build_run(tmp_path, in_repo=False)
    assert run.repo is None and (run.run_dir / "repo" / "HEAD").is_file()
    (run.target / "app.py").write_text("user edit of a file the change does not touch\n")
    sha = apply_candidate(run.run_dir, "best")
    assert sha == run.shas[3]
    prompt = (run.target / "prompt.txt").read_text()
    assert LINE1_NEW in prompt and LINE3_NEW in prompt
    assert (run.target / "app.py").read_text().startswith("user edit")
    with pytest.raises(UsageError, match="--onto"):
        apply_candidate(run.run_dir, "best", onto="main")


def test_target_outside_git_refuses_when_a_changed_file_was_edited(tmp_path: Path) -> None:
    run = build_run(tmp_path, in_repo=False)
    edited = PROMPT + "my own line\n"
    (run.target / "prompt.txt").write_text(edited)
    with pytest.raises(UsageError, match="prompt.txt changed since the run's snapshot"):
        apply_candidate(run.run_dir, 1)
    assert (run.target / "prompt.txt").read_text() == edited


def _app() -> typer.Typer:
    return app


def test_cli_commands(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    runner = CliRunner()
    res = runner.invoke(_app(), ["branches", str(run.run_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert [r["verdict"] for r in json.loads(res.stdout)["candidates"]] == ["accepted", "rejected", "accepted", "rejected"]
    res = runner.invoke(_app(), ["branches", str(run.run_dir)], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "pipemend/optimize-fixture/cand-3" in res.output
    res = runner.invoke(_app(), ["report", str(run.run_dir)])
    assert res.exit_code == 0 and (run.run_dir / "report.html").is_file()
    res = runner.invoke(_app(), ["apply", str(run.run_dir), "bogus"])
    assert res.exit_code == 2 and "expected a candidate number" in res.output
    res = runner.invoke(_app(), ["apply", str(tmp_path / "nowhere"), "best"])
    assert res.exit_code == 2 and "not a pipemend run directory" in res.output
    res = runner.invoke(_app(), ["apply", str(run.run_dir), "best"])
    assert res.exit_code == 0 and git(run.repo, "rev-parse", "HEAD") in res.output
