"""The ladder on a target it never saw whose parse step raises on the model's fenced JSON (issue 14, item 4).

Real parts: the optimize loop, the gateway with the strict ``scripted:`` model of
``fixtures/targets/raising_parse/model.yaml`` (JSON in a Markdown code fence unless the prompt says no code
fences; a 503 for the Wakanda question), the process sandbox and runner, scoring, diagnosis, the gate, git.
Every train example ends in an exception; the diagnosis still puts them on rungs, and the ladder acts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import optimize_harness

from pipemend.fsutil import read_json
from pipemend.optimize import OptimizeConfig, run_optimize

pytestmark = pytest.mark.timeout(300)
TARGET = Path(__file__).parent / "fixtures" / "targets" / "raising_parse"


def test_the_ladder_fixes_a_parse_step_that_raises_and_tries_the_retrieval_knob(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    target = tmp_path / "raising_parse"
    shutil.copytree(TARGET, target, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = OptimizeConfig(target=str(target), proposer="ladder", model=f"scripted:{target / 'model.yaml'}",
                         sandbox="process", run_id="raise", reports_dir=str(tmp_path / "reports"), budget_usd=1.0,
                         max_candidates=2)
    s = run_optimize(cfg, optimize_harness.RecordingProgress())
    run_dir = Path(s.run_dir)

    # every train example ended in an exception, yet only the failed model call is an error
    before = read_json(run_dir / "diagnosis.json")
    assert before["counts"] == {"prompt": 2, "retrieval": 1, "context": 0, "model": 0}
    assert before["error_ids"] == ["train-wakanda"] and before["recommended"] == "prompt"
    rules = {i: (d["rung"], d["rule"]) for i, d in before["details"].items()}
    assert rules == {"train-peru": ("prompt", "parse_error"), "train-kenya": ("prompt", "parse_error"),
                     "train-atlantis": ("retrieval", "retrieval_raised"), "train-wakanda": ("error", "gateway_error")}

    # the ladder's first change is the output-format rule aimed at the raising parse step; the gate keeps it
    first, second = s.candidates
    assert "[ladder: transform:bare_json]" in first.rationale and "2 train failures at the prompt rung" in first.rationale
    assert first.accepted and s.baseline["val"] == 0.0 and first.val_score == 1.0, first.reasons
    diff = (run_dir / "candidates" / "1" / "diff.patch").read_text()
    assert "prompts/answer.txt" in diff and "+Output format: reply with the JSON object only" in diff
    assert s.baseline["test"] == 0.0 and s.best["test"] == 1.0 and s.best["branch"] == "pipemend/raise/cand-1"

    # on the new base only the retrieval failure is left on a rung: the ladder tries the declared retrieval
    # knob, and the gate judges it (it changes nothing on val, so it is not kept)
    after = read_json(run_dir / "candidates" / "1" / "diagnosis.json")
    assert after["counts"] == {"prompt": 0, "retrieval": 1, "context": 0, "model": 0} and after["errors"] == 1
    assert "[ladder: knob:top_k=3]" in second.rationale and "1 train failures at the retrieval rung" in second.rationale
    assert not second.accepted and second.reasons
    assert "+  top_k: 3   # passages put in the prompt" in (run_dir / "candidates" / "2" / "diff.patch").read_text()
