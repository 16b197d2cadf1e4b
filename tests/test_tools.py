"""The guarded proposer tools on a real git worktree of the fixture target."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from support import SUBDIR, make_tools, make_worktree, secret_labels

from pipemend.proposers.tools import (
    MAX_FILE_BYTES,
    MAX_WRITE_CHARS,
    PathRefused,
    ReadOnlyTree,
    ToolError,
    ToolTimeout,
    format_trace,
)


@pytest.fixture
def wt(tmp_path: Path) -> Path:
    return make_worktree(tmp_path)


def test_write_and_edit_an_editable_file(wt):
    tools = make_tools(wt)
    assert tools.edit_file("prompts/answer.j2", "Answer:", "Final answer:").startswith("edited prompts/answer.j2")
    assert "Final answer:" in (wt / SUBDIR / "prompts/answer.j2").read_text()
    tools.write_file("prompts/new.j2", "Hello {{ name }}\n")
    assert (wt / SUBDIR / "prompts/new.j2").read_text() == "Hello {{ name }}\n"
    assert tools.written == ["prompts/answer.j2", "prompts/new.j2"]
    assert "prompts/answer.j2" in tools.show_diff()


def test_edit_requires_one_exact_match(wt):
    tools = make_tools(wt)
    with pytest.raises(ToolError, match="not found"):
        tools.edit_file("prompts/answer.j2", "no such text", "x")
    with pytest.raises(ToolError, match="occurs 2 times"):
        tools.edit_file("prompts/answer.j2", "{{ doc", "{{ d")
    with pytest.raises(ToolError, match="same"):
        tools.edit_file("prompts/answer.j2", "Answer:", "Answer:")


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("../outside.txt", "'..'"),
        ("prompts/../../x.j2", "'..'"),
        ("/etc/passwd", "absolute"),
        ("~/x.j2", "absolute"),
        ("pipemend.yaml", "protected"),
        ("data/qa.jsonl", "protected"),
        ("secrets/token.txt", "protected"),
        ("README.md", "no editable glob"),
        (".git/config", ".git"),
    ],
)
def test_writes_refused(wt, path, why):
    tools = make_tools(wt)
    with pytest.raises(PathRefused, match=why):
        tools.write_file(path, "x")
    assert not (wt / "outside.txt").exists()


def test_symlinks_refused_for_the_file_and_its_parents(wt, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.j2").write_text("original")
    root = wt / SUBDIR
    os.symlink(outside / "victim.j2", root / "prompts" / "link.j2")
    os.symlink(outside, root / "prompts" / "linkdir")
    tools = make_tools(wt)
    for path in ("prompts/link.j2", "prompts/linkdir/victim.j2", "prompts/linkdir/new.j2"):
        with pytest.raises(PathRefused, match="symlink"):
            tools.write_file(path, "pwned")
        with pytest.raises(PathRefused, match="symlink"):
            tools.read_file(path)
    assert (outside / "victim.j2").read_text() == "original"
    assert not (outside / "new.j2").exists()
    assert not any("link" in f for f in tools.list_files())


def test_target_folder_that_is_a_symlink_is_refused(tmp_path):
    real = make_worktree(tmp_path)
    wt = tmp_path / "wt2"
    wt.mkdir()
    os.symlink(real / SUBDIR, wt / SUBDIR)
    with pytest.raises(PathRefused, match="symlink"):
        make_tools(wt)


def test_protected_data_is_never_read_or_searched(wt):
    tools = make_tools(wt)
    with pytest.raises(PathRefused, match="val/test labels"):
        tools.read_file("data/qa.jsonl")
    with pytest.raises(PathRefused):
        tools.read_file("secrets/token.txt")
    hits = tools.search("ZEBRA|OKAPI|API_TOKEN")
    assert hits == []
    for label in secret_labels():
        assert all(label not in h for h in tools.search(label.split("-")[0]))
    # the manifest stays readable: it is protected from writes only
    assert "knobs:" in tools.read_file("pipemend.yaml")


def test_read_ranges_search_and_listing(wt):
    tools = make_tools(wt)
    assert tools.read_file("prompts/answer.j2", 3, 3) == "Question: {{ question }}"
    numbered = tools.read_file("prompts/answer.j2", 3, 4, numbered=True)
    assert numbered.splitlines()[0] == "    3\tQuestion: {{ question }}"
    assert "prompts/answer.j2:3:Question: {{ question }}" in tools.search(r"Question: \{\{")
    assert tools.search("Question", glob="prompts/decompose.j2") == ["prompts/decompose.j2:3:Question: {{ question }}"]
    files = tools.list_files()
    assert "prompts/answer.j2" in files and "data/qa.jsonl" in files
    assert tools.describe("data/qa.jsonl") == "protected"
    assert tools.describe("prompts/answer.j2") == "editable"
    assert tools.describe("README.md") == "read-only"
    with pytest.raises(ToolError, match="bad regular expression"):
        tools.search("(")
    with pytest.raises(ToolError, match="no such file"):
        tools.read_file("prompts/missing.j2")


def test_run_train_past_its_deadline_is_a_tool_timeout(wt):
    release = threading.Event()

    def hung(ids):
        release.wait(30)
        return []

    tools = make_tools(wt, train=hung, tool_timeout_s=0.2)
    try:
        with pytest.raises(ToolTimeout, match="run_train did not finish within 0.2 s"):
            tools.run_train(["t1"])
    finally:
        release.set()


def test_a_crashing_callable_becomes_a_tool_error(wt):
    def broken(ids):
        raise RuntimeError("sandbox fell over")

    tools = make_tools(wt, train=broken)
    with pytest.raises(ToolError, match="run_train failed: RuntimeError: sandbox fell over"):
        tools.run_train(None)


def test_read_trace_is_step_by_step_and_truncated(wt):
    tools = make_tools(wt)
    text = tools.read_trace("t1")
    assert "[1] retrieve (retrieval)" in text and "[2] answer (generation)" in text
    assert "doc_ids: [\"d1\"]" in text and "log[stdout]: answering" in text
    assert "llm call: model=simulated/echo in=12 out=5" in text
    assert "no trace" in tools.read_trace("v1")
    long = {"trace_format": "pipemend-1", "example_id": "t1", "output": "x" * 5000,
            "steps": [{"name": "s", "kind": "other", "inputs": {}, "output": "y" * 50_000}]}
    out = format_trace(long, max_chars=3000)
    assert len(out) < 3200 and "truncated" in out


def test_history_tree_is_read_only_and_guarded(tmp_path):
    hist = tmp_path / "history"
    (hist / "1").mkdir(parents=True)
    (hist / "1" / "rationale.md").write_text("tried top_k=5\n")
    (tmp_path / "secret.txt").write_text("nope")
    os.symlink(tmp_path / "secret.txt", hist / "1" / "link.txt")
    tree = ReadOnlyTree(hist)
    assert tree.list_files() == ["1/rationale.md"]
    assert tree.read_file("1/rationale.md") == "tried top_k=5\n"
    assert tree.search("top_k") == ["1/rationale.md:1:tried top_k=5"]
    for bad in ("../secret.txt", "/etc/passwd", "1/link.txt"):
        with pytest.raises(PathRefused):
            tree.read_file(bad)
    assert not hasattr(tree, "write_file")


# --------------------------------------------------------------------------- limits on what the agent passes in (issue 11.6)

CATASTROPHIC = [r"(a+)+$", r"(a|aa)+$", r"(a*)*b", r"^(\w+\s?)*$"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_a_catastrophic_search_pattern_is_stopped_and_the_tools_go_on(wt, pattern):
    (wt / SUBDIR / "prompts" / "evil.j2").write_text("a" * 5000 + "!\n" + "word " * 3000 + "!\n")
    tools = make_tools(wt)
    tools.search_timeout_s = 1.0
    with pytest.raises(ToolTimeout, match="did not finish within 1 s and was stopped"):
        tools.search(pattern)
    # the tools still work afterwards, and no search process is left behind
    assert tools.search("Question", glob="prompts/decompose.j2") == ["prompts/decompose.j2:3:Question: {{ question }}"]
    assert not _children_named("-c")


def _children_named(word: str) -> list[str]:
    """Command lines of this process's live children that contain ``word``."""
    out = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                cmd = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if word in cmd and "pipemend" not in cmd:
                out.append(cmd)
    return out


def test_search_limits_pattern_size_hits_and_skips_large_or_special_files(wt):
    root = wt / SUBDIR
    tools = make_tools(wt)
    with pytest.raises(ToolError, match="at most 500"):
        tools.search("a" * 501)
    with pytest.raises(ToolError, match="non-empty"):
        tools.search("")
    (root / "prompts" / "many.j2").write_text("hit\n" * 500)
    hits = tools.search("^hit$")
    assert len(hits) == 101 and hits[-1].startswith("... [stopped at 100 hits")
    (root / "prompts" / "big.j2").write_text("needle\n" + "x" * (MAX_FILE_BYTES + 1))
    os.mkfifo(root / "prompts" / "fifo.j2")  # reading a FIFO would block forever
    assert tools.search("needle") == []
    assert "prompts/fifo.j2" not in tools.list_files()
    with pytest.raises(ToolError, match="no such file"):
        tools.read_file("prompts/fifo.j2")
    with pytest.raises(ToolError, match=r"too large .*files over \d+ bytes are not read"):
        tools.read_file("prompts/big.j2")
    with pytest.raises(ToolError, match=r"too large .*files over \d+ bytes are not read"):
        tools.edit_file("prompts/big.j2", "needle", "pin")


def test_agent_paths_globs_sizes_and_ids_are_checked(wt):
    tools = make_tools(wt)
    with pytest.raises(ToolError, match="relative"):
        tools.list_files("/etc/*")
    with pytest.raises(ToolError, match="relative"):
        tools.search("x", glob="../*")
    with pytest.raises(ToolError, match="at most"):
        tools.list_files("*" * 2000)
    with pytest.raises(PathRefused, match="at most"):
        tools.read_file("a/" * 600)
    with pytest.raises(PathRefused, match="NUL"):
        tools.read_file("prompts/answer.j2\0x")
    with pytest.raises(ToolError, match="at most"):
        tools.write_file("prompts/huge.j2", "x" * (MAX_WRITE_CHARS + 1))
    assert not (wt / SUBDIR / "prompts" / "huge.j2").exists()
    with pytest.raises(ToolError, match="example id"):
        tools.read_trace("x" * 500)
    with pytest.raises(ToolError, match="list of train example ids"):
        tools.run_train("t1")  # a string, not a list
    with pytest.raises(ToolError, match="example id"):
        tools.run_train(["t1", 3])


def test_a_hostile_trace_is_shown_capped_and_never_crashes_the_tool():
    """Traces are written inside the sandbox: wrong types, deep nesting and huge fields are shown capped."""
    steps = [{"id": f"s{i}", "parent": f"s{i - 1}" if i else None, "name": "n" * 10_000, "kind": ["x"],
              "inputs": {"deep": [[[[[]]]]]}, "output": "o" * 100_000, "start": "yesterday", "end": 2,
              "logs": ["not a dict", {"source": 1, "message": "m" * 1000}], "llm_calls": {"not": "a list"},
              "error": 7} for i in range(5000)]
    steps[3] = "not a step"
    steps[4]["parent"] = ["unhashable"]
    out = format_trace({"example_id": "t1", "steps": steps, "error": ["odd"]}, max_chars=5000)
    assert len(out) < 5200 and "truncated" in out and "[1] nnnn" in out
    assert format_trace(["not", "a", "dict"]) == "(unreadable trace: a list, not an object)"
