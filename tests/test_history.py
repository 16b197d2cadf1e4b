"""``history/<n>``: later proposers read each earlier candidate's whole train traces, within caps, and val only as
aggregates (never an id, an output or a trace of a val example), from real files a sandbox could have planted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipemend import gate
from pipemend.manifest import Gates
from pipemend.optimize import history
from pipemend.optimize.history import write_history
from pipemend.reasons import Reason

TRAIN = ["t1", "t2", "t3", "t4", "t5", "t6"]


def _trace(example_id: str, answer: str, *, error: str | None = None) -> dict:
    return {"trace_format": "pipemend-1", "example_id": example_id, "output": answer, "error": None,
            "steps": [{"id": "s1", "name": "retrieve", "kind": "retrieval", "inputs": {"query": f"q {example_id}"},
                       "output": [{"id": "d1", "text": "doc"}], "doc_ids": ["d1"], "error": None, "logs": []},
                      {"id": "s2", "name": "parse", "kind": "parse", "inputs": {"raw": f"```json {answer}```"},
                       "output": None, "logs": [{"source": "stderr", "message": "fenced"}],
                       "error": {"type": "ValueError", "message": error} if error else None,
                       "llm_calls": [{"gen_ai.request.model": "simulated/echo"}]}]}


def _run(cdir: Path, k: int, traces: dict[str, dict], scores: dict[str, float]) -> Path:
    run = cdir / "train" / str(k)
    (run / "traces").mkdir(parents=True)
    for example_id, trace in traces.items():
        (run / "traces" / f"{example_id}.json").write_text(json.dumps(trace))
    (run / "scored.jsonl").write_text("".join(json.dumps({"id": i, "split": "train", "score": s, "output": "o",
                                                          "error": None}) + "\n" for i, s in scores.items()))
    return run


@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    """A judged candidate's folder: two train runs, a val evaluation with its secrets, and what a sandbox planted."""
    cdir = tmp_path / "candidates" / "3"
    _run(cdir, 1, {"t1": _trace("t1", "old answer"), "t2": _trace("t2", "Paris", error="not JSON"),
                   "v1": _trace("v1", "VAL-SECRET-TRACE")}, {"t1": 0.0, "t2": 0.0})
    run2 = _run(cdir, 2, {"t1": _trace("t1", "new answer"), "t3": _trace("t3", "Rome")}, {"t1": 1.0, "t3": 1.0})
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(_trace("t4", "HOST-FILE")))
    os.symlink(outside, run2 / "traces" / "t4.json")
    os.mkfifo(run2 / "traces" / "t5.json")
    (run2 / "traces" / "t6.json").write_text("[1, 2, 3]")
    val = cdir / "evals" / "val"
    (val / "traces").mkdir(parents=True)
    (val / "traces" / "v2.json").write_text(json.dumps(_trace("v2", "VAL-SECRET-OUTPUT")))
    (val / "scored.jsonl").write_text(json.dumps({"id": "v2", "output": "VAL-SECRET-OUTPUT", "score": 0.0}) + "\n")
    (cdir / "diff.patch").write_text("--- a/x\n+++ b/x\n")
    (cdir / "rationale.md").write_text("parse the fenced JSON\n")
    return cdir


def _verdict() -> gate.Verdict:
    return gate.decide(3, changed=["pipeline.py"], static_reasons=[], stats=None, gates=Gates(),
                       extra_reasons=[Reason("regressions", "2 confirmed regressions", ("v2", "v9"))])


def test_history_holds_the_whole_train_traces_and_val_only_as_aggregates(tmp_path, cdir):
    h = tmp_path / "history" / "3"
    write_history(h, cdir, _verdict(), TRAIN)
    files = sorted(str(p.relative_to(h)) for p in h.rglob("*") if p.is_file())
    assert files == ["diff.patch", "rationale.md", "train_traces/index.json", "train_traces/t1.json",
                     "train_traces/t2.json", "train_traces/t3.json", "verdict.json"]
    # whole per-step traces, not summaries: the latest run of each example, every step with its inputs and error
    t1 = json.loads((h / "train_traces" / "t1.json").read_text())
    assert t1 == _trace("t1", "new answer")
    t2 = (h / "train_traces" / "t2.json").read_text()
    assert json.loads(t2) == _trace("t2", "Paris", error="not JSON") and "\n" in t2.strip()  # indented: line ranges
    index = json.loads((h / "train_traces" / "index.json").read_text())
    assert index["format"] == "pipemend-history-traces-1" and index["runs"] == [1, 2]
    assert [(r["id"], r["run"], r["score"]) for r in index["traces"]] == [("t2", 1, 0.0), ("t1", 2, 1.0), ("t3", 2, 1.0)]
    assert {r["id"] for r in index["left_out"]} == {"t4", "t5", "t6"}  # a link, a FIFO, not an object
    # the seal: nothing of val, not even a val trace planted among the train ones, nor the host file a link names
    everything = "".join(p.read_text() for p in h.rglob("*") if p.is_file())
    for secret in ("VAL-SECRET-TRACE", "VAL-SECRET-OUTPUT", "v1", "v2", "v9", "HOST-FILE"):
        assert secret not in everything
    verdict = json.loads((h / "verdict.json").read_text())
    assert verdict["reasons"] == ["2 confirmed regressions"] and verdict["stats"] == {}


def test_traces_past_the_caps_are_cut_with_a_note_failures_kept_first(tmp_path, cdir, monkeypatch):
    big = _trace("t3", "Rome")
    big["steps"][0]["output"] = [{"id": f"d{i}", "text": "w" * 3_000} for i in range(600)]
    (cdir / "train" / "2" / "traces" / "t3.json").write_text(json.dumps(big))
    monkeypatch.setattr(history, "MAX_TRACE_CHARS", 60_000)
    h = tmp_path / "history" / "3"
    write_history(h, cdir, _verdict(), TRAIN)
    text = (h / "train_traces" / "t3.json").read_text()
    assert len(text) <= 60_000
    cut = json.loads(text)  # still a JSON trace, step by step
    assert [s["name"] for s in cut["steps"]] == ["retrieve", "parse"] and cut["steps"][1]["inputs"] == {"raw": "```json Rome```"}
    assert "more items]" in text and "more characters]" in text
    row = next(r for r in json.loads((h / "train_traces" / "index.json").read_text())["traces"] if r["id"] == "t3")
    assert row["cuts"] > 0 and row["chars"] == len(text)
    # the total cap leaves out passing examples before failing ones
    monkeypatch.setattr(history, "MAX_TRACES_CHARS", len((h / "train_traces" / "t2.json").read_text()) + 10)
    write_history(h, cdir, _verdict(), TRAIN)
    index = json.loads((h / "train_traces" / "index.json").read_text())
    assert [r["id"] for r in index["traces"]] == ["t2"]
    assert {r["id"] for r in index["left_out"] if "reached" in r["why"]} == {"t1", "t3"}
    assert not (h / "train_traces" / "t1.json").exists()  # rewritten whole: nothing left of the earlier history


def test_a_candidate_without_train_runs_says_so(tmp_path):
    cdir = tmp_path / "candidates" / "1"
    cdir.mkdir(parents=True)
    h = tmp_path / "history" / "1"
    write_history(h, cdir, _verdict(), TRAIN)
    index = json.loads((h / "train_traces" / "index.json").read_text())
    assert index["traces"] == [] and "ran no train examples" in index["note"]
    assert not list(h.parent.glob(".partial-*"))


@pytest.mark.timeout(600)
def test_a_later_agent_reads_the_raw_traces_and_a_looping_one_costs_only_its_candidate(tmp_path):
    """Through the optimize loop: candidate 1's agent runs train, edits and submits; candidate 2's agent reads
    candidate 1's raw train traces from the history, then loops, and the harness ends it (``looping``): the
    candidate is refused with that reason, its transcript kept, and the run goes on to its end."""
    import optimize_harness
    import yaml

    from pipemend.fsutil import read_json, read_jsonl
    from pipemend.optimize import OptimizeConfig, run_optimize

    target = optimize_harness.make_repo(tmp_path / "repo")
    data = target / "data"
    train_ids = [json.loads(line)["id"] for line in (data / "train.jsonl").read_text().splitlines()]
    val_rows = [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines()]

    def turn(name, uid, tool, args, expect=None, cand=1):
        match = {"system_contains": f"This is candidate {cand}."}
        if expect:
            match["last_user_contains"] = expect
        return {"name": name, "once": True, "required": True, "match": match,
                "response": {"content": [{"type": "tool_use", "id": uid, "name": tool, "input": args}],
                             "stop_reason": "tool_use", "usage": {"input_tokens": 500, "output_tokens": 50}}}

    entries = [
        turn("c1-train", "a1", "run_train", {}),
        turn("c1-edit", "a2", "edit_file", {"path": "config.yaml", "old": "style: sentence", "new": "style: short"},
             expect="train examples"),
        turn("c1-submit", "a3", "submit", {"rationale": "answer with the city only", "rung": "prompt"},
             expect="edited config.yaml"),
        turn("c2-index", "b1", "history_read", {"path": "1/train_traces/index.json"}, cand=2),
        turn("c2-search", "b2", "history_search", {"pattern": '"kind": "generation"', "glob": "1/train_traces/*.json"},
             expect="pipemend-history-traces-1", cand=2),
        *(turn(f"c2-loop-{i}", f"b{3 + i}", "show_diff", {}, expect="(no changes yet)" if i else "train_traces/",
               cand=2) for i in range(4)),
    ]
    script = tmp_path / "agent.yaml"
    script.write_text(yaml.safe_dump({"entries": entries}, sort_keys=False))
    cfg = OptimizeConfig(target=str(target), proposer="claude", agent_model=f"scripted:{script}",
                         proposer_options={"max_retries": 0}, sandbox="process", run_id="hist",
                         reports_dir=str(tmp_path / "reports"), budget_usd=1.0, max_candidates=2)
    s = run_optimize(cfg, optimize_harness.RecordingProgress())
    run_dir = Path(s.run_dir)
    assert s.status == "done" and [c.accepted for c in s.candidates] == [True, False]
    v2 = read_json(run_dir / "candidates" / "2" / "verdict.json")
    assert any("agent session ended (looping)" in r and "show_diff" in r for r in v2["reasons"])
    calls = list(read_jsonl(run_dir / "agent" / "gateway" / "calls.jsonl"))
    assert len(calls) == len(entries) and not any(c.get("error") for c in calls)

    # candidate 1's history: its train run's whole traces, by train id
    h1 = run_dir / "history" / "1" / "train_traces"
    assert sorted(p.name for p in h1.iterdir()) == sorted([f"{i}.json" for i in train_ids] + ["index.json"])
    trace = json.loads((h1 / f"{train_ids[0]}.json").read_text())
    assert [st["kind"] for st in trace["steps"]] == ["retrieval", "generation", "parse"]
    # the second agent read them: the raw step lines came back to it
    records = [json.loads(line) for line in (run_dir / "candidates" / "2" / "transcript.jsonl").read_text().splitlines()]
    outputs = {r["tool_use_id"]: r["output"] for r in records if r["event"] == "tool"}
    assert f'"id": "{train_ids[0]}"' in outputs["b1"] and f'1/train_traces/{train_ids[0]}.json' in outputs["b2"]
    assert records[-1]["outcome"] == "ended" and records[-1]["reason"] == "looping"
    # and never a val example: no id, no output, no trace of val in the history it could read
    history_text = "".join(p.read_text() for p in (run_dir / "history").rglob("*") if p.is_file())
    val_outputs = {r["output"] for r in read_jsonl(run_dir / "candidates" / "1" / "evals" / "val" / "scored.jsonl")}
    for row in val_rows:
        assert row["id"] not in history_text and row["expected"] not in history_text
    assert all(str(o) not in history_text for o in val_outputs if o)
