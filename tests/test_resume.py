"""kill -9 an optimize run at several points, resume it, and get the same branches without paying twice.

The run is a subprocess (``optimize_harness.py start``) killed with SIGKILL (its
whole process group, runner included) when the journal reaches an event; then
``optimize_harness.py resume`` finishes it. The accepted and rejected commits
must hold the same trees as an uninterrupted run's, and the gateway's call log
must show no request sent to the backend (a cache miss) twice.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import optimize_harness
from drive import drive
from sandbox_support import sandbox_or_skip

from pipemend.fsutil import read_json, read_jsonl
from pipemend.sandbox.docker import RUN_LABEL, docker_client
from pipemend.sandbox.ingest import SCRATCH_PREFIX

# one xdist worker runs this module (.ci/run: --dist loadfile; the mark keeps it so under loadgroup), so its module-scoped reference run is built once
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("resume")]
STEPS = ["comment", "short", "sentence"]


def _config(tmp_path: Path, target: Path, run_id: str) -> dict:
    return {"target": str(target), "proposer": "optimize_plugins:Script", "proposer_options": {"steps": STEPS},
            "sandbox": "process", "run_id": run_id, "reports_dir": str(tmp_path / "reports"), "budget_usd": 1.0}


def _refs(repo: Path, run_id: str) -> dict[str, str]:
    """Run-relative ref name -> tree sha of what it points at."""
    out = subprocess.run(["git", "-C", str(repo), "for-each-ref", "--format=%(refname) %(objectname)",
                          f"refs/heads/pipemend/{run_id}", f"refs/pipemend/{run_id}"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    refs = {}
    for line in filter(None, out):
        name, sha = line.split()
        tree = subprocess.run(["git", "-C", str(repo), "rev-parse", f"{sha}^{{tree}}"], capture_output=True,
                              text=True, check=True).stdout.strip()
        refs[name.replace(f"/{run_id}/", "/RUN/")] = tree
    return refs


def _events(run_dir: Path) -> list[dict]:
    try:
        return list(read_jsonl(run_dir / "journal.jsonl"))
    except (OSError, ValueError):
        return []


def _at_event(run_dir: Path, event: str, nth: int = 1, **match):
    def reached() -> bool:
        hits = [e for e in _events(run_dir) if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]
        return len(hits) >= nth
    return reached


def _mid_eval(run_dir: Path, rels: tuple[str, ...], scratch: Path):
    """True while the sandbox runs the evaluation in ``RUN_DIR/rel`` (one of ``rels``): its inputs are written,
    nothing is scored yet, and a scratch folder of the run exists (the sandbox writes there; the host ingests it
    when it ends, so results in the run directory would come too late). Evaluations of a run follow one another."""
    def reached() -> bool:
        return any((run_dir / rel / "inputs.jsonl").is_file() and not (run_dir / rel / "scored.jsonl").exists()
                   for rel in rels) and any(scratch.glob(f"{SCRATCH_PREFIX}{run_dir.name}-*"))
    return reached


def _container_running(run_id: str):
    """True while a Docker container labelled with this run is running (an evaluation inside it)."""
    client = docker_client()

    def reached() -> bool:
        return bool(client.containers.list(filters={"label": f"{RUN_LABEL}={run_id}", "status": "running"}))
    return reached


def _scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch folder of the test's own for the sandboxes' output (the driven runs inherit ``PIPEMEND_SCRATCH``)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("PIPEMEND_SCRATCH", str(scratch))
    return scratch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the same script: its refs (by tree) and summary."""
    tmp = tmp_path_factory.mktemp("reference")
    target = optimize_harness.make_repo(tmp / "repo")
    done = drive("start", json.dumps(_config(tmp, target, "ref")))
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert [c["accepted"] for c in summary["candidates"]] == [False, True, False]
    return _refs(tmp / "repo", "ref"), summary


KILL_POINTS = {
    "snapshot": lambda d, s: _at_event(d, "snapshot"),
    "baseline-mid-eval": lambda d, s: _mid_eval(d, ("evals/baseline-val",), s),
    "baseline_done": lambda d, s: _at_event(d, "baseline_done"),
    "candidate-2-started": lambda d, s: _at_event(d, "candidate_started", n=2),
    "candidate-2-mid-look": lambda d, s: _mid_eval(d, ("candidates/2/evals/val-look2",), s),  # a racing look
    "candidate-2-mid-confirm": lambda d, s: _mid_eval(d, ("candidates/2/evals/confirm-look1-cand-r2",), s),
    "candidate-2-done": lambda d, s: _at_event(d, "candidate_done", n=2),
    "base_ready": lambda d, s: _at_event(d, "base_ready", n=2),
    "loop_stopped": lambda d, s: _at_event(d, "loop_stopped"),
    "test_done": lambda d, s: _at_event(d, "test_done"),
}


FAST_POINTS = ("candidate-2-mid-look",)
"""Kill points in the fast suite; the rest of the matrix runs with ``-m slow`` (each is a full run and a resume).
``base_ready`` is also killed and resumed, with the same checks, by the missing-branch test below."""


def _check_resumed_like_the_reference(run_dir: Path, repo: Path, run_id: str, status: str,
                                      done: subprocess.CompletedProcess, reference) -> None:
    """The resumed run ends as the uninterrupted one did, and no request reached the backend twice."""
    ref_refs, ref_summary = reference
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "done"
    verdicts = ("n", "accepted", "val_score", "delta", "alpha", "val_evaluated", "val_saved", "reasons")
    assert [[c[k] for k in verdicts] for c in summary["candidates"]] == \
           [[c[k] for k in verdicts] for c in ref_summary["candidates"]], "the same verdicts"
    assert summary["best"]["test"] == ref_summary["best"]["test"] and summary["baseline"] == ref_summary["baseline"]
    assert _refs(repo, run_id) == ref_refs

    # no request reached the backend twice: every repeat was served from the cache
    misses = Counter(json.dumps(r["request"], sort_keys=True)
                     for r in read_jsonl(run_dir / "gateway" / "calls.jsonl")
                     if r.get("cache") == "miss" and not r.get("error"))
    assert misses and max(misses.values()) == 1, [k for k, v in misses.items() if v > 1][:2]
    events = [e["event"] for e in read_jsonl(run_dir / "journal.jsonl")]
    assert ("run_resumed" in events) == (status == "running") and events[-1] == "run_done"
    assert events.count("test_done") == 1 and events.count("baseline_done") == 1


@pytest.mark.parametrize("point", [p if p in FAST_POINTS else pytest.param(p, marks=pytest.mark.slow)
                                   for p in KILL_POINTS])
def test_kill_then_resume_ends_in_the_same_branches(tmp_path, monkeypatch, reference, point):
    scratch = _scratch(tmp_path, monkeypatch)
    target = optimize_harness.make_repo(tmp_path / "repo")
    run_dir = tmp_path / "reports" / "kill"
    killed = drive("start", json.dumps(_config(tmp_path, target, "kill")),
                   kill_when=KILL_POINTS[point](run_dir, scratch))
    assert killed is None, f"the run finished before the kill point {point}"
    status = read_json(run_dir / "run.json")["status"]  # "done" only when killed in its last milliseconds
    assert status in ("running", "done")

    finished = {p: p.stat().st_mtime_ns for p in (run_dir / "candidates" / "2" / "evals").glob("*/summary.json")}
    done = drive("resume", str(run_dir))
    _check_resumed_like_the_reference(run_dir, tmp_path / "repo", "kill", status, done, reference)
    # evaluations that had finished before the kill (the first look, its confirmations) were read back
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items()), "a finished evaluation ran again"
    if point in FAST_POINTS:
        assert finished, "the kill came after some of the candidate's evaluations had finished"


def test_a_missing_accepted_branch_is_restored_from_its_sha(tmp_path, monkeypatch, reference):
    """A kill at ``base_ready`` of candidate 2, then its branch and ``best`` lost (with git's lock files left):
    resume restores both and ends like the uninterrupted run."""
    target = optimize_harness.make_repo(tmp_path / "repo")
    run_dir = tmp_path / "reports" / "lost"
    killed = drive("start", json.dumps(_config(tmp_path, target, "lost")),
                   kill_when=KILL_POINTS["base_ready"](run_dir, _scratch(tmp_path, monkeypatch)))
    assert killed is None, "the run finished before the kill point base_ready"
    status = read_json(run_dir / "run.json")["status"]
    assert status in ("running", "done")
    repo = tmp_path / "repo"
    sha = [e for e in _events(run_dir) if e.get("event") == "candidate_done" and e["n"] == 2][0]["sha"]
    for branch in ("pipemend/lost/cand-2", "pipemend/lost/best"):
        subprocess.run(["git", "-C", str(repo), "update-ref", "-d", f"refs/heads/{branch}"], check=True)
        # a git killed inside update-ref leaves the ref's lock file behind; resume clears this run's
        (repo / ".git" / "refs" / "heads" / f"{branch}.lock").write_text("")
    done = drive("resume", str(run_dir))
    assert not list((repo / ".git" / "refs" / "heads" / "pipemend" / "lost").rglob("*.lock"))
    for branch in ("pipemend/lost/cand-2", "pipemend/lost/best"):
        got = subprocess.run(["git", "-C", str(repo), "rev-parse", branch], capture_output=True, text=True).stdout.strip()
        assert got == sha
    _check_resumed_like_the_reference(run_dir, repo, "lost", status, done, reference)


def test_refs_the_journal_does_not_back_are_removed_on_resume(tmp_path, reference):
    """A kill after a candidate's commit and refs but before its ``candidate_done``, then a redo that ends
    differently: no branch may go on naming the lost attempt (issue 11, seal 8)."""
    target = optimize_harness.make_repo(tmp_path / "repo")
    run_dir = tmp_path / "reports" / "stray"
    drive("start", json.dumps(_config(tmp_path, target, "stray")), kill_when=_at_event(run_dir, "candidate_started", n=3))
    repo = tmp_path / "repo"
    rejected = [e for e in _events(run_dir) if e.get("event") == "candidate_done" and e["n"] == 1][0]["sha"]
    # what the killed attempt at candidate 3 left, had it been accepted: its branch, best moved onto it
    for ref in ("refs/heads/pipemend/stray/cand-3", "refs/heads/pipemend/stray/best", "refs/pipemend/stray/rejected/7"):
        subprocess.run(["git", "-C", str(repo), "update-ref", ref, rejected], check=True)
    drive("resume", str(run_dir))
    assert _refs(repo, "stray") == reference[0]


@pytest.mark.slow  # a kill and a resume; test_cli_eval covers EvalKey reuse in the default group
def test_a_redone_candidate_reuses_its_finished_evaluation_from_disk(tmp_path, reference):
    ref_refs, _ = reference
    target = optimize_harness.make_repo(tmp_path / "repo")
    run_dir = tmp_path / "reports" / "kill"
    key = run_dir / "candidates" / "2" / "evals" / "val-look3.key.json"  # its last racing look finished
    assert drive("start", json.dumps(_config(tmp_path, target, "kill")), kill_when=key.is_file) is None
    summary = run_dir / "candidates" / "2" / "evals" / "val-look3" / "summary.json"
    before = summary.stat().st_mtime_ns
    drive("resume", str(run_dir))
    assert summary.stat().st_mtime_ns == before, "the finished val evaluation was read back, not re-run"
    merged = list(read_jsonl(run_dir / "candidates" / "2" / "evals" / "val" / "scored.jsonl"))
    assert len(merged) == 8, "the looks were merged into the candidate's val evaluation"
    assert _refs(tmp_path / "repo", "kill") == ref_refs


# `reap(None)` (doctor --clean) removes every dead owner's orphans on the machine: its tests see no Docker engine,
# and under --dist loadgroup this mark keeps them on one worker with the tests that count orphans (tests/conftest.py)
@pytest.mark.xdist_group("reap")
@pytest.mark.docker
def test_a_docker_run_killed_mid_evaluation_leaves_nothing_after_resume(tmp_path, monkeypatch):
    """kill -9 of pipemend while a container evaluates, then ``resume``: no container, process or scratch
    folder of the run is left (issue 18)."""
    sandbox_or_skip("docker")
    scratch = _scratch(tmp_path, monkeypatch)
    target = optimize_harness.make_repo(tmp_path / "repo")
    run_dir = tmp_path / "reports" / "dock"
    # no candidates: the kill lands in the baseline, and the resumed run only has to finish it and the test split
    config = {**_config(tmp_path, target, "dock"), "sandbox": "docker", "proposer_options": {"steps": []}}
    # the kill lands while the baseline's container runs: its results reach the run directory only
    # after it exits, so the journal or results.jsonl would be seen too late
    killed = drive("start", json.dumps(config), kill_when=_container_running("dock"))
    assert killed is None, "the run finished before a container of it was seen running"

    def leftovers():
        containers = docker_client().containers.list(all=True, filters={"label": f"{RUN_LABEL}=dock"})
        return [c.id for c in containers] + sorted(p.name for p in scratch.glob(f"{SCRATCH_PREFIX}dock-*"))

    assert leftovers(), "the kill should have left the evaluating container or its scratch folder behind"
    done = drive("resume", str(run_dir))
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "done"
    assert leftovers() == []

