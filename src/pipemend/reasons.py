"""A reason to refuse a candidate: a rule's code, an id-free text, and the examples concerned apart.

``text`` never names a val/test example; the ids ride apart, so what a proposer
sees (``Verdict.aggregates``) drops them by construction; ``str(reason)`` is the
full text (with ids) that verdict.json, the journal and the report show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

SHOWN_IDS = 10
"""Example ids written into a reason's full text at most."""


@dataclass(frozen=True)
class Reason:
    """One reason to refuse a candidate.

    ``code`` names the rule (``protected``, ``label_leak``, ``regressions``...), ``text`` says what is wrong
    without naming any val/test example, ``example_ids`` are the examples concerned (kept out of what a
    proposer sees). ``str()`` is the full text: ``text`` then ``: id, id, ...``.
    """

    code: str
    text: str
    example_ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        if not self.example_ids:
            return self.text
        more = len(self.example_ids) - SHOWN_IDS
        return f"{self.text}: {', '.join(self.example_ids[:SHOWN_IDS])}" + (f" (+{more} more)" if more > 0 else "")


def texts(reasons: Sequence[Reason]) -> list[str]:
    """The full texts (verdict.json, the journal, the report)."""
    return [str(r) for r in reasons]
