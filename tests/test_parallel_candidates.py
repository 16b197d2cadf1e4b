"""``optimize --parallel K``: rounds of K candidates from one base, judged at once, the best kept, each other
that passed re-judged against the new base; a crash costs one candidate; kill -9 at each stage of a round
(three candidates half-evaluated, all judged before the selection, a rebased one half re-judged), then resume.

Runs are subprocesses (``optimize_harness.py``) on tinyqa with the process sandbox, proposing through
``parallel_plugins:Round`` (a plugin: isolated like any other). The kill tests run on ``held_models:HeldEcho``
(an echo model that holds the prompts a test names) and stop at a point the run cannot pass while held, so no
kill depends on how fast anything is.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

import held_models
from drive import drive
from parallel_support import (KILL_ROUND, PROMPT_OF, REBASED_PROMPT, block_ref, commit_exists, config,
                              git_waits_on, make_repo, ref_trees, run_refs)

from pipemend.errors import RunFailed
from pipemend.fsutil import read_json, read_jsonl
from pipemend.journal import RoundState, replay
from pipemend.manifest import load_manifest
from pipemend.optimize.parallel import hold_judged, judged_ref
from pipemend.protocols import ProposalContext
from pipemend.proposers.tools import ProposerTools
from pipemend.proposers import get_proposer
from pipemend.report import render_report
from pipemend.review import list_candidates
from pipemend.sandbox.ingest import SCRATCH_PREFIX
from pipemend.sandbox.worktrees import snapshot_target

pytestmark = pytest.mark.timeout(600)


def summary_of(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def verdicts(summary: dict) -> list[list]:
    """Each candidate's verdict; commit ids in reasons masked (two runs' repos hold different commits)."""
    return [[c[k] for k in ("n", "accepted", "val_score", "delta", "alpha")] +
            [[re.sub(r"\b[0-9a-f]{12}\b", "SHA", r) for r in c["reasons"]]] for c in summary["candidates"]]


def kill_config(tmp_path: Path, target: Path, run_id: str) -> dict:
    return config(tmp_path, target, run_id, KILL_ROUND, model=held_models.NAME)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted ``--parallel 3`` run of ``KILL_ROUND`` (nothing held): its summary, refs (trees), run dir
    and the folder holding its repo. Every kill test ends as this run did."""
    tmp = tmp_path_factory.mktemp("parallel")
    target = make_repo(tmp / "repo")
    done = drive("start", json.dumps(kill_config(tmp, target, "ref")))
    return summary_of(done), ref_trees(tmp / "repo", "ref"), tmp / "reports" / "ref", tmp


def test_a_round_keeps_the_best_and_rejudges_the_others_against_it(reference):
    summary, refs, run_dir, tmp = reference
    by_n = {c["n"]: c for c in summary["candidates"]}
    # all three pass against the baseline (delta 1.0 each): the tie goes to the lowest index
    assert by_n[1]["accepted"] and summary["best"]["n"] == 1
    # 2 (pipeline.py and the prompts) rebases cleanly onto 1 and is raced again against it: nothing left to gain, refused
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
    assert changed == ["targets/tinyqa/pipeline.py", "targets/tinyqa/prompts/sentence.txt",
                       "targets/tinyqa/prompts/short.txt"]
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


# --------------------------------------------------------------------------- kill -9 at each stage of a round


def finished_evals(run_dir: Path) -> dict[str, int]:
    """Every finished evaluation of the run (its folder, run-relative, beside its ``.key.json``) -> the mtime of
    its ``outcome.json``."""
    return {str(key.relative_to(run_dir)).removesuffix(".key.json"):
            (key.parent / key.name.removesuffix(".key.json") / "outcome.json").stat().st_mtime_ns
            for key in run_dir.glob("**/*.key.json")}


def evaluating(run_dir: Path, rel: str) -> bool:
    """The evaluation in ``RUN_DIR/rel`` has started and not finished."""
    out = run_dir / rel
    return (out / "inputs.jsonl").is_file() and not (out.parent / f"{out.name}.key.json").exists()


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """The sandboxes' scratch folders go here (a killed run's are reaped by its resume: only this test's)."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setenv("PIPEMEND_SCRATCH", str(path))
    return path


def resume_like_the_reference(reference, tmp_path: Path, run_id: str, finished: dict[str, int],
                              hold: Path | None = None) -> dict:
    """Resume the killed run ``run_id``: it ends in the reference run's verdicts and refs, without running a
    finished evaluation again or sending any request to the model twice, and what the killed sandboxes left in
    the scratch folder is gone; returns its summary."""
    ref_summary, ref_refs, _, _ = reference
    run_dir = tmp_path / "reports" / run_id
    summary = summary_of(drive("resume", str(run_dir)))
    assert not list((tmp_path / "scratch").glob(f"{SCRATCH_PREFIX}{run_id}-*"))
    assert summary["status"] == "done" and read_json(run_dir / "run.json")["status"] == "done"
    assert verdicts(summary) == verdicts(ref_summary)
    assert ref_trees(tmp_path / "repo", run_id) == ref_refs, "refs differ (or a judged ref was left behind)"
    after = finished_evals(run_dir)
    assert all(after.get(rel) == t for rel, t in finished.items()), "a finished evaluation ran again (or was lost)"
    misses = Counter(json.dumps(r["request"], sort_keys=True) for r in read_jsonl(run_dir / "gateway" / "calls.jsonl")
                     if r.get("cache") == "miss" and not r.get("error"))
    assert misses and max(misses.values()) == 1, "the gateway sent a request to the model twice"
    if hold is not None:  # what reached the model itself, across the killed run and the resume
        sent = Counter(held_models.answered(hold))
        assert sent and max(sent.values()) == 1, [p for p, k in sent.items() if k > 1]
    assert replay(run_dir).round is None
    return summary


def test_kill_with_three_candidates_half_evaluated_then_resume(tmp_path, monkeypatch, scratch, reference):
    """Each candidate of the round has run 2 of its 8 val examples and waits on its third (held) when the run is
    killed: none of the three evaluations finished, all three started."""
    hold = tmp_path / "hold"
    monkeypatch.setenv(held_models.DIR_ENV, str(hold))
    prefixes = [PROMPT_OF[n] for n in (1, 2, 3)]
    held_models.hold(hold, prefixes, after=2)
    target = make_repo(tmp_path / "repo")
    run_dir = tmp_path / "reports" / "par-mid"
    killed = drive("start", json.dumps(kill_config(tmp_path, target, "par-mid")),
                   kill_when=lambda: held_models.reached(hold) >= set(prefixes))
    assert killed is None, "the run finished though its candidates' prompts were held"
    st = replay(run_dir)
    assert st.round is not None and not st.round.judged and not st.round.done
    assert all(evaluating(run_dir, f"candidates/{n}/evals/val") for n in (1, 2, 3))
    sent = Counter(next(p for p in prefixes if a.startswith(p)) for a in held_models.answered(hold)
                   if a.startswith(tuple(prefixes)))
    assert sent == {p: 2 for p in prefixes}, "each candidate had run two examples"
    finished = finished_evals(run_dir)
    assert finished and not [rel for rel in finished if rel.startswith("candidates/")]
    held_models.release(hold)
    resume_like_the_reference(reference, tmp_path, "par-mid", finished, hold)


def test_kill_after_judging_then_gc_then_resume(tmp_path, scratch, reference):
    """Killed after all three candidates were journaled judged, while the first is being accepted (its branch
    update waits on a lock): nothing but the ``judged`` refs names their commits, and a ``git gc --prune=now``
    before the resume keeps them. The resumed run ends as the reference, with no ``judged`` ref left; resuming
    the finished run changes nothing, and the report and the branch list read both states."""
    target = make_repo(tmp_path / "repo")
    run_id = "par-gc"
    repo, run_dir = tmp_path / "repo", tmp_path / "reports" / run_id
    accept_first = f"refs/heads/pipemend/{run_id}/cand-1"

    def accepting_the_first() -> bool:
        if not (repo / ".git" / f"{accept_first}.lock").exists() and any(
                e.get("event") == "round_started" for e in read_jsonl(run_dir / "journal.jsonl")):
            block_ref(repo, accept_first)
        return git_waits_on(repo, accept_first)

    killed = drive("start", json.dumps(kill_config(tmp_path, target, run_id)), kill_when=accepting_the_first)
    assert killed is None, "the run finished though its first acceptance was blocked"
    st = replay(run_dir)
    assert st.round is not None and sorted(st.round.judged) == [1, 2, 3] and not st.round.done
    shas = {n: st.round.judged[n]["sha"] for n in (1, 2, 3)}
    refs = run_refs(repo, run_id)
    assert set(refs) == {f"refs/heads/pipemend/{run_id}/base"} | {judged_ref(run_id, n) for n in shas}
    assert all(refs[judged_ref(run_id, n)] == sha for n, sha in shas.items())
    waiting = list_candidates(run_dir)  # the branch list and the report read a run killed mid-selection
    assert [c["n"] for c in waiting] == [1, 2, 3] and not [c for c in waiting if c["branch"] or c["ref"]]
    assert [(c["verdict"], c["accepted"]) for c in waiting] == [("judged, waiting for the round's selection", False)] * 3
    assert all(p.is_file() for p in render_report(run_dir))
    finished = finished_evals(run_dir)
    subprocess.run(["git", "-C", str(repo), "gc", "--quiet", "--prune=now", "--aggressive"], check=True)
    assert all(commit_exists(repo, sha) for sha in shas.values()), "gc deleted a judged candidate"
    summary = resume_like_the_reference(reference, tmp_path, run_id, finished)
    # a finished run: resume returns its summary and touches nothing
    events = (run_dir / "journal.jsonl").read_bytes()
    again = summary_of(drive("resume", str(run_dir)))
    assert verdicts(again) == verdicts(summary) and (run_dir / "journal.jsonl").read_bytes() == events
    assert ref_trees(repo, run_id) == reference[1]
    html, md = render_report(run_dir)
    assert "cand-1" in Path(md).read_text(encoding="utf-8")
    rows = {r["n"]: r for r in list_candidates(run_dir)}
    assert sorted(rows) == [1, 2, 3] and rows[1]["accepted"] and not rows[2]["accepted"]


def test_kill_while_a_rebased_candidate_is_rejudged_then_resume(tmp_path, monkeypatch, scratch, reference):
    """Candidate 1 accepted, candidate 2 rebased onto it and half re-judged (2 of 8 val examples; the third held),
    candidate 3 judged and waiting when the run is killed."""
    hold = tmp_path / "hold"
    monkeypatch.setenv(held_models.DIR_ENV, str(hold))
    held_models.hold(hold, [REBASED_PROMPT], after=2)
    target = make_repo(tmp_path / "repo")
    run_id = "par-rebased"
    run_dir = tmp_path / "reports" / run_id
    killed = drive("start", json.dumps(kill_config(tmp_path, target, run_id)),
                   kill_when=lambda: REBASED_PROMPT in held_models.reached(hold))
    assert killed is None, "the run finished though the rebased candidate's prompts were held"
    st = replay(run_dir)
    assert st.round is not None and sorted(st.round.judged) == [1, 2, 3] and st.round.done == {1}
    assert st.candidates[1].accepted and evaluating(run_dir, "candidates/2/rebased/evals/val")
    # 1 is kept (its judged ref is gone); 2 and 3 wait, each on its judged commit
    refs = run_refs(tmp_path / "repo", run_id)
    assert {ref.split(f"/{run_id}/", 1)[1] for ref in refs} == {"base", "cand-1", "best", "judged/2", "judged/3"}
    assert [refs[judged_ref(run_id, n)] for n in (2, 3)] == [st.round.judged[n]["sha"] for n in (2, 3)]
    rows = {c["n"]: (c["verdict"], c["accepted"]) for c in list_candidates(run_dir)}
    assert rows == {1: ("accepted", True), 2: ("being re-judged on the new base", False),
                    3: ("judged, waiting for the round's selection", False)}
    finished = finished_evals(run_dir)
    assert sorted(rel for rel in finished if rel.startswith("candidates/")) == [  # 1, 2, 3 against the base
        f"candidates/{n}/evals/val" for n in (1, 2, 3)]
    held_models.release(hold)
    resume_like_the_reference(reference, tmp_path, run_id, finished, hold)


def test_a_resumed_round_names_exactly_the_judged_commits_that_wait(tmp_path):
    """Before a round goes on, each judged candidate that waits has its ``judged`` ref (set again from the journal);
    a finished candidate's and an unjournaled one's are deleted; a waiting one whose commit is gone fails the run,
    naming it."""
    target = make_repo(tmp_path / "repo")
    snap = snapshot_target(target, "hold", tmp_path / "run")
    base = snap.resolve(snap.base_branch)
    c1, c2, c3 = (subprocess.run(["git", "-C", str(snap.repo), "commit-tree", f"{base}^{{tree}}", "-p", base, "-m",
                                  f"cand-{n}"], capture_output=True, text=True, check=True).stdout.strip()
                  for n in (1, 2, 3))
    snap.set_ref(judged_ref("hold", 1), c1)  # finished before the kill, its ref not yet deleted
    snap.set_ref(judged_ref("hold", 3), c1)  # a ref set just before a kill, for another commit
    snap.set_ref(judged_ref("hold", 4), c3)  # set, never journaled
    rnd = RoundState(id=1, base_n=0, base_sha=base, base_val_dir="evals/baseline-val", first=1, k=3, tests_before=0,
                     judged={1: {"sha": c1}, 2: {"sha": c2}, 3: {"sha": c3}}, done={1})
    env = SimpleNamespace(snap=snap, run_id="hold")
    hold_judged(env, rnd)
    assert snap.refs("refs/pipemend/hold/") == {judged_ref("hold", 2): c2, judged_ref("hold", 3): c3}
    rnd.judged[3] = {"sha": "1" * 40}
    with pytest.raises(RunFailed, match="candidate 3 .* 111111111111 is gone"):
        hold_judged(env, rnd)
