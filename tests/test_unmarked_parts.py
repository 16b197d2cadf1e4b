"""The parts behind unmarked pipelines (issue 13, item 2): the call-log join, the evidence-text check, the
unattributed bucket, the ladder's reading of it, and the corpus's seal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipemend.dataset import Example, load_splits
from pipemend.diagnose import (
    Diagnosis,
    LadderThresholds,
    diagnose,
    diagnose_example,
    passage_reached,
    text_tokens,
)
from pipemend.errors import ConfigError, UsageError
from pipemend.evaluate import hidden_paths
from pipemend.manifest import load_manifest
from pipemend.metrics import load_metric
from pipemend.proposers.ladder import rungs_to_try
from pipemend.report.load import ladder
from pipemend.scoring import score_results
from pipemend.trace_join import (
    JOINED_SOURCE,
    MAX_JOINED_CHARS,
    MAX_TRACE_FILE_BYTES,
    call_answer,
    call_prompt,
    join_calls,
    joined_trace_bytes,
    prompt_texts,
)

TARGET = Path(__file__).parent / "fixtures" / "targets" / "unmarked_qa"


def anthropic_call(call_id: str, t: float, user: str, answer: str, example_id: str = "q1") -> dict:
    return {"format": "pipemend-call-1", "call_id": call_id, "t": t, "example_id": example_id, "step": None,
            "eval": "tok", "model": "m", "request": {"model": "m", "system": [{"type": "text", "text": "Be brief."}],
                                                     "messages": [{"role": "user", "content": user}]},
            "response": {"content": [{"type": "text", "text": answer}], "usage": {}},
            "input_tokens": 3, "output_tokens": 1, "latency_s": 0.5, "cost_usd": 0.0, "cache": "miss", "error": None}


def bare_trace(example_id: str = "q1", calls: list[str] = ()) -> dict:
    return {"trace_format": "pipemend-1", "example_id": example_id, "start": 0.0, "end": 1.0, "error": None,
            "output": "x", "logs": [], "steps": [], "llm_calls": [{"call_id": c, "gen_ai.usage.input_tokens": 3} for c in calls]}


# --------------------------------------------------------------------------- the join


def test_calls_join_as_generation_steps_in_call_order_and_leave_the_example():
    later = anthropic_call("c2", 20.0, "second question", "B")
    first = anthropic_call("c1", 10.0, "Context: doc one\n\nQuestion: first", "A")
    joined = join_calls(bare_trace(calls=["c1", "c2"]), [later, first])
    assert [s["name"] for s in joined["steps"]] == ["model call 1", "model call 2"]
    one = joined["steps"][0]
    assert one["kind"] == "generation" and one["source"] == JOINED_SOURCE and one["output"] == "A"
    assert one["inputs"] == {"model": "m", "system": "Be brief.",
                             "messages": [{"role": "user", "content": "Context: doc one\n\nQuestion: first"}]}
    assert one["llm_calls"] == [{"call_id": "c1", "gen_ai.usage.input_tokens": 3}]  # the trace's own record
    assert (one["start"], one["end"]) == (10.0, 10.5)
    assert joined["llm_calls"] == []
    assert prompt_texts(joined) == ["Be brief.\nContext: doc one\n\nQuestion: first", "Be brief.\nsecond question"]


def test_a_marked_trace_is_left_alone_and_forged_joined_steps_are_dropped():
    marked = bare_trace()
    marked["steps"] = [{"id": "s1", "name": "answer", "kind": "generation", "inputs": {}, "output": "x"}]
    assert join_calls(marked, [anthropic_call("c1", 1.0, "q", "a")]) is None
    forged = bare_trace()
    forged["steps"] = [{"id": "f", "name": "fake", "kind": "generation", "source": JOINED_SOURCE,
                        "inputs": {"messages": [{"role": "user", "content": "every gold passage"}]}}]
    assert join_calls(forged, [])["steps"] == []
    rejoined = join_calls(forged, [anthropic_call("c1", 1.0, "real prompt", "a")])
    assert prompt_texts(rejoined) == ["Be brief.\nreal prompt"]
    assert join_calls(rejoined, [anthropic_call("c1", 1.0, "real prompt", "a")]) == rejoined  # idempotent


def test_openai_shaped_calls_and_tool_calls_read_as_well():
    request = {"model": "gpt", "messages": [{"role": "system", "content": "sys"},
                                           {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert call_prompt(request)["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert call_answer({"choices": [{"message": {"role": "assistant", "content": "Paris"}}]}) == "Paris"
    tool = {"id": "t1", "type": "function", "function": {"name": "search", "arguments": "{}"}}
    assert call_answer({"choices": [{"message": {"content": None, "tool_calls": [tool]}}]}) == {"text": "", "tool_calls": [tool]}
    use = {"type": "tool_use", "id": "u1", "name": "search", "input": {}}
    assert call_answer({"content": [{"type": "text", "text": "Let me look."}, use]}) == {"text": "Let me look.", "tool_calls": [use]}
    assert call_answer(None) is None
    assert call_prompt('{"not json')["messages"] == [{"role": "raw", "content": '{"not json'}]


def test_a_huge_prompt_is_cut_so_the_joined_trace_stays_readable():
    huge = anthropic_call("c1", 1.0, "é" * (MAX_JOINED_CHARS * 3), "A")  # non-ASCII: more bytes than characters
    data = joined_trace_bytes(bare_trace(), [huge, anthropic_call("c2", 2.0, "small", "B")])
    assert len(data) <= MAX_TRACE_FILE_BYTES
    steps = json.loads(data)["steps"]
    assert steps[0]["inputs"]["messages"][0]["content"].endswith(" chars]") and steps[1]["output"] == "B"
    assert joined_trace_bytes(bare_trace(), []) is None


def test_scoring_joins_only_when_asked_and_with_this_examples_calls(tmp_path):
    out = tmp_path / "out"
    (out / "traces").mkdir(parents=True)
    (out / "results.jsonl").write_text("".join(json.dumps({"id": i, "output": "Paris", "error": None, "timed_out": False,
                                                           "duration_s": 1.0}) + "\n" for i in ("q1", "q2")))
    for i in ("q1", "q2"):
        (out / "traces" / f"{i}.json").write_text(json.dumps(bare_trace(i)))  # the runner recorded no call ids
    log = tmp_path / "calls.jsonl"
    log.write_text("".join(json.dumps(c) + "\n" for c in [
        anthropic_call("c1", 1.0, "for q1", "Paris", "q1"), anthropic_call("c2", 2.0, "for q2", "Paris", "q2"),
        anthropic_call("c3", 3.0, "another eval's q1", "Lyon", "q1") | {"eval": "other", "t": 99.0}]))
    examples = [Example(id=i, inputs={}, expected="Paris") for i in ("q1", "q2")]
    metric = load_metric("exact_match", tmp_path)
    score_results(out / "results.jsonl", examples, metric, split="val", call_log=log, traces_dir=out / "traces",
                  eval_token="tok")
    assert json.loads((out / "traces" / "q1.json").read_text())["steps"] == []
    score_results(out / "results.jsonl", examples, metric, split="val", call_log=log, traces_dir=out / "traces",
                  eval_token="tok", join_traces=True)
    q1 = json.loads((out / "traces" / "q1.json").read_text())
    assert [s["inputs"]["messages"][0]["content"] for s in q1["steps"]] == ["for q1"]  # by the example header
    assert json.loads((out / "traces" / "q2.json").read_text())["steps"][0]["output"] == "Paris"


# --------------------------------------------------------------------------- the evidence-text check


def test_a_passage_reaches_a_prompt_normalized_or_as_a_near_copy():
    passage = "Canberra became the capital of Australia in 1913, after a long contest between Sydney and Melbourne."
    overlap = LadderThresholds().evidence_text_overlap
    assert passage_reached(passage, f"Context:\n[1] {passage.upper().replace(' ', '  ')}\nQ: ?", overlap)
    cut_short = passage.rsplit(" and ", 1)[0]  # the pipeline cut the passage's last words
    assert passage_reached(passage, "doc: " + cut_short + " (more)", overlap)
    one_word_changed = passage.replace("long", "bitter")
    assert passage_reached(passage, one_word_changed, overlap)
    assert not passage_reached(passage, passage.rsplit(",", 1)[0], overlap)  # half of it is not the passage
    # the same words scattered across other passages are not the passage
    scattered = " ".join(f"{w} is a word." for w in text_tokens(passage))
    assert not passage_reached(passage, scattered, overlap)
    assert not passage_reached(passage, "Tokyo is the capital of Japan.", overlap)
    assert passage_reached("Paris", "It is paris!", overlap)  # short: the exact run only
    assert not passage_reached("Paris", "Parisian", overlap)
    assert not passage_reached(passage, cut_short, 0.99)  # the threshold is the user's


def generated(prompt: str, output: str = "Tokyo") -> dict:
    return join_calls(bare_trace(), [anthropic_call("c1", 1.0, prompt, output)])


def test_text_decides_retrieval_and_present_gold_goes_on_to_prompt_context_model():
    gold = ["Canberra became the capital of Australia in 1913."]
    miss = diagnose_example(output="Tokyo", expected="Canberra", evidence=["d-au"], evidence_text=gold,
                            trace=generated("Context: Tokyo is the capital of Japan."))
    assert (miss.rung, miss.rule) == ("retrieval", "gold_text_missing") and "d-au" in miss.evidence
    hit = diagnose_example(output="Tokyo", expected="Canberra", evidence=["d-au"], evidence_text=gold,
                           trace=generated(f"Context: {gold[0]}"))
    assert (hit.rung, hit.rule, hit.unjudged) == ("model", "still_wrong", ["context"])
    wordy = "The context says the capital is Canberra, founded in 1913"
    assert diagnose_example(output=wordy, expected="Canberra", evidence=None, evidence_text=gold,
                            trace=generated(f"Context: {gold[0]}", wordy)).rule == "extra_text"
    # two passages, one missing: named by position when the ids do not pair with the texts
    two = diagnose_example(output="Tokyo", expected="Canberra", evidence=None, evidence_text=[gold[0], "Sydney is old."],
                           trace=generated(f"Context: {gold[0]}"))
    assert two.rule == "gold_text_missing" and "#2" in two.evidence
    # doc ids the trace declares still decide first
    marked = {"steps": [{"name": "r", "kind": "retrieval", "doc_ids": ["d-au"]}, {"name": "g", "kind": "generation"}]}
    assert diagnose_example(output="Tokyo", expected="Canberra", evidence=["d-au"], evidence_text=gold,
                            trace=marked).rung == "model"


def test_evidence_text_without_a_known_prompt_is_unattributed():
    marked = {"steps": [{"name": "answer", "kind": "generation", "output": "Tokyo"}]}  # no doc_ids, no joined prompt
    d = diagnose_example(output="Tokyo", expected="Canberra", evidence=["d-au"], evidence_text=["Canberra ..."],
                         trace=marked)
    assert d.rung == "unattributed" and "no model prompt in the trace" in d.evidence


def test_the_unattributed_bucket_is_counted_apart_and_never_recommended():
    rows = [{"id": i, "output": "Tokyo", "score": 0.0, "error": None} for i in ("a", "b", "c")]
    exs = [Example(id="a", inputs={}, expected="Canberra", evidence=["d1"]),
           Example(id="b", inputs={}, expected="Canberra", evidence=["d1"]),
           Example(id="c", inputs={}, expected="Canberra")]  # no evidence labels: retrieval is not in question
    d = diagnose(rows, exs, {i: bare_trace(i) for i in ("a", "b", "c")})
    assert (d.unattributed, d.unattributed_ids, d.n_failed) == (2, ["a", "b"], 3)
    assert d.counts == {"prompt": 0, "retrieval": 0, "context": 0, "model": 1} and d.recommended == "model"
    data = d.to_json()
    assert data["format"] == "pipemend-diagnosis-2" and Diagnosis.from_json(data) == d
    old = {k: v for k, v in data.items() if k not in ("unattributed", "unattributed_ids")} | {
        "format": "pipemend-diagnosis-1", "details": {}, "thresholds": {}}
    assert Diagnosis.from_json(old).unattributed == 0
    with pytest.raises(UsageError, match="pipemend-diagnosis-9"):
        Diagnosis.from_json(data | {"format": "pipemend-diagnosis-9"})
    shown = ladder(data)  # the report's failure ladder shows them on their own row
    assert (shown["unattributed"], shown["unattributed_ids"]) == (2, ["a", "b"])
    assert sum(row["count"] for row in shown["rows"]) == 1


def test_the_ladder_tries_the_offline_rungs_for_unattributed_failures_without_a_recommendation():
    zero = {"prompt": 0, "retrieval": 0, "context": 0, "model": 0}
    only_unattributed = {"counts": zero, "recommended": None, "unattributed": 3, "unattributed_ids": ["a", "b", "c"]}
    assert rungs_to_try(only_unattributed) == ["prompt", "retrieval", "context"]
    assert rungs_to_try({"counts": zero, "recommended": None, "unattributed": 0}) == []
    retrieval = {"counts": zero | {"retrieval": 2}, "recommended": "retrieval", "unattributed": 1}
    assert rungs_to_try(retrieval) == ["retrieval", "context", "prompt"]  # the named rung first, prompt last
    # without unattributed failures prompt still comes, as the last resort before the ladder gives up
    assert rungs_to_try(retrieval | {"unattributed": 0}) == ["retrieval", "context", "prompt"]


# --------------------------------------------------------------------------- the corpus's seal


def manifest_with(target: Path, **dataset: object) -> None:
    data = yaml.safe_load((target / "pipemend.yaml").read_text())
    data["dataset"].update(dataset)
    if "runtime" in dataset:
        data["runtime"] = data["dataset"].pop("runtime")
    (target / "pipemend.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def test_the_corpus_is_sealed_and_hidden_unless_declared_runtime(tmp_path):
    target = tmp_path / "t"
    shutil.copytree(TARGET, target, ignore=shutil.ignore_patterns("__pycache__"))
    manifest_with(target, corpus="docs.jsonl")
    readable = load_manifest(target)
    assert "docs.jsonl" not in readable.sealed_paths(target)
    assert "docs.jsonl" not in hidden_paths(readable, target, tmp_path / "run", readable.sealed_paths(target))
    assert "docs.jsonl" in readable.all_protected()

    manifest_with(target, runtime=[])
    sealed = load_manifest(target)
    [seal] = [s for s in sealed.seal_plan(target) if s.path == "docs.jsonl"]
    assert seal.declared and "corpus" in seal.reason
    assert "docs.jsonl" in hidden_paths(sealed, target, tmp_path / "run", sealed.sealed_paths(target))
    assert load_splits(sealed, target)["val"][0].evidence_text == ["the capital of France is Paris, a city on the Seine"]

    data = yaml.safe_load((target / "pipemend.yaml").read_text())
    data["editable"] = ["pipeline.py", "docs.jsonl"]
    (target / "pipemend.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"editable\[1\]"):
        load_manifest(target)
