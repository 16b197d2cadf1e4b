"""The optimize loop end to end: real git repo, real gateway (simulated echo model), real runner.

The proposer is a plugin loaded by dotted path (``tests/fixtures/optimize/optimize_plugins.py``).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from rich.console import Console

import optimize_harness

from pipemend import evidence
from pipemend.cli.optimize import print_summary
from pipemend.errors import BUDGET_REASONS, BudgetExhausted, UsageError
from pipemend.fsutil import read_json, read_jsonl
from pipemend.optimize import OptimizeConfig, ladder_change, resume, run_optimize
from pipemend.optimize.stops import ON_BUDGET, StopRun, check_limits, on_budget
from pipemend.proposers.budget import ProposerBudgetExhausted

# one xdist worker runs this module (.ci/run: --dist loadfile; the mark keeps it so under loadgroup), so its module-scoped runs are built once
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("optimize")]


@pytest.fixture()
def target(tmp_path):
    return optimize_harness.make_repo(tmp_path / "repo")


def _shared_run(tmp_path_factory, name, steps, **kw):
    """One full run shared by the tests of a module-scoped fixture (each full run costs seconds of evaluation)."""
    tmp = tmp_path_factory.mktemp(name)
    target = optimize_harness.make_repo(tmp / "repo")
    progress = optimize_harness.RecordingProgress()
    return _run(_cfg(tmp, target, steps, **kw), progress), progress, tmp / "repo"


def _cfg(tmp_path, target, steps, **kw):
    return OptimizeConfig(target=str(target), proposer="optimize_plugins:Script",
                          proposer_options={"steps": steps}, sandbox="process", run_id=kw.pop("run_id", "t1"),
                          reports_dir=str(tmp_path / "reports"), budget_usd=1.0, **kw)


def _run(cfg, progress=None):
    return run_optimize(cfg, progress or optimize_harness.RecordingProgress())


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def _refs(repo, run_id):
    out = _git(repo, "for-each-ref", "--format=%(refname)", f"refs/heads/pipemend/{run_id}", f"refs/pipemend/{run_id}")
    return sorted(out.split())


@pytest.fixture(scope="module")
def accepted_run(tmp_path_factory):
    """A run that accepts candidate 1 and rejects candidate 2: (summary, progress, repo)."""
    return _shared_run(tmp_path_factory, "accepted", ["short", "sentence"])


def test_accepts_a_good_candidate_and_rejects_a_regression(accepted_run):
    s, progress, repo = accepted_run
    assert s.status == "done" and s.stop_reason == "the proposer is out of ideas"
    assert [c.accepted for c in s.candidates] == [True, False]
    assert s.baseline["val"] == 0.0 and s.candidates[0].val_score == 1.0
    assert s.baseline["test"] == 0.0 and s.best["test"] == 1.0 and s.best["branch"] == "pipemend/t1/cand-1"
    assert _refs(repo, "t1") == ["refs/heads/pipemend/t1/base", "refs/heads/pipemend/t1/best",
                                 "refs/heads/pipemend/t1/cand-1", "refs/pipemend/t1/rejected/2"]
    assert _git(repo, "rev-parse", "pipemend/t1/best") == _git(repo, "rev-parse", "pipemend/t1/cand-1")
    # the accepted commit carries the rationale and the val delta, on top of the base
    msg = _git(repo, "log", "-1", "--format=%B", "pipemend/t1/cand-1")
    assert "answer style short" in msg and "delta +1.0000" in msg
    assert _git(repo, "rev-parse", "pipemend/t1/cand-1^") == _git(repo, "rev-parse", "pipemend/t1/base")
    assert "style: short" in _git(repo, "show", "pipemend/t1/cand-1:targets/tinyqa/config.yaml")
    # the rejected one is kept with its reasons, on top of the accepted one
    assert _git(repo, "rev-parse", "refs/pipemend/t1/rejected/2^") == _git(repo, "rev-parse", "pipemend/t1/cand-1")
    run_dir = Path(s.run_dir)
    v2 = read_json(run_dir / "candidates" / "2" / "verdict.json")
    assert v2["format"] == "pipemend-verdict-2" and not v2["accepted"]
    # racing: the first look (2 of 8 val examples) already breaks more than max_regressions 0 allows
    assert len(v2["stats"]["regressions"]) == 2 and v2["stats"]["evaluated"] == 2 and v2["stats"]["racing"]["saved"] == 6
    assert any("confirmed regression" in r and "stopped after 2 of 8" in r for r in v2["reasons"])
    # the run's error budget: candidate 1 spent the first share; kept, it passed its level on to candidate 2
    first, second = (evidence.alpha_for(0.8, kept)[1] for kept in ([], [False]))
    assert [c.alpha for c in s.candidates] == [pytest.approx(first), pytest.approx(first + second)]
    assert [c.val_saved for c in s.candidates] == [0, 6] and s.val_saved == 6 and "at most 20%" in s.guarantee
    v1 = read_json(run_dir / "candidates" / "1" / "verdict.json")
    assert v1["accepted"] and v1["stats"]["delta"] == 1.0 and len(v1["stats"]["fixed"]) == 8
    assert (run_dir / "candidates" / "1" / "diff.patch").read_text().count("+  style: short") == 1
    # the proposer's train run went through the one evaluation choke point
    assert (run_dir / "candidates" / "1" / "train" / "1" / "summary.json").is_file()
    # the user's checkout is untouched
    assert _git(repo, "status", "--porcelain") == "" and _git(repo, "branch", "--show-current") in ("master", "main")
    assert read_json(run_dir / "run.json")["status"] == "done"
    events = [e["event"] for e in read_jsonl(run_dir / "journal.jsonl")]
    assert events[0] == "run_started" and events[-1] == "run_done" and "test_done" in events
    assert not list((run_dir / "worktrees").glob("*")), "worktrees are removed"
    # the history a later proposer reads has val aggregates only
    hist = read_json(run_dir / "history" / "2" / "verdict.json")
    assert hist["stats"]["regressions"] == 2 and "val-greece" not in json.dumps(hist)
    # the report was refreshed as the run went and shows both candidates and the accepted branch
    html = (run_dir / "report.html").read_text()
    assert "pipemend/t1/cand-1" in html and "refs/pipemend/t1/rejected/2" in html
    assert (run_dir / "candidates" / "1" / "index.html").is_file()
    assert "pipemend/t1/cand-1" in (run_dir / "report.md").read_text()
    # what is left: failures per rung before and after, which the CLI prints under its summary table
    before = read_json(run_dir / "diagnosis.json")["counts"]
    after = read_json(run_dir / "candidates" / "1" / "diagnosis.json")["counts"]
    assert before["prompt"] > after["prompt"] == 0
    assert ladder_change(run_dir, 1).startswith(f"prompt {before['prompt']} → 0, retrieval")
    out = io.StringIO()
    print_summary(Console(file=out, width=200), s)
    assert f"baseline → best: prompt {before['prompt']} → 0, retrieval" in out.getvalue()
    assert "cand-1 accepted" in out.getvalue() and "pipemend/t1/cand-1" in out.getvalue()
    # the loop told its caller what it did, through the Progress callback only
    done = progress.events("candidate_done")
    assert [(e["n"], e["accepted"]) for e in done] == [(1, True), (2, False)]
    assert done[0]["val_score"] == 1.0 and done[0]["delta"] == 1.0 and done[0]["reasons"] == []
    assert any("regression" in r for r in done[1]["reasons"])
    assert [e["split"] for e in progress.events("diagnosis")] == ["train"]
    assert progress.events("diagnosis")[0]["diagnosis"]["counts"] == before
    logs = progress.texts("log")
    assert logs[0] == "baseline: train 0.000, val 0.000" and logs[-1] == "loop stopped: the proposer is out of ideas"
    statuses = progress.texts("status")
    assert "candidate 1: proposing · best val 0.000 · spent $0.0000" in statuses
    assert any(t.startswith("candidate 2: val look 1/3 · best val 1.000") for t in statuses), statuses
    assert any(t.startswith("test split: candidate 1") for t in statuses)


ATTACKS = {
    "metric": "metric.py: sealed file changed",
    "data": "data/val.jsonl: sealed file changed",
    "dotdot": "targets/escape.py: added outside the target folder",
    "symlink": "symlinks are refused",
    "paste": "label leak",
    "hardcode": "label leak",
    "copy_metric": "copies the metric's logic",
}


@pytest.fixture(scope="module")
def adversarial_run(tmp_path_factory):
    """One run whose candidate n is the n-th attack of ``ATTACKS``, each from a fresh worktree."""
    return _shared_run(tmp_path_factory, "adversarial", list(ATTACKS), run_id="adv")


@pytest.mark.parametrize("attack, reason", ATTACKS.items())
def test_adversarial_proposers_are_rejected_without_evaluation(adversarial_run, attack, reason):
    s, _, repo = adversarial_run
    assert [c.n for c in s.candidates] == list(range(1, len(ATTACKS) + 1))
    assert s.stop_reason == "the proposer is out of ideas", "a rejected attack costs only its own candidate"
    n = list(ATTACKS).index(attack) + 1
    c = s.candidates[n - 1]
    assert not c.accepted and any(reason in r for r in c.reasons), c.reasons
    run_dir = Path(s.run_dir)
    assert not (run_dir / "candidates" / str(n) / "evals").exists(), "static checks run before any evaluation"
    assert read_json(run_dir / "candidates" / str(n) / "verdict.json")["static_reasons"]
    assert s.best is None
    # what was refused is not in the candidate commit; a change that was kept but fails a check is a rejected ref
    rejected = f"refs/pipemend/{s.run_id}/rejected/{n}"
    assert (rejected in _refs(repo, s.run_id)) == (attack in ("paste", "hardcode", "copy_metric"))


def test_a_behaviourally_identical_change_is_not_accepted_and_the_candidate_limit_stops(tmp_path, target):
    s = _run(_cfg(tmp_path, target, ["comment", "nothing", "comment"], max_candidates=2))
    assert len(s.candidates) == 2 and s.stop_reason.startswith("candidate limit reached")
    assert [c.accepted for c in s.candidates] == [False, False]
    assert any("below min_delta" in r for r in s.candidates[0].reasons)
    assert s.candidates[1].reasons == ["the proposal changed no file"] and s.candidates[1].ref is None


def test_the_same_change_again_on_the_same_base_is_refused_without_an_evaluation(tmp_path, target):
    """A proposer that proposes exactly the change of a candidate already judged (and not kept) on this base:
    refused as a duplicate, with no val evaluation; the run goes on."""
    s = _run(_cfg(tmp_path, target, ["comment", "comment", "short"], max_candidates=3))
    assert [c.accepted for c in s.candidates] == [False, False, True]
    assert s.candidates[0].val_evaluated and any("below min_delta" in r for r in s.candidates[0].reasons)
    assert s.candidates[1].reasons == ["the same files as candidate 1, judged on this base and not kept; "
                                       "not evaluated again"]
    assert not s.candidates[1].val_evaluated
    assert not (Path(s.run_dir) / "candidates" / "2" / "evals").exists()
    assert f"refs/pipemend/{s.run_id}/rejected/2" in _refs(tmp_path / "repo", s.run_id)


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    """Candidates that fail each their own way, then a good one: a crashing proposer (1), a broken pipeline (2),
    a proposer out of its own budget (3), a plugin claiming the run's budget is spent (4), ``short`` (5)."""
    return _shared_run(tmp_path_factory, "failing", ["crash", "break", "spent", "budget", "short"])


def test_crashing_proposer_and_candidate_cost_only_themselves(failing_run):
    s, _, _ = failing_run
    assert [c.accepted for c in s.candidates] == [False, False, False, False, True]
    assert s.stop_reason == "the proposer is out of ideas"
    assert "proposer crashed: RuntimeError: the proposer fell over" in s.candidates[0].reasons
    assert any("below min_delta" in r for r in s.candidates[1].reasons)
    assert any("evaluation failed" in r for r in s.candidates[1].reasons), s.candidates[1].reasons
    run_dir = Path(s.run_dir)
    assert "RuntimeError" in (run_dir / "candidates" / "1" / "error.txt").read_text()
    rows = list(read_jsonl(run_dir / "candidates" / "2" / "evals" / "val" / "scored.jsonl"))
    assert rows and all(r["error"] for r in rows)
    assert s.best["n"] == 5 and s.best["test"] == 1.0


def test_a_proposer_out_of_its_own_budget_costs_only_its_candidate(failing_run):
    s, _, _ = failing_run
    c = s.candidates[2]
    assert not c.accepted and s.candidates[4].accepted and s.stop_reason == "the proposer is out of ideas"
    assert c.reasons == ["budget exhausted while proposing: proposer budget exhausted (turns): 40/40 turns"]
    assert c.ref is not None  # its partial edit is kept as a rejected ref, never evaluated
    run_dir = Path(s.run_dir)
    assert read_json(run_dir / "candidates" / "3" / "proposal.json")["agent_turns"] == 40
    assert not (run_dir / "candidates" / "3" / "evals").exists()


def test_a_plugin_cannot_stop_the_run_by_claiming_its_budget_is_spent(failing_run):
    """It costs its own candidate only: the run goes on to the next one."""
    s, _, _ = failing_run
    assert not s.candidates[3].accepted and s.candidates[4].accepted and s.stop_reason == "the proposer is out of ideas"
    assert s.candidates[3].reasons == ["budget exhausted while proposing: the gateway refused: budget exhausted"]


def test_the_time_limit_stops_before_any_candidate(tmp_path, target):
    s = _run(_cfg(tmp_path, target, ["comment"], run_id="t2", hours=1e-9))
    assert s.candidates == [] and s.stop_reason.startswith("time limit reached") and s.baseline["test"] == 0.0


def test_a_deadline_stops_proposing_and_a_later_one_reopens_the_run(tmp_path, target):
    """A CI job's end: the run stops before its first candidate at a past deadline and finishes (test split
    included); the next job's resume with a later deadline reopens it, proposes, and tests again."""
    s = _run(_cfg(tmp_path, target, ["comment"], run_id="t3", deadline=1.0))
    assert s.candidates == [] and s.stop_reason == "deadline reached (1970-01-01 00:00:01 UTC)"
    run_dir = tmp_path / "reports" / "t3"
    assert read_json(run_dir / "run.json")["status"] == "done"
    assert resume(run_dir).candidates == []  # without a new deadline a finished run stays finished
    resumed = resume(run_dir, deadline=time.time() + 3600)
    assert resumed.candidates and resumed.stop_reason != s.stop_reason
    assert read_json(run_dir / "run.json")["config"]["deadline"] == 1.0  # the drive's deadline is not the run's
    events = [e["event"] for e in read_jsonl(run_dir / "journal.jsonl")]
    assert events.count("test_done") == 2 and events.index("loop_reopened") < events.index("run_resumed")


def test_one_table_says_what_each_spent_budget_does():
    assert set(ON_BUDGET) == set(BUDGET_REASONS)
    assert {r for r, action in ON_BUDGET.items() if action == "skip_candidate"} == {"turns", "tokens", "usd", "time"}
    assert on_budget(ProposerBudgetExhausted("tokens", "spent")) == "skip_candidate"
    assert on_budget(ProposerBudgetExhausted("gateway", "the agent gateway refused")) == "stop_run"
    assert on_budget(BudgetExhausted("the run's gateway refused")) == "stop_run"  # a plain one is the run's budget
    assert StopRun.from_budget(BudgetExhausted("out")).message == "budget: out"
    with pytest.raises(ValueError, match="budget reason 'coins'"):
        BudgetExhausted("x", reason="coins")  # type: ignore[arg-type]


@pytest.mark.parametrize("kw, reason, text", [
    ({"done": 3}, "candidates", "candidate limit reached (3 of 3)"),
    ({"elapsed_s": 7200.0}, "hours", "time limit reached (2 h)"),
    ({"spent_usd": 0.8}, "budget", "budget spent ($0.8000 of $1.00, 20% kept for the test split)"),
    ({"now": 1_800_000_000.0}, "deadline", "deadline reached (2027-01-15 08:00:00 UTC)"),
])
def test_stop_rules(kw, reason, text):
    limits = {"done": 0, "max_candidates": 3, "elapsed_s": 0.0, "hours": 2.0, "spent_usd": 0.0, "budget_usd": 1.0,
              "test_reserve": 0.2, "now": 1_799_999_000.0, "deadline": 1_800_000_000.0}
    check_limits(**limits)  # nothing reached yet
    check_limits(**{**limits, "spent_usd": 0.79, "elapsed_s": 7199.0, "done": 2, "now": 1_799_999_999.0})
    with pytest.raises(StopRun) as stop:
        check_limits(**{**limits, **kw})
    assert stop.value.reason == reason and stop.value.message == text


def test_bad_config_is_a_usage_error_before_any_run_dir(tmp_path, target):
    with pytest.raises(UsageError):
        _run(_cfg(tmp_path, target.parent / "nope", ["short"]))
    with pytest.raises(UsageError):
        _run(_cfg(tmp_path, target, ["short"], run_id="bad id!"))
    with pytest.raises(Exception):
        OptimizeConfig(target=str(target), unknown=1)
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())


def test_resume_of_a_finished_run_returns_its_summary(accepted_run):
    s, _, _ = accepted_run
    journal = (Path(s.run_dir) / "journal.jsonl").read_bytes()
    again = resume(s.run_dir)
    assert again.best == s.best and again.status == "done" and again.best is not None
    assert [c.model_dump() for c in again.candidates] == [c.model_dump() for c in s.candidates]
    assert (Path(s.run_dir) / "journal.jsonl").read_bytes() == journal, "a finished run is not driven again"


@pytest.mark.slow  # a full run of up to six candidates; tests/test_proposers_ladder.py covers the ladder's steps
def test_the_ladder_proposer_finds_the_fix_through_the_loop(tmp_path, target):
    cfg = OptimizeConfig(target=str(target), proposer="ladder", sandbox="process", run_id="lad",
                         reports_dir=str(tmp_path / "reports"), budget_usd=1.0, max_candidates=6)
    s = _run(cfg)
    assert s.best is not None and s.best["val"] == 1.0 and s.best["test"] == 1.0, [c.reasons for c in s.candidates]
    assert "style: short" in _git(tmp_path / "repo", "show", "pipemend/lad/best:targets/tinyqa/config.yaml")
    # what it tried is in the history it is handed, so a later candidate never repeats a change
    diffs = [(Path(s.run_dir) / "candidates" / str(c.n) / "diff.patch").read_text() for c in s.candidates]
    assert len(set(diffs)) == len(diffs)


# the agent gateway's wiring through the loop is the same for both; claude-code's full run is in the slow group
# (tests/test_proposers_claude_code.py runs its sessions in the default one)
@pytest.mark.parametrize("proposer", ["claude", pytest.param("claude-code", marks=[pytest.mark.claude_code,
                                                                                 pytest.mark.slow])])
def test_an_agent_proposer_runs_through_its_own_gateway(tmp_path, target, proposer):
    """`--proposer claude|claude-code --agent-model scripted:...`: the agent's calls go to an agent-side
    gateway (logged apart from the pipeline's), its edit becomes an accepted branch, its transcript is kept."""
    import yaml

    if proposer == "claude-code":
        pytest.importorskip("claude_agent_sdk", reason="the claude-code extra is not installed")
    prefix = "mcp__pipemend__" if proposer == "claude-code" else ""

    def turn(name, blocks, expect=None, stop="tool_use"):
        entry = {"name": name, "once": True, "required": True,
                 "response": {"content": blocks, "stop_reason": stop,
                              "usage": {"input_tokens": 900, "output_tokens": 60}}}
        if expect:
            entry["match"] = {"last_user_contains": expect}
        return entry

    def tool(uid, name, args):
        return [{"type": "tool_use", "id": uid, "name": prefix + name, "input": args}]

    entries = [
        turn("read", tool("t1", "read_file", {"path": "config.yaml"})),
        turn("edit", tool("t2", "edit_file", {"path": "config.yaml", "old": "style: sentence", "new": "style: short"}),
             expect="style: sentence"),
        turn("submit", tool("t3", "submit", {"rationale": "answer with the entity only", "rung": "prompt"})),
    ]
    if proposer == "claude-code":  # Claude Code sends the submit's result back; the agent then ends its turn
        entries.append(turn("end", [{"type": "text", "text": "Submitted."}], expect="session is over", stop="end_turn"))
    script = tmp_path / "agent.yaml"
    script.write_text(yaml.safe_dump({"entries": entries}, sort_keys=False))
    cfg = OptimizeConfig(target=str(target), proposer=proposer, agent_model=f"scripted:{script}",
                         proposer_options={"max_retries": 0} if proposer == "claude" else {}, sandbox="process",
                         run_id="ag", reports_dir=str(tmp_path / "reports"), budget_usd=1.0, max_candidates=1)
    s = _run(cfg)
    run_dir = Path(s.run_dir)
    assert [c.accepted for c in s.candidates] == [True] and s.best["branch"] == "pipemend/ag/cand-1"
    agent_calls = list(read_jsonl(run_dir / "agent" / "gateway" / "calls.jsonl"))
    assert len(agent_calls) == len(entries) and all(c["model"].startswith("scripted:") for c in agent_calls)
    pipeline_calls = list(read_jsonl(run_dir / "gateway" / "calls.jsonl"))
    assert pipeline_calls and all(c["model"] == "simulated/echo" for c in pipeline_calls)
    assert (run_dir / "candidates" / "1" / "transcript.jsonl").is_file()
    assert "answer with the entity only" in _git(tmp_path / "repo", "log", "-1", "--format=%B", "pipemend/ag/cand-1")


def test_agent_model_is_refused_for_an_offline_proposer(tmp_path, target):
    with pytest.raises(UsageError, match="--agent-model"):
        _run(_cfg(tmp_path, target, ["short"], agent_model="claude-sonnet-4-5"))
    assert not (tmp_path / "reports").exists()


def test_flips_are_confirmed_on_both_sides_look_by_look_and_re_runs_of_greedy_calls_cost_nothing(accepted_run):
    """Every example the candidate flipped is re-run twice on each side (sample indices 1, 2); the echo model is
    greedy, so the re-runs are served from the cache: confirmation pays no model call."""
    s, _, repo = accepted_run
    target = repo / "targets" / "tinyqa"
    c = s.candidates[0]  # ``short``, the accepted one
    assert c.accepted, c.reasons
    run_dir = Path(s.run_dir)
    evals = run_dir / "candidates" / "1" / "evals"
    stats = read_json(run_dir / "candidates" / "1" / "verdict.json")["stats"]
    assert stats["evaluated"] == stats["n"] == 8 and len(stats["fixed"]) == 8 and stats["noise_flips"] == []
    assert stats["confirm"] == {"runs": 2, "examples": 8} and len(stats["racing"]["looks"]) == 2
    names = {p.name for p in evals.iterdir() if p.is_dir()}
    assert {"val-look1", "val-look2", "val-look3", "val"} <= names
    assert {f"confirm-look{k}-{side}-r{r}" for k in (1, 2, 3) for side in ("base", "cand") for r in (1, 2)} <= names
    merged = list(read_jsonl(evals / "val" / "scored.jsonl"))
    assert [r["id"] for r in merged] == [json.loads(line)["id"] for line in
                                          (target / "data" / "val.jsonl").read_text().splitlines()]
    samples = {json.loads((evals / f"{d}.key.json").read_text())["sample"] for d in names if d.startswith("confirm")}
    assert samples == {1, 2}
    calls = list(read_jsonl(run_dir / "gateway" / "calls.jsonl"))
    confirming = [c for c in calls if c.get("sample") in (1, 2)]
    assert confirming and all(c["cache"] == "hit" for c in confirming), "greedy re-runs are cache hits"


def test_a_run_is_driven_by_one_process_at_a_time(accepted_run):
    s, _, _ = accepted_run
    run_dir = Path(s.run_dir)
    fd = os.open(run_dir / "run.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process driving it
    try:
        with pytest.raises(UsageError, match="another pipemend process is driving this run"):
            resume(run_dir)
    finally:
        os.close(fd)
    assert resume(run_dir).status == "done"

