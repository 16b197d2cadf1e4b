"""pipemend.diffs: a unified git diff read by its structure, against hostile content."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from pipemend.diffs import DiffError, FileDiff, added_lines, parse_diff, symlink_paths
from pipemend.sandbox.candidate import DIFF_ARGS


def git(cwd: Path, *args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(["git", "-c", "user.name=u", "-c", "user.email=u@x", "-c", "core.quotepath=false", *args],
                          cwd=cwd, check=True, capture_output=True, input=input).stdout


def diff_of(tmp_path: Path, before: dict[str, bytes], after: dict[str, bytes]) -> str:
    """The real ``git diff`` (pipemend's flags) between two commits holding these files."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")

    def commit(files: dict[str, bytes]) -> str:
        for p in repo.iterdir():
            if p.name != ".git":
                subprocess.run(["rm", "-rf", str(p)], check=True)
        for name, data in files.items():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes(data)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "--allow-empty", "-m", "c")
        return git(repo, "rev-parse", "HEAD").decode().strip()

    a, b = commit(before), commit(after)
    return git(repo, *DIFF_ARGS, a, b).decode("utf-8")


# --------------------------------------------------------------------------- the attacks


HOSTILE_LINES = ["++ /dev/null", "++ b/other.txt", "-- a/x", "-- /dev/null", "@@ -1,1 +1,1 @@", "diff --git a/y b/y",
                 "+++ b/z", "--- a/z", "\\ No newline at end of file", "index 0000000..1111111 100644",
                 "new file mode 120000", "Binary files a/x and b/x differ", "GIT binary patch"]


@pytest.mark.parametrize("hostile", HOSTILE_LINES)
def test_a_content_line_that_looks_like_a_header_is_content(tmp_path: Path, hostile: str):
    before = {"answers.txt": b"q1\n", "later.txt": b"x\n"}
    after = {"answers.txt": f"q1\n{hostile}\nanswer 1887\n".encode(), "later.txt": b"x\nanswer 1923\n"}
    files = {f.path: f for f in parse_diff(diff_of(tmp_path, before, after))}
    assert files["answers.txt"].added == [hostile, "answer 1887"]
    assert files["later.txt"].added == ["answer 1923"]
    assert set(files) == {"answers.txt", "later.txt"}
    assert not files["answers.txt"].is_symlink and not files["answers.txt"].is_binary


def test_plus_plus_dev_null_does_not_hide_the_rest_of_a_new_file(tmp_path: Path):
    text = b"++ /dev/null\nanswer 1887\n-- a/x\nanswer 1923\n"
    d = diff_of(tmp_path, {}, {"p.txt": text})
    assert "+++ /dev/null\n" in d  # what fooled the old parser
    assert added_lines(d) == {"p.txt": ["++ /dev/null", "answer 1887", "-- a/x", "answer 1923"]}


def test_removed_lines_that_look_like_headers(tmp_path: Path):
    d = diff_of(tmp_path, {"a.txt": b"-- a/x\n++ b/y\nkeep\n"}, {"a.txt": b"keep\nnew\n"})
    (f,) = parse_diff(d)
    assert f.removed == ["-- a/x", "++ b/y"] and f.added == ["new"]


def test_line_separators_other_than_newline_stay_inside_a_line(tmp_path: Path):
    line = "a\rb\x0cc\u2028d\x85e\x1ef"
    (f,) = parse_diff(diff_of(tmp_path, {}, {"u.txt": (line + "\n").encode()}))
    assert f.added == [line]


def test_symlinks_modes_and_statuses(tmp_path: Path):
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "gone.txt").write_text("bye\n")
    (repo / "link").write_text("was a file\n")
    (repo / "run.sh").write_text("echo\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a")
    (repo / "gone.txt").unlink()
    (repo / "link").unlink()
    (repo / "link").symlink_to("../data/val.jsonl")
    (repo / "run.sh").chmod(0o755)
    (repo / "name with space.txt").write_text("s\n")
    (repo / 'q"uote\\.txt').write_text("q\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "b")
    d = git(repo, *DIFF_ARGS, "HEAD~", "HEAD").decode()
    files = {f.path: f for f in parse_diff(d)}
    assert files["gone.txt"].status == "deleted" and files["gone.txt"].new_path is None
    assert files["gone.txt"].removed == ["bye"]
    assert files["run.sh"].old_mode == "100644" and files["run.sh"].new_mode == "100755"
    assert files["name with space.txt"].status == "added" and files["name with space.txt"].added == ["s"]
    assert files['q"uote\\.txt'].added == ["q"]
    # without --no-renames a typechange is one deleted and one added entry; either way the symlink is seen
    assert "link" in symlink_paths(d)
    assert any(f.is_symlink and f.added == ["../data/val.jsonl"] for f in parse_diff(d) if f.path == "link")


def test_binary_marker_and_binary_patch():
    d = ("diff --git a/x.bin b/x.bin\nindex 1111111..2222222 100644\nBinary files a/x.bin and b/x.bin differ\n"
         "diff --git a/y.bin b/y.bin\nnew file mode 100644\nindex 0000000..3333333\nGIT binary patch\n"
         "literal 3\nKcmZQzWB>pF00961\n\nliteral 0\nHcmV?d00001\n\n"
         "diff --git a/t.txt b/t.txt\nindex 1..2 100644\n--- a/t.txt\n+++ b/t.txt\n@@ -1 +1 @@\n-a\n+b\n")
    # index ids shorter than 4 hex digits are malformed
    with pytest.raises(DiffError):
        parse_diff(d)
    d = d.replace("index 1..2", "index 1111..2222")
    files = parse_diff(d)
    assert [(f.path, f.is_binary, f.status) for f in files] == [
        ("x.bin", True, "modified"), ("y.bin", True, "added"), ("t.txt", False, "modified")]
    assert files[2].added == ["b"]


def test_renames_read_from_their_headers():
    d = ("diff --git a/metric.py b/prompts/m 2.py\nsimilarity index 90%\nrename from metric.py\n"
         "rename to prompts/m 2.py\nindex 1111..2222 100644\n--- a/metric.py\n+++ b/prompts/m 2.py\t\n"
         "@@ -1 +1 @@\n-x\n+y\n")
    (f,) = parse_diff(d)
    assert (f.old_path, f.new_path, f.status, f.added) == ("metric.py", "prompts/m 2.py", "renamed", ["y"])


MALFORMED = [
    "junk before\ndiff --git a/x b/x\n",
    "diff --cc x\n",
    "diff --git a/x b/x\nindex 1111..2222 100644\n--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n-a\n+b\n",  # ends inside a hunk
    "diff --git a/x b/x\nindex 1111..2222 100644\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n+c\n",  # one line too many
    "diff --git a/x b/x\nindex 1111..2222 100644\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\ntrailing\n",
    "diff --git a/x b/x\nindex 1111..2222 100644\n--- a/x\n+++ b/x\n@@ -1 +1 @\n-a\n+b\n",  # bad range
    "diff --git a/x b/x\nindex 1111..2222 100644\n--- a/x\n+++ b/y\n@@ -1 +1 @@\n-a\n+b\n",  # names disagree
    "diff --git a/x b/x\nnew file mode 100644\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n",  # status disagrees
    "diff --git a/x b/x\nsurprise header\n",
    "diff --git a/x b/x\nold mode 12345\n",
    "diff --git a/x b/x\n--- a/x\n",
    "diff --git a/x b/x\n--- a/x\n+++ b/x\n",  # no hunk
    "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n\\ No newline at end of file\n-a\n+b\n",
    'diff --git "a/x b/x\n',
    'diff --git "a/\\q" "b/\\q"\n',
    "diff --git a/x y b/z w\nindex 1111..2222 100644\n",  # names cannot be told apart
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_input_is_a_clear_error(text: str):
    with pytest.raises(DiffError, match="line|diff|path"):
        parse_diff(text)


def test_hostile_sizes_cost_linear_work():
    # a hunk claiming a billion lines, a huge line, many tiny files: each is parsed or refused in one pass
    with pytest.raises(DiffError, match="ends inside a hunk"):
        parse_diff("diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -0,0 +1,999999999 @@\n+a\n")
    big = "+" + "@" * 2_000_000
    (f,) = parse_diff(f"diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -0,0 +1 @@\n{big}\n")
    assert len(f.added[0]) == 2_000_000
    many = "".join(f"diff --git a/f{i} b/f{i}\n--- a/f{i}\n+++ b/f{i}\n@@ -1 +1 @@\n-a\n+b\n" for i in range(20_000))
    assert len(parse_diff(many)) == 20_000
    with pytest.raises(DiffError):
        parse_diff("diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -" + "9" * 50_000 + " +1 @@\n")


def test_bytes_input_must_be_utf8():
    assert parse_diff(b"") == []
    with pytest.raises(DiffError, match="UTF-8"):
        parse_diff(b"diff --git a/x b/x\n\xff\n")


# --------------------------------------------------------------------------- property: parse(diff(a, b)) is exact

TRICKY = ["", " ", "a", "b", "answer 1887", "+", "-", "++ /dev/null", "-- a/f0.txt", "+++ b/f1.txt",
          "--- a/f2.txt", "@@ -1,3 +1,3 @@", "@@", "diff --git a/f0.txt b/f0.txt", "\\ No newline at end of file",
          " context-looking", "-minus-looking", "+plus-looking", "x\ry", "tab\there", "\u2028", "ümlaut"]


def _random_text(rng: random.Random) -> bytes:
    lines = [rng.choice(TRICKY) for _ in range(rng.randint(0, 10))]
    text = "\n".join(lines)
    if lines and rng.random() < 0.7:
        text += "\n"
    return text.encode("utf-8")


def _split(text: str) -> tuple[list[str], bool]:
    """Lines of ``text`` and whether its last line ends with a newline."""
    if text == "":
        return [], True
    parts = text.split("\n")
    if parts[-1] == "":
        return parts[:-1], True
    return parts, False


def _apply(old: str, f: FileDiff) -> str:
    """Rebuild the new text from the old one and the parsed hunks (checking every context/removed line)."""
    old_lines, old_nl = _split(old)
    out: list[str] = []
    pos = 0
    last_from_hunk = False
    for h in f.hunks:
        start = h.old_start if h.old_count == 0 else h.old_start - 1
        out += old_lines[pos:start]
        if start > pos:
            last_from_hunk = False
        pos = start
        for line in h.lines:
            op, body = line[0], line[1:]
            if op == "\\":
                continue
            if op in " -":
                assert old_lines[pos] == body
                pos += 1
            if op in " +":
                out.append(body)
                last_from_hunk = True
    tail = old_lines[pos:]
    out += tail
    if not out:
        return ""
    ends_nl = (not f.new_no_newline) if (last_from_hunk and not tail) else old_nl
    return "\n".join(out) + ("\n" if ends_nl else "")


@pytest.mark.parametrize("seed", range(6))
def test_parse_recovers_exactly_what_git_diff_says(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    names = [f"f{i}.txt" for i in range(25)]
    before = {n: _random_text(rng) for n in names if rng.random() < 0.8}
    after = {n: _random_text(rng) if rng.random() < 0.8 else before.get(n, b"") for n in names if rng.random() < 0.85}
    d = diff_of(tmp_path, before, after)
    files = {f.path: f for f in parse_diff(d)}
    for name in names:
        old, new = before.get(name), after.get(name)
        if old == new:
            assert name not in files
            continue
        f = files[name]
        if new is None:
            assert f.status == "deleted" and f.added == [] and f.removed == _split(old.decode())[0]
            continue
        if old is None:
            assert f.status == "added" and f.added == _split(new.decode())[0]
        assert _apply((old or b"").decode(), f) == new.decode()
        assert f.added == [ln[1:] for h in f.hunks for ln in h.lines if ln[0] == "+"]
    assert added_lines(d) == {p: f.added for p, f in files.items() if f.new_path is not None}
