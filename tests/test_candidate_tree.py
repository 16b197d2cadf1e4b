"""Snapshot.build_candidate against the attacks that fooled the old staged-view diff (issue 11, item 3).

Each test is a real git repo: a user's repo with the target in ``pipe/``, a snapshot, a candidate
worktree without the sealed label file, an attack done the way a proposer or pipeline would do it,
then ``build_candidate``. Every attack must end as a refusal, or be harmless: the commit holds the
bytes on disk, a clean checkout of it holds the same bytes, and the diff shows the real text.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipemend.diffs import added_lines, parse_diff
from pipemend.sandbox import candidate as candidate_mod
from pipemend.sandbox.worktrees import CandidateTree, Snapshot, snapshot_target

SEALED = ["pipe/data/val.jsonl"]
ANSWER = "The answer to q-017 is 1887.\n"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def blob(repo: Path, sha: str, path: str) -> bytes:
    return subprocess.run(["git", "cat-file", "blob", f"{sha}:{path}"], cwd=repo, check=True,
                          capture_output=True).stdout


def is_editable(path: str) -> bool:
    return path.startswith("pipe/prompts/") or path == "pipe/pipeline.py"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "proj"
    for d in ("pipe/prompts", "pipe/data"):
        (repo / d).mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "User")
    git(repo, "config", "user.email", "user@example.com")
    (repo / ".gitignore").write_text("*.cache\n")
    (repo / "README.md").write_text("top\n")
    (repo / "pipe" / "pipemend.yaml").write_text("name: qa\n")
    (repo / "pipe" / "metric.py").write_text("def score(o, e):\n    return o == e\n")
    (repo / "pipe" / "pipeline.py").write_text("def run(q):\n    return 'x'\n")
    (repo / "pipe" / "prompts" / "answer.txt").write_text("Answer briefly.\n")
    (repo / "pipe" / "prompts" / "style.txt").write_text("Be kind.\n")
    (repo / "pipe" / "data" / "val.jsonl").write_text('{"id": "q-017", "expected": "1887"}\n')
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    return repo


def start(repo: Path, tmp_path: Path, run_id: str = "r1") -> tuple[Snapshot, str, Path]:
    snap = snapshot_target(repo / "pipe", run_id, tmp_path / f"run-{run_id}")
    base = snap.resolve(snap.base_branch)
    wt = snap.add_worktree("cand-1", base, without=SEALED)
    return snap, base, wt


def build(snap: Snapshot, wt: Path, base: str) -> CandidateTree:
    return snap.build_candidate(wt, base, message="pipemend r1 cand-1: test\n", is_editable=is_editable,
                                sealed=SEALED)


def codes(cand: CandidateTree) -> dict[str, str]:
    return {r.path: r.code for r in cand.refusals}


def assert_evaluated_is_committed(snap: Snapshot, cand: CandidateTree, wt: Path, *, git_sees: str = "") -> None:
    """A clean checkout of the candidate commit holds, byte for byte, what the candidate worktree held
    at every changed path (what the loop evaluates is what it committed). ``git_sees``: what ``git status``
    shows there (only the user's own clean filter makes it differ from the blobs it just checked)."""
    assert cand.sha is not None
    ev = snap.add_worktree("eval", cand.sha, without=SEALED)
    try:
        for path in cand.changed:
            on_disk = wt / path
            if on_disk.is_file() and not on_disk.is_symlink():
                assert (ev / path).read_bytes() == on_disk.read_bytes() == blob(snap.repo, cand.sha, path)
            else:
                assert not (ev / path).exists()
        assert git(ev, "status", "--porcelain") == git_sees
        assert not (ev / "pipe" / "data" / "val.jsonl").exists()
    finally:
        snap.remove_worktree(ev)


# --------------------------------------------------------------------------- the honest path


def test_honest_edit_is_committed_exactly(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    assert not (wt / "pipe" / "data" / "val.jsonl").exists()  # the label file is not in the candidate's view
    (wt / "pipe" / "prompts" / "answer.txt").write_text("Answer in one word.\n")
    (wt / "pipe" / "prompts" / "new.txt").write_text("extra\n")
    (wt / "pipe" / "prompts" / "style.txt").unlink()
    cand = build(snap, wt, base)
    assert cand.refusals == []
    assert cand.changed == ["pipe/prompts/answer.txt", "pipe/prompts/new.txt", "pipe/prompts/style.txt"]
    assert git(repo, "rev-parse", f"{cand.sha}^") == base
    assert git(repo, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%s", cand.sha) == \
        "pipemend <pipemend@localhost>|pipemend <pipemend@localhost>|pipemend r1 cand-1: test"
    # the sealed file is absent from the worktree and kept, unchanged, in the commit
    assert blob(repo, cand.sha, "pipe/data/val.jsonl") == blob(repo, base, "pipe/data/val.jsonl")
    assert added_lines(cand.diff) == {"pipe/prompts/answer.txt": ["Answer in one word."], "pipe/prompts/new.txt": ["extra"]}
    assert {f.path: f.status for f in parse_diff(cand.diff)}["pipe/prompts/style.txt"] == "deleted"
    assert_evaluated_is_committed(snap, cand, wt)


def test_reword_keeps_the_tree_and_parent(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    (wt / "pipe" / "prompts" / "answer.txt").write_text("v2\n")
    cand = build(snap, wt, base)
    final = snap.reword(cand.sha, "pipemend r1 cand-1: accepted\n\nval 0.1 -> 0.3\n")
    assert final != cand.sha
    assert git(repo, "rev-parse", f"{final}^{{tree}}") == git(repo, "rev-parse", f"{cand.sha}^{{tree}}")
    assert git(repo, "rev-parse", f"{final}^") == base
    assert git(repo, "log", "-1", "--format=%an|%B", final) == "pipemend|pipemend r1 cand-1: accepted\n\nval 0.1 -> 0.3"


def test_untouched_worktree_is_no_candidate(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    cand = build(snap, wt, base)
    assert cand == CandidateTree(None, [], "", [])


def test_the_worktrees_own_index_is_never_read_nor_written(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    index = Path(git(wt, "rev-parse", "--path-format=absolute", "--git-path", "index"))
    before = index.read_bytes()
    (wt / "pipe" / "prompts" / "answer.txt").write_text("v2\n")
    build(snap, wt, base)
    assert index.read_bytes() == before
    index.write_bytes(b"garbage, as a hostile pipeline might leave it")
    assert build(snap, wt, base).changed == ["pipe/prompts/answer.txt"]


# --------------------------------------------------------------------------- attributes


def _commit_user_attributes(repo: Path, attributes: str, config: dict[str, str]) -> None:
    for key, value in config.items():
        git(repo, "config", key, value)
    (repo / ".gitattributes").write_text(attributes)
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-q", "-m", "attributes")


ATTRIBUTES = {
    "binary": ("*.txt binary\n", {}),
    "-diff": ("*.txt -diff\n", {}),
    "diff=driver with textconv": ("*.txt diff=hide\n", {"diff.hide.textconv": "sh -c 'echo nothing to see' --",
                                                        "diff.hide.binary": "true"}),
    "external diff": ("*.txt diff=ext\n", {"diff.ext.command": "true"}),
    "clean filter": ("*.txt filter=hide\n", {"filter.hide.clean": "sed s/1887/XXXX/", "filter.hide.smudge": "cat"}),
    "eol=crlf": ("*.txt eol=crlf\n", {}),
    "ident": ("*.txt ident\n", {}),
}


@pytest.mark.parametrize("attributes,config", list(ATTRIBUTES.values()), ids=list(ATTRIBUTES))
def test_base_attributes_cannot_hide_or_change_the_text(repo: Path, tmp_path: Path, attributes: str,
                                                       config: dict[str, str]):
    _commit_user_attributes(repo, attributes, config)
    snap, base, wt = start(repo, tmp_path)
    assert build(snap, wt, base).sha is None  # the exact checkout of the base is seen as unchanged
    written = ANSWER.encode() + b"$Id$\nline two\n"
    (wt / "pipe" / "prompts" / "answer.txt").write_bytes(written)
    cand = build(snap, wt, base)
    assert cand.refusals == []
    assert "Binary files" not in cand.diff and "nothing to see" not in cand.diff
    assert added_lines(cand.diff)["pipe/prompts/answer.txt"] == [ANSWER.strip(), "$Id$", "line two"]
    assert blob(repo, cand.sha, "pipe/prompts/answer.txt") == written
    # the user's clean filter would store "XXXX": git calls the exact bytes modified, pipemend evaluates them
    assert_evaluated_is_committed(snap, cand, wt, git_sees="M pipe/prompts/answer.txt" if "filter" in attributes else "")


@pytest.mark.parametrize("name", [".gitattributes", "prompts/.gitattributes", "prompts/.gitignore",
                                  "prompts/.hidden/x.pth", "prompts/.env"])
def test_new_dot_files_are_refused(repo: Path, tmp_path: Path, name: str):
    snap, base, wt = start(repo, tmp_path)
    path = wt / "pipe" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("* binary\n")
    (wt / "pipe" / "prompts" / "answer.txt").write_text(ANSWER)
    cand = build(snap, wt, base)
    assert codes(cand) == {f"pipe/{name}": "hidden"}
    assert cand.changed == ["pipe/prompts/answer.txt"]
    assert f"pipe/{name}" not in git(repo, "ls-tree", "-r", "--name-only", cand.sha)


def test_an_existing_dot_file_may_not_be_changed(repo: Path, tmp_path: Path):
    (repo / "pipe" / "prompts" / ".keep").write_text("")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "keep")
    snap, base, wt = start(repo, tmp_path)
    (wt / "pipe" / "prompts" / ".keep").write_text("*.txt -diff\n")
    assert codes(build(snap, wt, base)) == {"pipe/prompts/.keep": "hidden"}


def test_the_users_diff_settings_cannot_change_the_diff(repo: Path, tmp_path: Path):
    for key, value in {"diff.noprefix": "true", "diff.mnemonicPrefix": "true", "color.ui": "always",
                       "color.diff": "always", "diff.external": "false", "diff.suppressBlankEmpty": "true",
                       "diff.renames": "copies", "diff.context": "0", "core.quotePath": "true"}.items():
        git(repo, "config", key, value)
    snap, base, wt = start(repo, tmp_path)
    (wt / "pipe" / "prompts" / "answer.txt").write_text("Answer briefly.\n\n" + ANSWER)
    (wt / "pipe" / "prompts" / "ümlaut.txt").write_text(ANSWER)
    cand = build(snap, wt, base)
    assert "\x1b[" not in cand.diff and "diff --git a/pipe/prompts/answer.txt b/pipe/prompts/answer.txt" in cand.diff
    assert added_lines(cand.diff) == {"pipe/prompts/answer.txt": ["", ANSWER.strip()],
                                      "pipe/prompts/ümlaut.txt": [ANSWER.strip()]}


# --------------------------------------------------------------------------- binary content


@pytest.mark.parametrize("content", [b"Answer briefly.\n\x00\n1887\n", b"a\x00", b"caf\xe9 1887\n",
                                     b"\xff\xfe1\x008\x008\x007\x00"], ids=["nul-middle", "nul-end", "latin1", "utf16"])
def test_binary_content_is_refused(repo: Path, tmp_path: Path, content: bytes):
    snap, base, wt = start(repo, tmp_path)
    (wt / "pipe" / "prompts" / "answer.txt").write_bytes(content)  # an existing editable file
    (wt / "pipe" / "prompts" / "new.bin").write_bytes(content)  # a new one
    cand = build(snap, wt, base)
    assert codes(cand) == {"pipe/prompts/answer.txt": "binary", "pipe/prompts/new.bin": "binary"}
    assert cand.sha is None


# --------------------------------------------------------------------------- ignore rules and index flags


def test_gitignored_files_are_part_of_the_candidate(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    (wt / "pipe" / "prompts" / "answers.cache").write_text(ANSWER)  # ignored by the user's .gitignore
    (wt / "pipe" / "answers.cache").write_text(ANSWER)  # ignored, and not editable
    info_exclude = Path(git(wt, "rev-parse", "--path-format=absolute", "--git-common-dir")) / "info" / "exclude"
    info_exclude.parent.mkdir(exist_ok=True)
    info_exclude.write_text("prompts/\n")
    (wt / "pipe" / "prompts" / "answer.txt").write_text(ANSWER)
    cand = build(snap, wt, base)
    assert codes(cand) == {"pipe/answers.cache": "not_editable"}
    assert cand.changed == ["pipe/prompts/answer.txt", "pipe/prompts/answers.cache"]
    assert added_lines(cand.diff)["pipe/prompts/answers.cache"] == [ANSWER.strip()]
    assert_evaluated_is_committed(snap, cand, wt)


@pytest.mark.parametrize("flag", ["--skip-worktree", "--assume-unchanged"])
def test_index_flags_do_not_hide_edits(repo: Path, tmp_path: Path, flag: str):
    snap, base, wt = start(repo, tmp_path)
    git(wt, "update-index", flag, "pipe/metric.py", "pipe/prompts/answer.txt")
    (wt / "pipe" / "metric.py").write_text("def score(o, e):\n    return 1.0\n")
    (wt / "pipe" / "prompts" / "answer.txt").write_text(ANSWER)
    assert git(wt, "status", "--porcelain") == ""  # git itself is fooled
    cand = build(snap, wt, base)
    assert codes(cand) == {"pipe/metric.py": "not_editable"}
    assert blob(repo, cand.sha, "pipe/metric.py") == blob(repo, base, "pipe/metric.py")
    assert added_lines(cand.diff) == {"pipe/prompts/answer.txt": [ANSWER.strip()]}
    assert_evaluated_is_committed(snap, cand, wt)


def test_intent_to_add(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    (wt / "pipe" / "answers.py").write_text("A = '1887'\n")
    (wt / "pipe" / "prompts" / "more.txt").write_text(ANSWER)
    git(wt, "add", "-N", "pipe/answers.py", "pipe/prompts/more.txt")
    cand = build(snap, wt, base)
    assert codes(cand) == {"pipe/answers.py": "not_editable"}
    assert added_lines(cand.diff) == {"pipe/prompts/more.txt": [ANSWER.strip()]}


def test_a_planted_git_link_runs_nothing_on_the_host(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    marker = tmp_path / "pwned"
    evil = wt / "pipe" / "prompts" / "evil"
    git(tmp_path, "init", "-q", str(evil))
    git(evil, "config", "core.fsmonitor", f"touch {marker}; false")
    git(evil, "config", "core.hooksPath", str(evil))
    (wt / ".git").write_text(f"gitdir: {evil / '.git'}\n")
    (wt / "pipe" / "prompts" / "answer.txt").write_text(ANSWER)
    cand = build(snap, wt, base)
    assert not marker.exists()
    assert "pipe/prompts/answer.txt" in cand.changed
    assert all(r.code == "hidden" for r in cand.refusals)  # the planted repo's .git folder


# --------------------------------------------------------------------------- links, special files, deletions


def test_symlink_replacing_an_editable_file(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    target = wt / "pipe" / "prompts" / "answer.txt"
    target.unlink()
    target.symlink_to("../data/val.jsonl")
    (wt / "pipe" / "prompts" / "style.txt").unlink()
    (wt / "pipe" / "prompts" / "style.txt").symlink_to("/etc/passwd")
    cand = build(snap, wt, base)
    assert codes(cand) == {"pipe/prompts/answer.txt": "symlink", "pipe/prompts/style.txt": "symlink"}
    assert cand.sha is None  # nothing acceptable changed: the base's files stay


def test_symlinked_folder_is_refused_and_not_followed(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "answer.txt").write_text(ANSWER)
    os.rename(wt / "pipe" / "prompts", wt / "pipe" / "prompts-old")
    (wt / "pipe" / "prompts").symlink_to(outside)
    cand = build(snap, wt, base)
    assert codes(cand)["pipe/prompts"] == "symlink"
    # the base's prompts stay in the commit (the refusal stands for them); the moved copies are not editable
    if cand.sha:
        assert blob(repo, cand.sha, "pipe/prompts/answer.txt") == blob(repo, base, "pipe/prompts/answer.txt")
    assert "pipe/prompts/answer.txt" not in cand.changed


def test_fifo_is_refused(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    os.mkfifo(wt / "pipe" / "prompts" / "pipe.txt")
    assert codes(build(snap, wt, base)) == {"pipe/prompts/pipe.txt": "special_file"}


def test_deleting_protected_and_editable_files(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    (wt / "pipe" / "metric.py").unlink()
    (wt / "pipe" / "pipemend.yaml").unlink()
    (wt / "pipe" / "pipeline.py").unlink()
    cand = build(snap, wt, base)
    assert codes(cand) == {"pipe/metric.py": "not_editable", "pipe/pipemend.yaml": "not_editable"}
    assert cand.changed == ["pipe/pipeline.py"]
    assert blob(repo, cand.sha, "pipe/metric.py") == blob(repo, base, "pipe/metric.py")


def test_rename_of_a_protected_file_to_an_editable_name(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    git(wt, "mv", "pipe/metric.py", "pipe/prompts/metric.py")
    cand = build(snap, wt, base)
    assert codes(cand) == {"pipe/metric.py": "not_editable"}
    assert blob(repo, cand.sha, "pipe/metric.py") == blob(repo, base, "pipe/metric.py")


def test_mode_changes(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    (wt / "pipe" / "pipeline.py").chmod(0o755)  # editable: kept, shown as a mode change
    (wt / "pipe" / "metric.py").chmod(0o755)  # protected: refused
    cand = build(snap, wt, base)
    assert codes(cand) == {"pipe/metric.py": "not_editable"}
    (f,) = parse_diff(cand.diff)
    assert (f.path, f.old_mode, f.new_mode) == ("pipe/pipeline.py", "100644", "100755")


def test_sealed_file_cannot_be_put_back_changed(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    assert not (wt / "pipe" / "data").exists()  # not even the (otherwise empty) folder
    (wt / "pipe" / "data").mkdir()
    (wt / "pipe" / "data" / "val.jsonl").write_text('{"id": "q-017", "expected": "anything"}\n')
    (wt / "pipe" / "data" / "val2.jsonl").write_text("{}\n")
    cand = build(snap, wt, base)
    assert codes(cand) == {"pipe/data/val.jsonl": "sealed", "pipe/data/val2.jsonl": "not_editable"}
    assert cand.sha is None
    # the same bytes as the base are no change at all
    (wt / "pipe" / "data" / "val.jsonl").write_bytes(blob(repo, base, "pipe/data/val.jsonl"))
    (wt / "pipe" / "data" / "val2.jsonl").unlink()
    assert build(snap, wt, base) == CandidateTree(None, [], "", [])


def test_changes_outside_the_target(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    (wt / "README.md").write_text("edited\n")
    (wt / "other.py").write_text("x\n")
    (wt / ".gitignore").unlink()
    cand = build(snap, wt, base)
    assert codes(cand) == {"README.md": "outside_target", "other.py": "outside_target",
                           ".gitignore": "outside_target"}
    assert cand.sha is None


def test_bad_names_and_large_files(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    snap, base, wt = start(repo, tmp_path)
    (wt / "pipe" / "prompts" / "a\nb.txt").write_text("x\n")
    (wt / "pipe" / "prompts" / "rtl\u202etxt.py").write_text("x\n")
    (wt / "pipe" / "prompts" / os.fsdecode(b"bad\xff.txt")).write_text("x\n")
    monkeypatch.setattr(candidate_mod, "MAX_FILE_BYTES", 100)
    (wt / "pipe" / "prompts" / "big.txt").write_text("y" * 101)
    cand = build(snap, wt, base)
    assert sorted(codes(cand).values()) == ["bad_name", "bad_name", "bad_name", "too_large"]
    assert cand.sha is None


def test_hostile_diff_lines_are_read_as_content(repo: Path, tmp_path: Path):
    snap, base, wt = start(repo, tmp_path)
    (wt / "pipe" / "prompts" / "answer.txt").write_text(f"Answer briefly.\n++ /dev/null\n{ANSWER}-- a/x\n1923\n")
    (wt / "pipe" / "prompts" / "new.txt").write_text(f"++ /dev/null\n{ANSWER}")
    cand = build(snap, wt, base)
    assert "+++ /dev/null" in cand.diff
    assert added_lines(cand.diff) == {
        "pipe/prompts/answer.txt": ["++ /dev/null", ANSWER.strip(), "-- a/x", "1923"],
        "pipe/prompts/new.txt": ["++ /dev/null", ANSWER.strip()]}


def test_target_at_the_root_of_a_snapshot_repo(tmp_path: Path):
    target = tmp_path / "t"
    (target / "prompts").mkdir(parents=True)
    (target / "prompts" / "p.txt").write_text("p\n")
    (target / "pipemend.yaml").write_text("name: t\n")
    snap = snapshot_target(target, "r9", tmp_path / "run")
    base = snap.resolve(snap.base_branch)
    wt = snap.add_worktree("c", base)
    (wt / "prompts" / "p.txt").write_text("q\n")
    (wt / "pipemend.yaml").write_text("name: evil\n")
    cand = snap.build_candidate(wt, base, message="m", is_editable=lambda p: p.startswith("prompts/"), sealed=())
    assert codes(cand) == {"pipemend.yaml": "not_editable"}
    assert cand.changed == ["prompts/p.txt"]
    assert git(snap.repo, "cat-file", "-p", f"{cand.sha}:prompts/p.txt") == "q"
