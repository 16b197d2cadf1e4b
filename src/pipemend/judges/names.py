"""The judge metrics' names (a leaf module: the manifest checks names without loading the judges)."""

from __future__ import annotations

JUDGE_PREFIX = "judge:"
JUDGES = ("judge:correctness", "judge:faithfulness", "judge:relevance")
"""Every built-in judge metric; each has a prompt template ``judges/templates/<name>.md.j2``."""


def judge_name(spec: str) -> str:
    """``judge:correctness`` -> ``correctness`` (the template's name)."""
    return spec.removeprefix(JUDGE_PREFIX)
