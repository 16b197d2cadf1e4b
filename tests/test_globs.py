"""The one glob matcher (``pipemend.globs``): its semantics, its walk, and globs that would backtrack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipemend.globs import MAX_GLOB_CHARS, glob_match, matches_any, walk_files


@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        ("prompts/answer.j2", "prompts/**", True),
        ("prompts/a/b.j2", "prompts/*.j2", False),
        ("prompts/a/b.j2", "prompts/**/*.j2", True),
        ("prompts/b.j2", "prompts/**/*.j2", True),
        ("config.yaml", "config.yaml", True),
        ("config.yaml", "./config.yaml", True),
        ("sub/config.yaml", "config.yaml", False),
        ("sub/config.yaml", "**/config.yaml", True),
        ("prompts/x.txt", "prompts", True),
        ("prompts/x.txt", "prompts/", True),
        ("promptsx/x.txt", "prompts", False),
        ("data/qa.jsonl", "data/*.json", False),
        ("data/qa.jsonl", "data/*.json*", True),
        ("a/b/c.py", "**", True),
        ("a/b/c.py", "a/**.py", True),  # `**` inside a segment spans folders too
        ("c.py", "*.py", True),
        ("a/c.py", "*.py", False),
        ("a.py", "?.py", True),
        ("ab.py", "?.py", False),
        ("a/b", "a?b", False),  # `?` never matches a slash
        ("b1.txt", "b[0-9].txt", True),
        ("bx.txt", "b[0-9].txt", False),
        ("bx.txt", "b[!0-9].txt", True),
        ("b[.txt", "b[.txt", True),  # an unclosed bracket is a literal
        ("x", "", False),
    ],
)
def test_glob_semantics(path: str, pattern: str, expected: bool) -> None:
    assert glob_match(path, pattern) is expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        ("a" * 250 + "/b", "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*c", False),
        ("a" * 250 + "c", "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*c", True),
        ("a/" * 200 + "b", "**/" * 40 + "c", False),
        ("a/" * 200 + "c", "**/" * 40 + "c", True),
        ("a/" * 200 + "b", "**a**a**a**a**a**a**a**a**a**a**a**a**c", False),
        ("x" * 4000, "*x" * 400 + "y", False),
        ("x" * 4000, "*x" * 400, True),
    ],
)
def test_globs_that_would_backtrack_still_answer(path: str, pattern: str, expected: bool) -> None:
    """Agent-chosen globs run as an automaton: the classic catastrophic cases answer like any other."""
    assert glob_match(path, pattern) is expected


def test_an_overlong_glob_matches_nothing() -> None:
    assert not glob_match("a", "a" + "*" * MAX_GLOB_CHARS)
    assert not matches_any("a", ["b", "a" + "*" * MAX_GLOB_CHARS])
    assert matches_any("a", ["b", "a"])


def test_walk_lists_regular_files_only_and_never_follows_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s")
    root = tmp_path / "t"
    for rel in ("pipeline.py", "prompts/answer.txt", "tests/test_pipeline.py", ".git/config",
                "node_modules/x/index.js", ".pipemend-cache/x.py", "deep/a/b/c.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    os.symlink(outside / "secret.txt", root / "link.txt")
    os.symlink(outside, root / "linkdir")
    os.mkfifo(root / "pipe.py")
    assert walk_files(root, "**/*.py") == ["pipeline.py", "deep/a/b/c.py", "tests/test_pipeline.py"]
    assert walk_files(root, "prompts") == ["prompts/answer.txt"]
    assert "link.txt" not in walk_files(root) and not any(f.startswith("linkdir") for f in walk_files(root))
    assert walk_files(root, "**/*.py", limit=1) == ["pipeline.py"]
    assert walk_files(root, "../*") == [] and walk_files(root, "/etc/*") == []
