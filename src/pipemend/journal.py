"""The optimize run's journal: the events it appends and their replay into the run's state.

``journal.jsonl`` is append-only (``rundir.journal``); nothing else holds the
truth about what a run has done. ``replay`` folds it into a ``RunState`` so
that ``resume`` continues from the last finished step. A step counts as done
only once its event is in the journal, and every event is written after the
files and git refs it names exist; a step without its event is redone.

Events of an optimize run (besides ``run_started``/``run_done``/``run_failed``):

- ``frozen``: ``RUN_DIR/frozen`` holds the manifest, data and metric.
- ``snapshot`` ``{snapshot, base_sha}``: the base branch exists.
- ``baseline_done`` ``{train_dir, val_dir, train_score, val_score}``.
- ``candidate_started`` ``{n, base_sha}``.
- ``candidate_done`` ``{n, accepted, sha, ref, reasons, rationale, val_dir, val_score, delta, tested, alpha}``:
  the verdict is on disk and, when ``sha`` is set, committed and its branch or ref set.
- ``candidate_abandoned`` ``{n, reason}``: the proposer had no more ideas; nothing was kept.
- ``base_ready`` ``{n, train_dir}``: an accepted candidate's train run and diagnosis are done.
- ``loop_stopped`` ``{reason, code}``; ``test_done`` ``{baseline, best, error?}``.
- ``loop_reopened`` ``{deadline}``: a run stopped at its drive's deadline goes on (``resume(..., deadline=)``).

A crash mid-append can leave a torn last line: ``replay`` ignores it, and the
next append (or ``repair``) cuts it off, so the run stays resumable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import read_jsonl, repair_jsonl_tail
from .rundir import JOURNAL, journal

__all__ = ["CandidateRecord", "RunState", "fold", "record", "repair", "replay"]


def record(run_dir: Path, event: str, **data: Any) -> None:
    """Append one event (``rundir.journal``)."""
    journal(run_dir, event, **data)


@dataclass
class CandidateRecord:
    n: int
    accepted: bool
    sha: str | None
    ref: str | None
    reasons: list[str]
    rationale: str = ""
    val_dir: str | None = None
    val_score: float | None = None
    delta: float | None = None
    tested: bool = False
    """It reached a val test (and so spent its share of the run's error budget)."""
    alpha: float | None = None
    evaluated: int | None = None
    """Val examples it was run on."""
    saved: int | None = None
    """Val example evaluations racing did not pay for it."""


@dataclass
class RunState:
    """What the journal says is done."""

    frozen: bool = False
    snapshot: dict[str, Any] | None = None
    base_sha: str | None = None
    """The snapshot's base commit (the baseline)."""
    baseline: dict[str, Any] | None = None
    candidates: dict[int, CandidateRecord] = field(default_factory=dict)
    started: int | None = None
    """A candidate started and not finished (redone from scratch on resume)."""
    ready: set[int] = field(default_factory=lambda: {0})
    """Bases whose train run and diagnosis are done (0 = the baseline)."""
    stop_reason: str | None = None
    stop_code: str | None = None
    """The stop rule that ended the loop (``optimize.stops.StopReason``; None in journals older than it)."""
    test: dict[str, Any] | None = None
    """``{baseline, best, error}`` of the test split, once it ran."""
    status: str = "running"
    error: Any = None
    """What ``run_failed`` said."""
    events: int = 0
    """Events folded (a report shows how far a run got)."""
    last_t: float | None = None
    """Time of the last event."""

    @property
    def accepted(self) -> list[CandidateRecord]:
        return [c for _, c in sorted(self.candidates.items()) if c.accepted]

    @property
    def best(self) -> CandidateRecord | None:
        acc = self.accepted
        return acc[-1] if acc else None

    @property
    def current_base(self) -> tuple[int, str | None, str | None]:
        """(candidate index or 0, commit sha, val eval dir relative to the run dir) of the current base."""
        best = self.best
        if best is None:
            return 0, self.base_sha, (self.baseline or {}).get("val_dir")
        return best.n, best.sha, best.val_dir

    @property
    def kept_before(self) -> list[bool]:
        """Whether each candidate that reached a val test was kept, in order (the error budget's history)."""
        return [c.accepted for _, c in sorted(self.candidates.items()) if c.tested]

    @property
    def next_index(self) -> int:
        return max(self.candidates, default=0) + 1


def _int(value: Any) -> int | None:
    try:
        return None if isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fold(events: Iterable[Any]) -> RunState:
    """Fold journal events, in order, into a ``RunState``.

    The one fold of a journal: ``replay`` (the loop, resume, review) and the
    report both use it. An event that is not a mapping, or lacks the field it is
    about (``n`` of a candidate), is skipped, so a damaged journal still shows
    what it can.
    """
    st = RunState()
    for ev in events:
        if not isinstance(ev, dict):
            continue
        st.events += 1
        st.last_t = ev.get("t", st.last_t)
        kind = ev.get("event")
        n = _int(ev.get("n"))
        if kind == "frozen":
            st.frozen = True
        elif kind == "snapshot":
            st.snapshot, st.base_sha = ev.get("snapshot"), ev.get("base_sha")
        elif kind == "baseline_done":
            st.baseline = {k: ev.get(k) for k in ("train_dir", "val_dir", "train_score", "val_score")}
        elif kind == "candidate_started" and n is not None:
            st.started = n
        elif kind == "candidate_done" and n is not None:
            st.candidates[n] = CandidateRecord(
                n=n, accepted=bool(ev.get("accepted")), sha=ev.get("sha"), ref=ev.get("ref"),
                reasons=[str(r) for r in ev.get("reasons") or []], rationale=ev.get("rationale") or "",
                val_dir=ev.get("val_dir"), val_score=ev.get("val_score"), delta=ev.get("delta"),
                tested=bool(ev.get("tested", ev.get("val_dir") is not None)), alpha=_num(ev.get("alpha")),
                evaluated=_int(ev.get("evaluated")), saved=_int(ev.get("saved")))
            if st.started == n:
                st.started = None
        elif kind == "candidate_abandoned" and n is not None and st.started == n:
            st.started = None
        elif kind == "base_ready" and n is not None:
            st.ready.add(n)
        elif kind == "loop_stopped":
            st.stop_reason, st.stop_code = ev.get("reason"), ev.get("code")
        elif kind == "loop_reopened":  # a resume with a later deadline: propose again, test again
            st.stop_reason, st.stop_code, st.test, st.status = None, None, None, "running"
        elif kind == "test_done":
            st.test = {"baseline": ev.get("baseline"), "best": ev.get("best"), "error": ev.get("error")}
        elif kind in ("run_done", "run_failed"):
            st.status = kind[4:]
            if kind == "run_failed":
                st.error = ev.get("error")
        elif kind == "run_resumed":
            st.status = "running"
    return st


def replay(run_dir: Path) -> RunState:
    """Fold ``RUN_DIR/journal.jsonl`` into a ``RunState`` (a torn last line is ignored; ``repair`` mends it)."""
    return fold(read_jsonl(Path(run_dir) / JOURNAL))


def repair(run_dir: Path) -> str | None:
    """Drop a torn last line of ``RUN_DIR/journal.jsonl`` (a crash mid-write), so the next event starts a fresh line.

    Every append does this too (``fsutil.append_jsonl``); resume may call it
    first to say so. Returns what was done, or None when the journal was whole.
    """
    return repair_jsonl_tail(Path(run_dir) / JOURNAL)
