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

A run with ``parallel`` K > 1 works in rounds (``optimize/parallel.py``), each adding:

- ``round_started`` ``{round, base_n, base_sha, base_val_dir, first, k}``: candidates ``first .. first+k-1``
  are proposed from that base. It reserves k slots of the run's error budget (``RunState.tests``), one per
  candidate by position, whatever becomes of them.
- ``candidate_started`` ``{n, base_sha, round}`` as above; ``candidate_abandoned`` ``{n, reason, round}``: the
  proposer had no more ideas, and the round has no candidate from ``n`` on.
- ``candidate_judged`` ``{n, round, sha, delta, val_score, rationale}``: the candidate commit ``sha`` passed the
  gate against the round's base (its ``verdict.json`` is on disk, the ref ``refs/pipemend/<run>/judged/<n>`` names
  the commit until the candidate is finished); it waits for the selection.
- ``candidate_done`` with ``{round, rejudged}``: a candidate that failed against the round's base
  (``rejudged`` false), the selected one (the best delta, accepted as judged), or one re-judged against the
  new base (``rejudged`` true: rebased, raced again, one more slot of the error budget when it was tested).
- ``round_done`` ``{round}``: every candidate of the round has its ``candidate_done`` or was abandoned.

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

__all__ = ["CandidateRecord", "RoundState", "RunState", "fold", "record", "repair", "replay"]


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
class RoundState:
    """A round of a parallel run in flight (``round_started`` without ``round_done``)."""

    id: int
    base_n: int
    base_sha: str
    base_val_dir: str
    first: int
    k: int
    tests_before: int
    """Val tests of the run before the round (its slots of the error budget start after them)."""
    judged: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Candidates that passed against the round's base: their ``candidate_judged`` events."""
    done: set[int] = field(default_factory=set)
    """Candidates with their ``candidate_done``."""
    abandoned: int | None = None
    """The first index the proposer had no idea for (the round ends before it)."""

    @property
    def members(self) -> list[int]:
        end = self.first + self.k if self.abandoned is None else self.abandoned
        return list(range(self.first, end))


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
    round: RoundState | None = None
    """A parallel round in flight (``optimize/parallel.py``)."""
    rounds: int = 0
    """Rounds started."""
    tests: list[bool] = field(default_factory=list)
    """Each val test's slot of the error budget, in order, and whether it led to a kept candidate (a round's
    first judgements reserve theirs as not kept); read only when the run had rounds (``kept_before``)."""
    accept_order: list[int] = field(default_factory=list)
    """Accepted candidates in the order they were accepted (a round may accept a lower index last)."""

    @property
    def accepted(self) -> list[CandidateRecord]:
        return [c for _, c in sorted(self.candidates.items()) if c.accepted]

    @property
    def best(self) -> CandidateRecord | None:
        """The last accepted candidate (the current base)."""
        order = [n for n in self.accept_order if n in self.candidates and self.candidates[n].accepted]
        if order:
            return self.candidates[order[-1]]
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
        if self.rounds:
            return list(self.tests)
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
        elif kind == "round_started" and _int(ev.get("first")) is not None and _int(ev.get("k")):
            st.rounds += 1
            st.round = RoundState(id=_int(ev.get("round")) or st.rounds, base_n=_int(ev.get("base_n")) or 0,
                                  base_sha=str(ev.get("base_sha")), base_val_dir=str(ev.get("base_val_dir")),
                                  first=_int(ev.get("first")) or 0, k=_int(ev.get("k")) or 0,
                                  tests_before=len(st.tests))
            st.tests += [False] * st.round.k
        elif kind == "candidate_judged" and n is not None and st.round is not None:
            st.round.judged[n] = ev
        elif kind == "round_done":
            st.round = None
        elif kind == "candidate_done" and n is not None:
            st.candidates[n] = CandidateRecord(
                n=n, accepted=bool(ev.get("accepted")), sha=ev.get("sha"), ref=ev.get("ref"),
                reasons=[str(r) for r in ev.get("reasons") or []], rationale=ev.get("rationale") or "",
                val_dir=ev.get("val_dir"), val_score=ev.get("val_score"), delta=ev.get("delta"),
                tested=bool(ev.get("tested", ev.get("val_dir") is not None)), alpha=_num(ev.get("alpha")),
                evaluated=_int(ev.get("evaluated")), saved=_int(ev.get("saved")))
            if st.started == n:
                st.started = None
            if ev.get("accepted"):
                st.accept_order = [m for m in st.accept_order if m != n] + [n]
            if ev.get("round") is None:
                if st.candidates[n].tested:
                    st.tests.append(st.candidates[n].accepted)
            else:
                if st.round is not None:
                    st.round.done.add(n)
                if ev.get("rejudged") and st.candidates[n].tested:
                    st.tests.append(st.candidates[n].accepted)
        elif kind == "candidate_abandoned" and n is not None:
            if st.started == n:
                st.started = None
            if st.round is not None and ev.get("round") is not None:
                st.round.abandoned = n
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
