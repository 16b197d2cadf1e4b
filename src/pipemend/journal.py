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
- ``candidate_done`` ``{n, accepted, sha, ref, reasons, rationale, val_dir, val_score, delta}``:
  the verdict is on disk and, when ``sha`` is set, committed and its branch or ref set.
- ``candidate_abandoned`` ``{n, reason}``: the proposer had no more ideas; nothing was kept.
- ``base_ready`` ``{n, train_dir}``: an accepted candidate's train run and diagnosis are done.
- ``loop_stopped`` ``{reason}``; ``test_done`` ``{baseline, best}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import read_jsonl
from .rundir import JOURNAL, journal

__all__ = ["CandidateRecord", "RunState", "replay", "record"]


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
    test: dict[str, Any] | None = None
    status: str = "running"

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
    def next_index(self) -> int:
        return max(self.candidates, default=0) + 1


def replay(run_dir: Path) -> RunState:
    """Fold ``RUN_DIR/journal.jsonl`` into a ``RunState`` (a torn last line is ignored)."""
    st = RunState()
    for ev in read_jsonl(Path(run_dir) / JOURNAL):
        kind = ev.get("event")
        if kind == "frozen":
            st.frozen = True
        elif kind == "snapshot":
            st.snapshot, st.base_sha = ev["snapshot"], ev["base_sha"]
        elif kind == "baseline_done":
            st.baseline = {k: ev.get(k) for k in ("train_dir", "val_dir", "train_score", "val_score")}
        elif kind == "candidate_started":
            st.started = int(ev["n"])
        elif kind == "candidate_done":
            n = int(ev["n"])
            st.candidates[n] = CandidateRecord(
                n=n, accepted=bool(ev["accepted"]), sha=ev.get("sha"), ref=ev.get("ref"),
                reasons=list(ev.get("reasons") or []), rationale=ev.get("rationale") or "",
                val_dir=ev.get("val_dir"), val_score=ev.get("val_score"), delta=ev.get("delta"))
            if st.started == n:
                st.started = None
        elif kind == "candidate_abandoned" and st.started == int(ev["n"]):
            st.started = None
        elif kind == "base_ready":
            st.ready.add(int(ev["n"]))
        elif kind == "loop_stopped":
            st.stop_reason = ev.get("reason")
        elif kind == "test_done":
            st.test = {"baseline": ev.get("baseline"), "best": ev.get("best")}
        elif kind in ("run_done", "run_failed"):
            st.status = kind[4:]
        elif kind == "run_resumed":
            st.status = "running"
    return st
