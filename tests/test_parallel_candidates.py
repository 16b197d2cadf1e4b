"""``optimize --parallel K``: rounds of K candidates from one base, judged at once, the best kept, each other
that passed re-judged against the new base; a crash costs one candidate; kill -9 mid-round, then resume.

Runs are subprocesses (``optimize_harness.py``) on tinyqa with the simulated echo model and the process
sandbox, proposing through ``parallel_plugins:Round`` (a plugin: isolated like any other).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from drive import drive
from parallel_support import ROUND, config, make_repo, ref_trees

from pipemend.fsutil import read_json, read_jsonl
from pipemend.journal import replay
from pipemend.manifest import load_manifest
from pipemend.protocols import ProposalContext
from pipemend.proposers.tools import ProposerTools
from pipemend.proposers import get_proposer
from pipemend.sandbox.ingest import SCRATCH_PREFIX

pytestmark = pytest.mark.timeout(600)


def summary_of(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def verdicts(summary: dict) -> list[list]:
    """Each candidate's verdict; commit ids in reasons masked (two runs' repos hold different commits)."""
    return [[c[k] for k in ("n", "accepted", "val_score", "delta", "alpha")] +
            [[re.sub(r"\b[0-9a-f]{12}\b", "SHA", r) for r in c["reasons"]]] for c in summary["candidates"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted ``--parallel 3`` run of ``ROUND``: its summary, refs (trees), run dir and repo."""
    tmp = tmp_path_factory.mktemp("parallel")
    target = make_repo(tmp / "repo")
    done = drive("start", json.dumps(config(tmp, target, "ref", ROUND)))
    return summary_of(done), ref_trees(tmp / "repo", "ref"), tmp / "reports" / "ref", tmp


def test_a_round_keeps_the_best_and_rejudges_the_others_against_it(reference):
    summary, refs, run_dir, tmp = reference
    by_n = {c["n"]: c for c in summary["candidates"]}
    # all three pass against the baseline (delta 1.0 each): the tie goes to the lowest index
    assert by_n[1]["accepted"] and summary["best"]["n"] == 1
    # 2 (pipeline.py) rebases cleanly onto 1 and is raced again against it: nothing left to gain, refused
    assert not by_n[2]["accepted"] and by_n[2]["delta"] == 0.0
    assert any("min_delta" in r or "delta" in r for r in by_n[2]["reasons"]), by_n[2]["reasons"]
    # 3 edits the line 1 changed: its diff does not apply onto the new base
    assert not by_n[3]["accepted"] and any("does not apply onto the new base" in r for r in by_n[3]["reasons"])
    assert set(refs) == {"refs/heads/pipemend/RUN/base", "refs/heads/pipemend/RUN/cand-1",
                         "refs/heads/pipemend/RUN/best",
                         "refs/pipemend/RUN/rejected/2", "refs/pipemend/RUN/rejected/3"}
    assert refs["refs/heads/pipemend/RUN/best"] == refs["refs/heads/pipemend/RUN/cand-1"]
    repo = tmp / "repo"
    # the re-judged 2 was kept as a commit on top of 1, holding both changes
    parent = subprocess.run(["git", "-C", str(repo), "rev-parse", "refs/pipemend/ref/rejected/2^"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert parent == subprocess.run(["git", "-C", str(repo), "rev-parse", "pipemend/ref/cand-1"],
                                    capture_output=True, text=True, check=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(repo), "diff", "--name-only", "refs/pipemend/ref/rejected/2^",
                              "refs/pipemend/ref/rejected/2"], capture_output=True, text=True,
                             check=True).stdout.split()
    assert changed == ["targets/tinyqa/pipeline.py"]
    # the journal: one round, 2 and 3 judged then re-judged, each in its own slot of the error budget
    events = list(read_jsonl(run_dir / "journal.jsonl"))
    assert [e["event"] for e in events].count("round_started") == 1
    assert sorted(e["n"] for e in events if e["event"] == "candidate_judged") == [1, 2, 3]
    done = {e["n"]: e for e in events if e["event"] == "candidate_done"}
    assert [done[n]["rejudged"] for n in (1, 2, 3)] == [False, True, True]
    assert (run_dir / "candidates/2/rebased/evals/val/scored.jsonl").is_file()
    assert len({by_n[1]["alpha"], by_n[2]["alpha"]}) == 2, "each test spends its own share"
    st = replay(run_dir)
    assert st.round is None and st.kept_before == [False, False, False, False]
    # each candidate was told what the ones proposed before it in the round were working on
    assert [c["rationale"].rsplit("[", 1)[-1] for c in summary["candidates"]] == \
           ["in flight: ]", "in flight: 1]", "in flight: 1, 2]"]


def test_a_crash_in_a_round_costs_only_that_candidate(tmp_path):
    target = make_repo(tmp_path / "repo")
    cfg = {**config(tmp_path, target, "crash", ["crash", "break"]), "parallel": 2, "max_candidates": 2}
    done = drive("start", json.dumps(cfg))
    summary = summary_of(done)
    by_n = {c["n"]: c for c in summary["candidates"]}
    assert any("proposer crashed" in r for r in by_n[1]["reasons"]) and by_n[1]["val_score"] is None
    # the round went on: its sibling was judged in full, its pipeline dying at import in every example
    assert not by_n[2]["accepted"] and by_n[2]["val_score"] == 0.0 and by_n[2]["delta"] == 0.0
    assert summary["status"] == "done" and summary["best"] is None


def test_the_ladder_proposes_k_distinct_options(tmp_path):
    """Three ladder proposals from one base, each told what the earlier ones are working on: three options."""
    target = make_repo(tmp_path / "repo")
    manifest = load_manifest(target)
    diagnosis = {"format": "pipemend-diagnosis-2", "counts": {"prompt": 4, "retrieval": 0, "context": 0, "model": 0},
                 "recommended": "prompt", "n_failed": 4}
    in_flight: list[dict] = []
    for n in (1, 2, 3):
        wt = tmp_path / f"wt{n}"
        subprocess.run(["cp", "-r", str(target), str(wt)], check=True)
        tools = ProposerTools(worktree=wt, target_subdir="", editable=manifest.editable,
                              protected=manifest.all_protected(), run_train=unused, read_trace=unused,
                              diagnose=unused, diff=unused)
        ctx = ProposalContext(candidate_index=n, worktree=wt, target_subdir="", manifest=manifest,
                              diagnosis=diagnosis, history=[], history_dir=None, tools=tools, budget=None,
                              in_flight=list(in_flight), log=lambda _: None)
        proposal = get_proposer("ladder").propose(ctx)  # a fresh ladder each time: only in_flight tells it
        assert proposal is not None
        in_flight.append({"n": n, "rung": proposal.rung, "rationale": proposal.rationale, "meta": proposal.meta})
    keys = [e["meta"]["ladder_key"] for e in in_flight]
    assert len(set(keys)) == 3, keys


def unused(*args, **kwargs):
    raise AssertionError("the ladder's prompt and knob options need no train run")


def mid_round(run_dir: Path, scratch: Path, at_least: int = 2):
    """True while ``at_least`` of the round's candidates are in the middle of a val evaluation at once."""
    def reached() -> bool:
        busy = 0
        for n in (1, 2, 3):
            evals = run_dir / "candidates" / str(n) / "evals"
            busy += any((d / "inputs.jsonl").is_file() and not (d / "scored.jsonl").exists()
                        for d in evals.glob("val*")) if evals.is_dir() else 0
        return busy >= at_least and any(scratch.glob(f"{SCRATCH_PREFIX}{run_dir.name}-*"))
    return reached


def test_kill_mid_round_then_resume_ends_like_the_uninterrupted_run(tmp_path, monkeypatch, reference):
    ref_summary, ref_refs, _, _ = reference
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("PIPEMEND_SCRATCH", str(scratch))
    target = make_repo(tmp_path / "repo")
    run_dir = tmp_path / "reports" / "kill"
    killed = drive("start", json.dumps(config(tmp_path, target, "kill", ROUND)), kill_when=mid_round(run_dir, scratch))
    assert killed is None, "the run finished before two candidates were evaluated at once"
    assert replay(run_dir).round is not None
    finished = {p: p.stat().st_mtime_ns for p in (run_dir / "candidates").glob("*/evals/*/summary.json")}
    done = drive("resume", str(run_dir))
    summary = summary_of(done)
    assert summary["status"] == "done"
    assert verdicts(summary) == verdicts(ref_summary)
    assert ref_trees(tmp_path / "repo", "kill") == ref_refs
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items()), "a finished evaluation ran again"
    misses = Counter(json.dumps(r["request"], sort_keys=True) for r in read_jsonl(run_dir / "gateway" / "calls.jsonl")
                     if r.get("cache") == "miss" and not r.get("error"))
    assert misses and max(misses.values()) == 1, "a request reached the backend twice"
    assert read_json(run_dir / "run.json")["status"] == "done"
