from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from pipemend.dataset import Example
from pipemend.diagnose import (
    Diagnosis,
    LadderThresholds,
    diagnose,
    diagnose_eval_dir,
    diagnose_example,
    load_thresholds,
    recommend,
)
from pipemend.cli.render import render_diagnosis
from pipemend.errors import ConfigError, UsageError
from pipemend.fsutil import append_jsonl

GOLD = ["d1", "d2"]


def step(name, kind, *, doc_ids=None, output=None, error=None):
    return {"id": name, "parent": None, "name": name, "kind": kind, "inputs": {}, "output": output,
            "doc_ids": doc_ids, "logs": [], "error": error, "start": 0.0, "end": 0.1, "llm_calls": []}


def trace(*steps, output=None):
    return {"trace_format": "pipemend-1", "example_id": "x", "start": 0.0, "end": 1.0, "error": None,
            "output": output, "steps": list(steps)}


def good_pipeline(*, gen_docs=("d1", "d2", "d3"), gen_output="Paris", parse_output="Paris"):
    """retrieve -> answer (generation) -> parse, with gold evidence reaching generation."""
    return trace(
        step("retrieve", "retrieval", doc_ids=["d1", "d2", "d3", "d4"]),
        step("answer", "generation", doc_ids=list(gen_docs), output=gen_output),
        step("parse", "parse", output=parse_output),
    )


def diag(output, tr, *, expected="Paris", evidence=GOLD, runner_error=None, **overrides):
    return diagnose_example(output=output, expected=expected, evidence=evidence, trace=tr,
                            runner_error=runner_error, thresholds=LadderThresholds(**overrides))


# --------------------------------------------------------------------------- one test per rule


def test_runner_error_is_its_own_bucket():
    d = diag(None, None, runner_error="TimeoutError: example exceeded 120s")
    assert (d.rung, d.rule) == ("error", "runner_error")


def test_retrieval_missing_gold():
    tr = trace(step("retrieve", "retrieval", doc_ids=["d1", "d7"]),
               step("answer", "generation", output="Lyon"))  # generation declares no doc_ids
    d = diag("Lyon", tr)
    assert (d.rung, d.rule) == ("retrieval", "missing_gold") and "d2" in d.evidence


def test_retrieval_gold_retrieved_but_dropped_before_generation():
    tr = good_pipeline(gen_docs=("d1", "d3"))
    d = diag("Lyon", tr)
    assert (d.rung, d.rule) == ("retrieval", "dropped_before_generation")
    assert "dropped before generation" in d.evidence and "d2" in d.evidence


def test_retrieval_rule_is_skipped_without_evidence_labels_or_doc_ids():
    tr = trace(step("retrieve", "retrieval", doc_ids=["d9"]), step("answer", "generation", output="Lyon"))
    assert diag("Lyon", tr, evidence=None).rung == "model"
    no_docs = trace(step("answer", "generation", output="Lyon"))
    assert diag("Lyon", no_docs, evidence=None).rung == "model"


def test_evidence_labels_without_doc_ids_or_text_are_unattributed_not_prompt():
    no_docs = trace(step("answer", "generation", output="Lyon"))
    d = diag("Lyon", no_docs)
    assert (d.rung, d.rule) == ("unattributed", "no_retrieval_signal")
    assert d.evidence.startswith("unattributed: no retrieval step and no evidence text")
    assert d.unjudged == ["retrieval", "context"]
    # a verbose answer is no proof of a prompt failure when the evidence may never have reached the model
    wordy = "The context does not say which city it is, so I cannot answer"
    assert diag(wordy, trace(step("answer", "generation", output=wordy))).rung == "unattributed"
    undeclared = trace(step("retrieve", "retrieval"), step("answer", "generation", output="Lyon"))
    assert "retrieval steps declare no doc_ids" in diag("Lyon", undeclared).evidence
    assert diag("Lyon", None).rung == "unattributed"
    # rules showing the answer was known still fire: retrieval is not what failed
    assert diag("It is Paris.", no_docs).rule == "extra_text"
    assert diag("PARIS.", no_docs).rule == "form"


def test_retrieval_that_returned_nothing_is_retrieval():
    tr = trace(step("retrieve", "retrieval", doc_ids=[]), step("answer", "generation", output="Lyon"))
    assert diag("Lyon", tr).rung == "retrieval"


def test_prompt_parse_error():
    tr = good_pipeline()
    tr["steps"][2]["error"] = {"type": "JSONDecodeError", "message": "Expecting value", "traceback": ""}
    d = diag("", tr)
    assert (d.rung, d.rule) == ("prompt", "parse_error") and "JSONDecodeError" in d.evidence


def test_prompt_parse_returned_nothing():
    d = diag("Lyon", good_pipeline(parse_output=None))
    assert (d.rung, d.rule) == ("prompt", "parse_error")


def test_prompt_empty_output():
    tr = trace(step("retrieve", "retrieval", doc_ids=GOLD), step("answer", "generation", output="..."))
    assert (diag("  ", tr).rung, diag("  ", tr).rule) == ("prompt", "empty_output")
    assert diag({}, tr).rule == "empty_output"
    assert diag("?!", tr).rule == "empty_output"  # nothing left after normalization


def test_prompt_dropped_answer():
    tr = good_pipeline(gen_output="Reasoning... so the answer is Paris.", parse_output="Reasoning")
    d = diag("Reasoning", tr)
    assert (d.rung, d.rule) == ("prompt", "dropped_answer") and "'paris'" in d.evidence


def test_prompt_form_when_only_normalization_separates_output_and_answer():
    d = diag("PARIS.", good_pipeline(gen_output="PARIS.", parse_output="PARIS."))
    assert (d.rung, d.rule) == ("prompt", "form")


def test_prompt_extra_text_around_the_right_answer():
    out = "It is Paris."
    d = diag(out, good_pipeline(gen_output=out, parse_output=out))
    assert (d.rung, d.rule) == ("prompt", "extra_text") and "'paris'" in d.evidence
    assert diag(out, good_pipeline(gen_output=out, parse_output=out), expected=["Lyon", "paris"]).rule == "extra_text"


def test_prompt_verbose_answer():
    out = "The city you are asking about is most likely Lyon in France"
    d = diag(out, good_pipeline(gen_output=out, parse_output=out))
    assert (d.rung, d.rule) == ("prompt", "verbose")
    # the same wrong answer, short, is not a prompt failure
    assert diag("Lyon", good_pipeline(gen_output="Lyon", parse_output="Lyon")).rung == "model"
    # and a long expected answer allows a long output
    long_expected = "the city of light on the seine river"
    assert diag(out, good_pipeline(gen_output=out, parse_output=out), expected=long_expected).rung == "model"


def test_context_too_many_docs():
    docs = ["d1", "d2"] + [f"x{i}" for i in range(8)]
    d = diag("Lyon", good_pipeline(gen_docs=docs, gen_output="Lyon", parse_output="Lyon"))
    assert (d.rung, d.rule) == ("context", "too_many_docs") and "10 documents" in d.evidence


def test_context_gold_buried():
    docs = ["x1", "x2", "x3", "x4", "d1", "d2"]
    d = diag("Lyon", good_pipeline(gen_docs=docs, gen_output="Lyon", parse_output="Lyon"))
    assert (d.rung, d.rule) == ("context", "gold_buried") and "position 5" in d.evidence


def test_model_when_everything_else_is_fine():
    d = diag("Lyon", good_pipeline(gen_docs=("d1", "d2"), gen_output="Lyon", parse_output="Lyon"))
    assert (d.rung, d.rule) == ("model", "still_wrong")


def test_thresholds_move_the_boundaries():
    docs = ["x1", "x2", "x3", "x4", "d1", "d2"]
    tr = good_pipeline(gen_docs=docs, gen_output="Lyon", parse_output="Lyon")
    assert diag("Lyon", tr, context_gold_position=5).rung == "model"
    assert diag("Lyon", tr, context_max_docs=5).rule == "too_many_docs"
    out = "The city you are asking about is most likely Lyon in France"
    assert diag(out, good_pipeline(gen_output=out, parse_output=out), min_tokens_for_verbose=20).rung == "model"


# --------------------------------------------------------------------------- recommendation


def test_recommend_cheapest_rung_over_min_share_else_largest():
    assert recommend({"prompt": 2, "retrieval": 10, "context": 3, "model": 5}, 0.15) == "retrieval"
    assert recommend({"prompt": 3, "retrieval": 10, "context": 3, "model": 4}, 0.15) == "prompt"
    assert recommend({"prompt": 1, "retrieval": 1, "context": 1, "model": 7}, 0.5) == "model"
    assert recommend({"prompt": 2, "retrieval": 3, "context": 3, "model": 2}, 0.9) == "retrieval"  # largest
    assert recommend({"prompt": 0, "retrieval": 0, "context": 0, "model": 0}, 0.15) is None
    assert recommend({"prompt": 0, "retrieval": 0, "context": 0, "model": 4}, 0.0) == "model"


# --------------------------------------------------------------------------- whole evaluations


def _write_eval_dir(tmp_path: Path) -> tuple[Path, list[Example]]:
    eval_dir = tmp_path / "evals" / "baseline-train"
    (eval_dir / "traces").mkdir(parents=True)
    examples = [Example(id=f"q{i}", inputs={"q": str(i)}, expected="Paris", evidence=GOLD) for i in range(6)]
    examples.append(Example(id="q6", inputs={"q": "6"}, expected="Paris"))  # no evidence labels
    rows = [
        ("q0", "Paris", 1.0, None, good_pipeline()),                                   # passed
        ("q1", "Lyon", 0.0, None, good_pipeline(gen_docs=("d1",), gen_output="Lyon")),  # retrieval
        ("q2", "", 0.0, None, good_pipeline(gen_output="", parse_output="")),          # prompt
        ("q3", "Lyon", 0.0, None, good_pipeline(gen_docs=("x1", "x2", "x3", "x4", "d1", "d2"),
                                                gen_output="Lyon", parse_output="Lyon")),  # context
        ("q4", "Lyon", 0.0, None, good_pipeline(gen_docs=("d1", "d2"), gen_output="Lyon",
                                                parse_output="Lyon")),                   # model
        ("q5", None, 0.0, "no result", None),                                           # error
        ("q6", "Lyon", 0.0, None, trace(step("answer", "generation", output="Lyon"))),  # model (no labels)
    ]
    for eid, output, score, error, tr in rows:
        append_jsonl(eval_dir / "scored.jsonl", {
            "id": eid, "split": "train", "output": output, "score": score, "error": error, "timed_out": False,
            "latency_s": 1.0, "cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0, "llm_calls": 0})
        if tr is not None:
            (eval_dir / "traces" / f"{eid}.json").write_text(json.dumps(tr))
    (eval_dir / "traces" / "q4.json").write_text('{"trace_format": "pipemend-1", "ste')  # torn trace
    return eval_dir, examples


def test_diagnose_eval_dir_counts_ids_and_json(tmp_path):
    eval_dir, examples = _write_eval_dir(tmp_path)
    d = diagnose_eval_dir(eval_dir, examples)
    assert d.n_examples == 7 and d.n_failed == 6 and d.errors == 1 and d.error_ids == ["q5"]
    # q4's torn trace leaves nothing to judge its retrieval by: unattributed, on no rung
    assert d.counts == {"prompt": 1, "retrieval": 1, "context": 1, "model": 1}
    assert d.ids == {"prompt": ["q2"], "retrieval": ["q1"], "context": ["q3"], "model": ["q6"]}
    assert d.unattributed == 1 and d.unattributed_ids == ["q4"] and d.details["q4"].rung == "unattributed"
    assert d.details["q2"].rule in {"parse_error", "empty_output"}
    assert d.recommended == "prompt"
    # the brief (eval --json, the journal's event) says what is on no rung too
    assert d.brief() == {"counts": d.counts, "errors": 1, "unattributed": 1, "recommended": "prompt"}

    data = d.to_json()
    assert data["format"] == "pipemend-diagnosis-2"
    assert data["counts"] == d.counts and data["recommended"] == "prompt"
    assert json.loads(json.dumps(data)) == data
    assert Diagnosis.from_json(data) == d


def test_metric_errors_are_failures_on_the_ladder_not_runner_errors():
    rows = [{"id": "a", "output": "Lyon", "score": 0.0, "error": "metric error: ValueError: x", "timed_out": False},
            {"id": "b", "output": "Paris", "score": 0.0, "error": None, "timed_out": True}]
    exs = [Example(id="a", inputs={}, expected="Paris"), Example(id="b", inputs={}, expected="Paris")]
    d = diagnose(rows, exs, {})
    assert d.ids["model"] == ["a"] and d.error_ids == ["b"]


def test_pass_threshold_decides_what_failed():
    rows = [{"id": "a", "output": "Paris France", "score": 0.67, "error": None}]
    exs = [Example(id="a", inputs={}, expected="Paris")]
    assert diagnose(rows, exs, {}).n_failed == 1
    assert diagnose(rows, exs, {}, LadderThresholds(pass_threshold=0.5)).n_failed == 0


def test_missing_scored_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="scored.jsonl"):
        diagnose_eval_dir(tmp_path, [])


def test_render_shows_rungs_shares_ids_and_recommendation(tmp_path):
    eval_dir, examples = _write_eval_dir(tmp_path)
    console = Console(record=True, width=120)
    console.print(render_diagnosis(diagnose_eval_dir(eval_dir, examples)))
    text = console.export_text()
    for needle in ("prompt", "retrieval", "context", "model", "error", "unattributed", "q4", "25%",
                   "try the prompt rung"):
        assert needle in text, needle


# --------------------------------------------------------------------------- user thresholds


def test_load_thresholds_from_yaml_json_and_overrides(tmp_path):
    y = tmp_path / "ladder.yaml"
    y.write_text("diagnosis:\n  pass_threshold: 0.8\n  context_max_docs: 4\n")
    t = load_thresholds(y, min_share=0.3)
    assert (t.pass_threshold, t.context_max_docs, t.min_share) == (0.8, 4, 0.3)
    j = tmp_path / "ladder.json"
    j.write_text(json.dumps({"context_gold_position": 1}))
    assert load_thresholds(j).context_gold_position == 1
    assert load_thresholds(None, pass_threshold=0.5, min_share=None) == LadderThresholds(pass_threshold=0.5)


def test_bad_thresholds_name_file_and_key(tmp_path):
    y = tmp_path / "ladder.yaml"
    y.write_text("pass_treshold: 0.8\n")
    with pytest.raises(ConfigError) as e:
        load_thresholds(y)
    assert str(y) in str(e.value) and "pass_treshold" in str(e.value) and "pass_threshold" in str(e.value)
    y.write_text("min_share: 2\n")
    with pytest.raises(ConfigError, match="min_share"):
        load_thresholds(y)
    with pytest.raises(ConfigError, match="cannot read"):
        load_thresholds(tmp_path / "absent.yaml")


def test_render_with_nothing_failed():
    console = Console(record=True, width=100)
    console.print(render_diagnosis(Diagnosis()))
    assert "Nothing failed" in console.export_text()
