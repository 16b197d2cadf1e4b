"""A pipeline with no `pipemend.trace` markers, end to end under `pipemend eval` (issue 13, item 2).

Real parts: the gateway (HTTP, the strict `scripted:` model of `fixtures/targets/unmarked_qa/model.yaml`,
which answers from the context it is given), the process sandbox and runner, scoring, the call-log join,
diagnosis, files. The pipeline (`unmarked_qa`) retrieves the top document by keywords and makes one call
with the `anthropic` SDK; q3 and q4 retrieve the wrong document, q5 answers right in too many words.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipemend.diagnose import rediagnose
from pipemend.evaluate import hidden_paths, run_eval
from pipemend.fsutil import read_json, read_jsonl
from pipemend.manifest import load_manifest
from pipemend.proposers.tools import format_trace
from pipemend.report.load import read_trace
from pipemend.trace_join import JOINED_SOURCE

TARGETS = Path(__file__).parent / "fixtures" / "targets"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the gateway's response cache
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


def copy_target(tmp_path: Path) -> Path:
    dst = tmp_path / "unmarked_qa"
    shutil.copytree(TARGETS / "unmarked_qa", dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def drop_evidence_text(target: Path) -> list[str]:
    """Strip `evidence_text` from every row; returns the texts that were there."""
    rows = [json.loads(line) for line in (target / "data.jsonl").read_text().splitlines()]
    texts = [t for r in rows for t in r.pop("evidence_text")]
    (target / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return texts


def set_corpus(target: Path, corpus: str | None) -> None:
    manifest = yaml.safe_load((target / "pipemend.yaml").read_text())
    manifest["dataset"]["corpus"] = corpus
    if corpus is None:
        del manifest["dataset"]["corpus"]
    (target / "pipemend.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def evaluate_target(target: Path, tmp_path: Path, run_id: str, limit: int | None = None):
    return run_eval(target, split="val", limit=limit, model=f"scripted:{target / 'model.yaml'}", sandbox="process",
                    run_id=run_id, reports_dir=tmp_path / "reports")


def test_model_calls_become_generation_steps_and_retrieval_misses_are_found_by_evidence_text(tmp_path):
    target = copy_target(tmp_path)
    texts = [t for line in (target / "data.jsonl").read_text().splitlines() for t in json.loads(line)["evidence_text"]]
    run = evaluate_target(target, tmp_path, "text")
    assert not run.dead, run.dead
    val = run.run_dir / "evals" / "val"
    scored = {r["id"]: r for r in read_jsonl(val / "scored.jsonl")}
    assert {i: r["output"] for i, r in scored.items()} == {
        "q1": "Paris", "q2": "Tokyo", "q3": "Tokyo", "q4": "Tokyo", "q5": "The capital of Italy is Rome."}

    # each example's one model call is a generation step, joined from the call log in call order
    calls = {c["example_id"]: c for c in read_jsonl(run.run_dir / "gateway" / "calls.jsonl")}
    for example_id in scored:
        trace = read_json(val / "traces" / f"{example_id}.json")
        assert trace["trace_format"] == "pipemend-2" and trace["llm_calls"] == []
        [step] = trace["steps"]
        assert (step["kind"], step["source"], step["name"]) == ("generation", JOINED_SOURCE, "model call 1")
        assert step["inputs"]["system"] == "Answer with the name of the city only, using the context."
        [message] = step["inputs"]["messages"]
        assert message == {"role": "user", "content": calls[example_id]["request"]["messages"][0]["content"]}
        assert message["content"].startswith("Context: ")
        assert step["output"] == scored[example_id]["output"]
        assert [c["call_id"] for c in step["llm_calls"]] == [calls[example_id]["call_id"]]
    q3 = read_json(val / "traces" / "q3.json")
    assert "Tokyo is the capital of Japan" in q3["steps"][0]["inputs"]["messages"][0]["content"]

    # the agent's trace tool and the report read the same steps
    shown = format_trace(read_json(val / "traces" / "q3.json"))
    assert "model call 1 (generation)" in shown and "Tokyo is the capital of Japan" in shown
    assert read_trace(run.run_dir, "evals/val", "q3")["steps"][0]["source"] == JOINED_SOURCE

    diagnosis = read_json(run.run_dir / "diagnosis.json")
    assert diagnosis["format"] == "pipemend-diagnosis-2"
    assert diagnosis["ids"] == {"prompt": ["q5"], "retrieval": ["q3", "q4"], "context": [], "model": []}
    assert diagnosis["unattributed"] == 0 and diagnosis["unattributed_ids"] == []
    assert diagnosis["details"]["q3"]["rule"] == "gold_text_missing" and "d-au" in diagnosis["details"]["q3"]["evidence"]
    assert diagnosis["details"]["q5"]["rule"] == "extra_text"  # the gold reached the prompt: not retrieval

    # like expected and evidence, evidence_text never reaches the sandbox: the runner's inputs are id + inputs
    inputs_file = (val / "inputs.jsonl").read_text()
    assert all(set(row) == {"id", "inputs"} for row in read_jsonl(val / "inputs.jsonl"))
    assert "evidence" not in inputs_file and not any(t in inputs_file for t in texts)
    assert "data.jsonl" in hidden_paths(load_manifest(target), target, run.run_dir, [])


def test_a_corpus_file_gives_the_gold_texts_of_evidence_ids(tmp_path):
    target = copy_target(tmp_path)
    drop_evidence_text(target)
    set_corpus(target, "docs.jsonl")  # the pipeline reads it too: `runtime: [docs.jsonl]` keeps it readable
    run = evaluate_target(target, tmp_path, "corpus")
    assert not run.dead, run.dead
    diagnosis = read_json(run.run_dir / "diagnosis.json")
    assert diagnosis["ids"]["retrieval"] == ["q3", "q4"] and diagnosis["ids"]["prompt"] == ["q5"]
    assert diagnosis["details"]["q4"]["rule"] == "gold_text_missing" and "d-tor" in diagnosis["details"]["q4"]["evidence"]
    frozen = run.run_dir / "frozen"
    assert (frozen / "docs.jsonl").read_text() == (target / "docs.jsonl").read_text()
    assert "docs.jsonl" in read_json(frozen / "frozen.json")["files"]
    # the corpus is frozen: a later edit of the target's copy changes no diagnosis of this run
    (target / "docs.jsonl").write_text('{"id": "d-au", "text": "changed"}\n')
    assert rediagnose(run.run_dir).diagnosis.ids["retrieval"] == ["q3", "q4"]


def test_without_evidence_text_the_misses_are_unattributed_not_prompt(tmp_path):
    target = copy_target(tmp_path)
    drop_evidence_text(target)
    run = evaluate_target(target, tmp_path, "blind", limit=4)  # q1-q4: right, right, and two retrieval misses
    assert not run.dead, run.dead
    d = run.diagnosis
    assert d.counts == {"prompt": 0, "retrieval": 0, "context": 0, "model": 0}
    assert d.unattributed_ids == ["q3", "q4"] and d.recommended is None
    assert d.details["q3"].evidence.startswith("unattributed: no retrieval step and no evidence text")
    assert d.details["q3"].unjudged == ["retrieval", "context"]
    # the steps are still joined: the agent can read what the model saw
    trace = read_json(run.run_dir / "evals" / "val" / "traces" / "q4.json")
    assert trace["steps"][0]["output"] == "Tokyo"
