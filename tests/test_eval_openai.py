"""Pipelines written with the ``openai`` SDK, LiteLLM and DSPy under ``pipemend eval``, end to end.

The targets import nothing of pipemend. ``fixtures/targets/openai_rag``: keyword retrieval of the top
document, then one chat completion through ``OpenAI()``, which finds the gateway only through the
``OPENAI_BASE_URL``/``OPENAI_API_KEY`` the runner sets. ``litellm_qa``: LiteLLM calls with
``anthropic/...`` and ``openai/...`` model names (both APIs). ``dspy_qa``: a DSPy program (through
LiteLLM) whose retriever is a ``dspy.Retrieve``; ``langchain_qa``: a LangChain chain (a ``BaseRetriever``,
``ChatOpenAI``); pipemend's framework hooks make their calls trace steps, the retrievers retrieval steps
with the ids the diagnosis reads. Each runs from its own ``requirements.txt`` in the Docker and bubblewrap sandboxes, whose
only way out is the gateway's unix socket and the runner's forwarder. The model is a strict
``scripted:`` fake that answers from what reached the prompt, so the scores follow the pipeline:
one of the three val questions of each target misses. LiteLLM and DSPy install some 400 MB, so
their runs are in the slow group, as is the LangChain one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipemend.evaluate import run_eval
from pipemend.fsutil import read_json, read_jsonl
from pipemend.gateway.model_files import default_model_path
from sandbox_support import sandbox_or_skip

TARGETS = Path(__file__).parent / "fixtures" / "targets"
SANDBOXES = [pytest.param("docker", marks=pytest.mark.docker), pytest.param("bwrap", marks=pytest.mark.bwrap)]
REAL_KEY = "sk-real-openai-key-must-never-reach-a-pipeline"
SCRIPT = [
    {"match": {"system_contains": "context only", "last_user_contains": ["[d-vell]", "harbour master"]},
     "text": "Ada Quill"},
    {"match": {"system_contains": "context only", "last_user_contains": ["[d-orsk]", "Orsk glacier"]}, "text": "Tamsin"},
    {"match": {"system_contains": "context only", "last_user_contains": ["[d-pell]", "sourdough"]},
     "text": "The great flood."},
    {"match": {"system_contains": "context only", "last_user_contains": "[d-dunn]"}, "text": "Not in the context."},
]
# val-vell's keywords tie between its gold document and the distractor d-dunn, which sorts first
EXPECTED_OUTPUTS = {"val-vell": "Not in the context.", "val-orsk": "Tamsin", "val-pell": "The great flood."}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # a fresh LLM cache: every call reaches the script
    monkeypatch.setenv("OPENAI_API_KEY", REAL_KEY)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-real")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


def copy_target(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(TARGETS / name, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def eval_target(tmp_path: Path, name: str, entries: list[dict], sandbox: str, *, outputs: dict[str, str],
                score: float, calls_each: int) -> tuple[Any, dict, list[dict]]:
    """``run_eval`` of target ``name``'s val split on a scripted model made of ``entries``: the result,
    the scored rows by id and the call log, after the checks every target shares: no dead sandbox, no
    example error, these ``outputs`` and val ``score``, ``calls_each`` calls per example, every call tied
    to a val example of this evaluation and to its trace."""
    sandbox_or_skip(sandbox)
    target = copy_target(name, tmp_path)
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"entries": entries}))
    model = f"scripted:{script}"
    result = run_eval(target, split="val", model=model, sandbox=sandbox, run_id=f"{name}-{sandbox}",
                      reports_dir=tmp_path / "reports")
    assert result.dead == []
    run_dir = result.run_dir
    scored = {r["id"]: r for r in read_jsonl(run_dir / "evals" / "val" / "scored.jsonl")}
    assert all(r["error"] is None and r["llm_calls"] == calls_each and r["input_tokens"] > 0
               for r in scored.values()), scored
    assert {i: r["output"] for i, r in scored.items()} == outputs
    assert result.summaries["val"]["score"] == pytest.approx(score)
    calls = list(read_jsonl(run_dir / "gateway" / "calls.jsonl"))
    assert {c["example_id"] for c in calls} == set(scored)
    assert all(c["error"] is None and c["model"] == model for c in calls)
    assert len({c["eval"] for c in calls}) == 1 and calls[0]["eval"]  # the evaluation's token on every call
    for ex_id, row in scored.items():  # the runner read the gateway's headers off the clients' responses
        trace = read_json(run_dir / "evals" / "val" / "traces" / f"{ex_id}.json")
        recorded = trace["llm_calls"] + [c for s in trace["steps"] for c in s["llm_calls"]]
        assert [c["call_id"] for c in recorded] == [c["call_id"] for c in calls if c["example_id"] == ex_id]
        assert len(recorded) == row["llm_calls"]
        assert all(c["gen_ai.request.model"] == model and c["pipemend.cache_hit"] is False for c in recorded)
    return result, scored, calls


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_an_openai_sdk_pipeline_runs_unchanged_and_its_calls_are_tied_to_examples(tmp_path: Path, sandbox: str):
    result, scored, calls = eval_target(tmp_path, "openai_rag", SCRIPT, sandbox, outputs=EXPECTED_OUTPUTS,
                                        score=2 / 3, calls_each=1)
    summary = result.summaries["val"]
    assert summary["n"] == 3 and summary["errors"] == 0
    assert {i: r["score"] for i, r in scored.items()} == {"val-vell": 0.0, "val-orsk": 1.0, "val-pell": 1.0}
    assert all(c["api"] == "openai-chat" for c in calls)
    by_example = {c["example_id"]: c for c in calls}
    assert "[d-dunn]" in by_example["val-vell"]["request"]["messages"][0]["content"]  # the retrieval miss
    assert by_example["val-orsk"]["request"]["system"].startswith("Answer the question from the context only")
    trace = read_json(result.run_dir / "evals" / "val" / "traces" / "val-orsk.json")
    # no markers: the host joined the call into a generation step, carrying the runner's record of it
    step_calls = [c for st in trace["steps"] for c in st["llm_calls"]]
    assert [st["source"] for st in trace["steps"]] == ["call_log"] and trace["llm_calls"] == []
    assert [c["gen_ai.provider.name"] for c in step_calls] == ["openai"]


LITELLM_SCRIPT = [
    *({"match": {"system_contains": "Name the country", "last_user_contains": country.capitalize()}, "text": country}
      for country in ("norway", "chile", "peru")),
    {"match": {"system_contains": "from the fact only", "last_user_contains": "capital of Norway is Oslo"},
     "text": "Oslo"},
    {"match": {"system_contains": "from the fact only", "last_user_contains": "capital of Chile is Santiago"},
     "text": "Santiago"},
    {"match": {"system_contains": "from the fact only", "last_user_contains": "no fact found"}, "text": "unknown"},
]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_litellm_pipeline_calls_both_apis_through_the_gateway(tmp_path: Path, sandbox: str):
    outputs = {"val-norway": "Oslo", "val-chile": "Santiago", "val-peru": "unknown"}
    _, scored, calls = eval_target(tmp_path, "litellm_qa", LITELLM_SCRIPT, sandbox, outputs=outputs, score=2 / 3,
                                   calls_each=2)
    for ex_id in scored:  # anthropic/ went to the Messages API, openai/ (streamed) to Chat Completions
        assert [c["api"] for c in sorted((c for c in calls if c["example_id"] == ex_id), key=lambda c: c["t"])] == [
            "anthropic-messages", "openai-chat"]


def dspy_answer(passage: str, question_words: str, answer: str) -> dict:
    return {"match": {"system_contains": "Answer the question from the context",
                      "last_user_contains": [f"[{passage}]", question_words, "[[ ## answer ## ]]"]},
            "text": f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"}


DSPY_SCRIPT = [dspy_answer("d-vell", "harbour master", "Ada Quill"), dspy_answer("d-dunn", "harbour master", "unknown"),
               dspy_answer("d-orsk", "Orsk glacier", "Tamsin"), dspy_answer("d-pell", "sourdough", "the great flood")]


RETRIEVED = {"val-vell": ["d-dunn"], "val-orsk": ["d-orsk"], "val-pell": ["d-pell"]}
"""What each val question's keyword retrieval returns (val-vell misses its gold d-vell)."""


def check_hooked_traces(result: Any, calls: list[dict], source: str, retriever: str, model_step: str) -> None:
    """The framework hook's steps: one retrieval step named ``retriever`` with the retrieved ids, the example's
    model call on the generation step whose name starts with ``model_step``, no call-log join (the trace has
    steps); and the diagnosis puts val-vell's miss on the retrieval rung from those ids."""
    for ex_id, retrieved in RETRIEVED.items():
        trace = read_json(result.run_dir / "evals" / "val" / "traces" / f"{ex_id}.json")
        steps = trace["steps"]
        assert [(s["name"], s["doc_ids"]) for s in steps if s["kind"] == "retrieval"] == [(retriever, retrieved)]
        assert {s.get("source") for s in steps} == {source}
        holding = [s for s in steps if s["llm_calls"]]
        assert len(holding) == 1 and holding[0]["kind"] == "generation" and holding[0]["name"].startswith(model_step)
        assert [c["call_id"] for c in holding[0]["llm_calls"]] == [c["call_id"] for c in calls if c["example_id"] == ex_id]
    diagnosis = read_json(result.run_dir / "diagnosis.json")
    assert diagnosis["ids"]["retrieval"] == ["val-vell"] and diagnosis["unattributed"] == 0
    assert diagnosis["details"]["val-vell"]["rule"] == "missing_gold" and "d-vell" in diagnosis["details"]["val-vell"]["evidence"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_dspy_program_runs_unchanged_through_the_gateway(tmp_path: Path, sandbox: str):
    outputs = {"val-vell": "unknown", "val-orsk": "Tamsin", "val-pell": "the great flood"}
    # one call each: DSPy parsed the first answer, no JSON-adapter retry
    result, _, calls = eval_target(tmp_path, "dspy_qa", DSPY_SCRIPT, sandbox, outputs=outputs, score=2 / 3,
                                   calls_each=1)
    assert all(c["api"] == "openai-chat" and "[[ ## context ## ]]" in c["request"]["system"] for c in calls)
    # the DSPy hook: the dspy.Retrieve subclass is a retrieval step with its pids, the LM call a generation step
    check_hooked_traces(result, calls, "dspy", "KeywordRetrieve", "LM(openai/")


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_langchain_chain_is_traced_through_its_callbacks_and_its_retrieval_miss_diagnosed(tmp_path: Path,
                                                                                             sandbox: str):
    result, _, calls = eval_target(tmp_path, "langchain_qa", SCRIPT, sandbox, outputs=EXPECTED_OUTPUTS, score=2 / 3,
                                   calls_each=1)
    assert all(c["api"] == "openai-chat" for c in calls)
    check_hooked_traces(result, calls, "langchain", "KeywordRetriever", "ChatOpenAI")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_an_openai_sdk_pipeline_runs_on_the_local_model(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")  # the assembled model lives in the real cache
    if importlib.util.find_spec("llama_cpp") is None or not default_model_path().is_file():
        pytest.skip("the local model is not installed (scripts/install builds llama-cpp-python and assembles it)")
    sandbox_or_skip("bwrap")
    target = copy_target("openai_rag", tmp_path)
    result = run_eval(target, split="val", sandbox="bwrap", run_id="local", reports_dir=tmp_path / "reports")
    assert result.dead == [] and result.summaries["val"]["errors"] == 0
    scored = {r["id"]: r for r in read_jsonl(result.run_dir / "evals" / "val" / "scored.jsonl")}
    assert set(scored) == set(EXPECTED_OUTPUTS) and all(r["output"] and r["llm_calls"] == 1 for r in scored.values())
    calls = list(read_jsonl(result.run_dir / "gateway" / "calls.jsonl"))
    assert {c["example_id"] for c in calls} == set(scored)
    assert all(c["api"] == "openai-chat" and c["backend"] == "local" and c["error"] is None for c in calls)
    assert all(c["response"]["content"][0]["text"].strip() for c in calls)


def test_the_runner_points_the_openai_sdk_at_the_gateway_and_drops_real_openai_credentials(tmp_path: Path):
    dump = tmp_path / "dump.json"
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"id": "a", "inputs": {"mode": "dump", "dump": str(dump)}}) + "\n")
    env = {**os.environ, "OPENAI_PROJECT_ID": "proj-real", "OPENAI_BASE_URL": "https://elsewhere.example/v1",
           "OPENAI_API_BASE": "https://elsewhere.example/v1", "ANTHROPIC_API_BASE": "https://elsewhere.example"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipemend.runtime.runner", "--target", str(TARGETS / "toy"), "--entrypoint",
         "pipeline:run", "--inputs", str(inputs), "--out", str(tmp_path / "out"), "--gateway-url", "http://127.0.0.1:9/"],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(dump.read_text())["environ"]
    assert REAL_KEY not in dump.read_text() and "proj-real" not in dump.read_text()
    assert seen["OPENAI_API_KEY"] == seen["ANTHROPIC_API_KEY"] == "pipemend-gateway"
    assert not {"OPENAI_ORG_ID", "OPENAI_PROJECT_ID"} & set(seen)
    assert seen["OPENAI_BASE_URL"] == seen["OPENAI_API_BASE"] == "http://127.0.0.1:9/v1"
    assert seen["ANTHROPIC_BASE_URL"] == seen["ANTHROPIC_API_BASE"] == "http://127.0.0.1:9"
