"""The journal: one fold for the loop and the report, and a torn last line (a crash mid-write) that never blocks a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import optimize_harness
from drive import drive

from pipemend.fsutil import append_jsonl, read_json, read_jsonl, repair_jsonl_tail
from pipemend.journal import record, repair, replay
from pipemend.report.load import journal_state, load_run
from pipemend.rundir import create_run_dir

TORN_TAILS = {
    "half a record": b'{"format": "pipemend-journal-1", "event": "candidate_do',
    "cut inside a UTF-8 character": '{"event": "candidate_done", "rationale": "caf\u00e9'.encode()[:-1],
    "zeros from a lost block": b"\0" * 37,
}


def _journal(tmp_path: Path) -> Path:
    run_dir = create_run_dir(tmp_path / "reports", "optimize-j", kind="optimize", target=tmp_path, config={})
    record(run_dir, "snapshot", snapshot={"repo": "r"}, base_sha="b0")
    record(run_dir, "candidate_started", n=1, base_sha="b0")
    record(run_dir, "candidate_done", n=1, accepted=True, sha="c1", ref="refs/heads/x", reasons=[], rationale="r",
           val_dir="candidates/1/evals/val", val_score=0.5, delta=0.25)
    return run_dir


@pytest.mark.parametrize("tail", list(TORN_TAILS))
def test_a_torn_last_line_is_ignored_and_the_next_event_starts_a_fresh_line(tmp_path: Path, tail: str) -> None:
    run_dir = _journal(tmp_path)
    with open(run_dir / "journal.jsonl", "ab") as f:
        f.write(TORN_TAILS[tail])  # a kill mid-write
    st = replay(run_dir)
    assert st.best is not None and st.best.sha == "c1" and st.events == 4

    record(run_dir, "run_resumed")  # what resume appends first
    record(run_dir, "candidate_started", n=2, base_sha="c1")
    events = [e["event"] for e in read_jsonl(run_dir / "journal.jsonl", tolerate_torn_tail=False)]
    assert events == ["run_started", "snapshot", "candidate_started", "candidate_done", "run_resumed",
                      "candidate_started"]
    assert replay(run_dir).started == 2


def test_repair_drops_a_torn_tail_keeps_a_whole_record_and_is_idempotent(tmp_path: Path) -> None:
    run_dir = _journal(tmp_path)
    path = run_dir / "journal.jsonl"
    whole = path.read_bytes()
    assert repair(run_dir) is None
    path.write_bytes(whole + b'{"event": "loop_st')
    assert "dropped a torn last line (18 bytes)" == repair(run_dir)
    assert path.read_bytes() == whole and repair(run_dir) is None
    # a record whose newline was lost is whole: it is kept, and counted by replay before and after
    path.write_bytes(whole + b'{"event": "loop_stopped", "reason": "budget"}')
    assert replay(run_dir).stop_reason == "budget"
    assert repair(run_dir) == "completed"
    assert path.read_bytes().endswith(b'"budget"}\n') and replay(run_dir).stop_reason == "budget"
    assert repair_jsonl_tail(tmp_path / "missing.jsonl") is None


def test_append_mends_any_jsonl_file_a_crash_cut(tmp_path: Path) -> None:
    """The gateway's call log goes through the same append: a torn call row never poisons the next one."""
    log = tmp_path / "gateway" / "calls.jsonl"
    append_jsonl(log, {"call_id": "c-1"})
    with open(log, "ab") as f:
        f.write(b'{"call_id": "c-2", "respo')
    append_jsonl(log, {"call_id": "c-3"})
    assert [r["call_id"] for r in read_jsonl(log, tolerate_torn_tail=False)] == ["c-1", "c-3"]


def test_the_report_folds_the_journal_with_the_journals_own_fold(tmp_path: Path) -> None:
    run_dir = _journal(tmp_path)
    record(run_dir, "loop_stopped", reason="max candidates")
    record(run_dir, "test_done", baseline=0.25, best=0.5)
    record(run_dir, "run_failed", error="disk full")
    assert journal_state(run_dir) == replay(run_dir)
    st = journal_state(run_dir)
    assert (st.error, st.stop_reason, st.test["best"], st.events) == ("disk full", "max candidates", 0.5, 7)
    # a bad line in the middle stops the loop's replay, but the report still shows what came before it
    path = run_dir / "journal.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4] + ["{garbage"] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match="line 5"):
        replay(run_dir)
    st = journal_state(run_dir)
    assert st.best is not None and st.best.sha == "c1" and st.stop_reason is None
    run = load_run(run_dir)
    assert [c["n"] for c in run["candidates"]] == [1] and run["best"]["sha"] == "c1"


# --------------------------------------------------------------------------- end to end: kill, tear, resume


def _started(run_dir: Path, n: int):
    def reached() -> bool:
        try:
            return any(e.get("event") == "candidate_started" and e.get("n") == n
                       for e in read_jsonl(run_dir / "journal.jsonl"))
        except (OSError, ValueError):
            return False
    return reached


@pytest.mark.timeout(900)
def test_a_run_killed_mid_write_resumes(tmp_path: Path) -> None:
    target = optimize_harness.make_repo(tmp_path / "repo")
    run_dir = tmp_path / "reports" / "torn"
    config = {"target": str(target), "proposer": "optimize_plugins:Script",
              "proposer_options": {"steps": ["short"]}, "sandbox": "process",
              "run_id": "torn", "reports_dir": str(tmp_path / "reports"), "budget_usd": 1.0}
    assert drive("start", json.dumps(config), kill_when=_started(run_dir, 1)) is None
    for rel, torn in (("journal.jsonl", b'{"format": "pipemend-journal-1", "t": 1, "event": "candidate_d'),
                      ("gateway/calls.jsonl", b'{"format": "pipemend-call-1", "call_id": "c-x", "requ')):
        with open(run_dir / rel, "ab") as f:
            f.write(torn)

    done = drive("resume", str(run_dir))
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "done" and [c["accepted"] for c in summary["candidates"]] == [True]
    events = [e["event"] for e in read_jsonl(run_dir / "journal.jsonl", tolerate_torn_tail=False)]
    assert "run_resumed" in events and events[-1] == "run_done"
    assert list(read_jsonl(run_dir / "gateway" / "calls.jsonl", tolerate_torn_tail=False))
    assert read_json(run_dir / "run.json")["status"] == "done"
