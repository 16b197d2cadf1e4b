"""Failures that raise are failures too (issue 14, item 4): an example that ended in an exception is put on
the rung of the traced step the exception escaped from; only errors outside any step, timeouts and failed
model calls stay ``error``.

The traces are made by the real trace SDK (``pipemend.trace``), the way the runner makes them: the example's
function runs inside ``start_example``, its exception closes the steps it passes through and then the example
(``finish(error=...)``), and the row's ``error`` is the runner's ``Type: message``. Model calls are recorded
as the runner's HTTP hook records them (``record_llm_call``), with the status the gateway answered.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from pipemend import trace
from pipemend.dataset import Example
from pipemend.diagnose import Diagnosis, diagnose, diagnose_example, escaped_step

GOLD = ["d1"]
FENCED = '```json\n{"answer": "Paris"}\n```'


def run_example(fn: Callable[[], Any]) -> tuple[Any, str | None, dict[str, Any]]:
    """(output, the runner's row error, the trace) of ``fn`` run as one example."""
    ex = trace.start_example("x")
    try:
        output = fn()
    except Exception as e:  # what the runner does with an example that raised
        return None, f"{type(e).__name__}: {e}", ex.finish(error=e)
    return output, None, ex.finish(output=output)


def model_call(status: int = 200) -> None:
    trace.record_llm_call({"call_id": "c-1", "model": "m", "input_tokens": 5, "output_tokens": 5,
                           "http.response.status_code": status, "duration_s": 0.01})


def retrieve(ids=("d1",)) -> list[dict]:
    with trace.step("retrieve", kind="retrieval", query="q") as s:
        docs = [{"id": d, "text": f"text of {d}"} for d in ids]
        s.output(docs)
    return docs


def answer(docs, reply: str = FENCED, status: int = 200) -> str:
    with trace.step("answer", kind="generation", docs=docs) as s:
        model_call(status)
        s.output(reply)
    return reply


def parse(reply: str) -> str:
    with trace.step("parse", kind="parse") as s:
        return s.output(json.loads(reply)["answer"])


def judge(fn: Callable[[], Any], *, evidence=GOLD, expected="Paris", timed_out=False):
    output, error, tr = run_example(fn)
    assert error is not None or timed_out, "the example was meant to fail"
    return diagnose_example(output=output, expected=expected, evidence=evidence, trace=tr,
                            runner_error=error, timed_out=timed_out)


def test_a_parse_step_that_raised_on_fenced_json_is_an_output_format_failure_not_an_error():
    d = judge(lambda: parse(answer(retrieve())))
    assert (d.rung, d.rule) == ("prompt", "parse_error")
    assert "parse step 'parse' raised JSONDecodeError" in d.evidence and "the example ended in it" in d.evidence
    # with evidence labels but no document ids anywhere it is still the prompt: the format broke either way
    def unmarked_retrieval():
        with trace.step("answer", kind="generation") as s:
            model_call()
            s.output(FENCED)
        return parse(FENCED)
    assert judge(unmarked_retrieval).rung == "prompt"
    # the ladder's order holds: gold evidence that never reached the model explains the failure first
    assert judge(lambda: parse(answer(retrieve(["d7"])))).rung == "retrieval"


def test_a_retrieval_step_that_raised_is_a_retrieval_failure_with_or_without_labels():
    def broken_index():
        with trace.step("retrieve", kind="retrieval", query="q"):
            raise KeyError("index shard 3")
    for evidence in (GOLD, None):
        d = judge(broken_index, evidence=evidence)
        assert (d.rung, d.rule) == ("retrieval", "retrieval_raised") and "KeyError" in d.evidence


def test_a_generation_step_that_raised_after_the_model_answered_is_the_prompt():
    def reads_answer_inline():
        docs = retrieve()
        with trace.step("answer", kind="generation", docs=docs) as s:
            model_call(200)
            return s.output(json.loads("Sure! " + FENCED)["answer"])
    d = judge(reads_answer_inline)
    assert (d.rung, d.rule) == ("prompt", "generation_raised") and "after the model answered" in d.evidence
    assert judge(reads_answer_inline, evidence=None).rule == "generation_raised"

    class CapitalAPIMismatch(Exception):  # the pipeline's own exception, whatever its name holds
        pass

    def own_check():
        with trace.step("answer", kind="generation"):
            model_call(200)
            raise CapitalAPIMismatch("the reply names no city")
    assert judge(own_check, evidence=None).rule == "generation_raised"


def test_failed_model_calls_timeouts_and_errors_outside_any_step_stay_errors():
    class APIStatusError(Exception):
        pass

    class APIConnectionError(Exception):
        pass

    class ReadTimeout(Exception):
        pass

    def gateway_500():
        docs = retrieve()
        with trace.step("answer", kind="generation", docs=docs):
            model_call(500)
            raise APIStatusError("Error code: 500 - upstream down")

    def no_answer():
        with trace.step("answer", kind="generation"):
            raise APIConnectionError("Connection error.")

    def api_error_after_an_answer():
        with trace.step("answer", kind="generation"):
            model_call(200)
            raise APIConnectionError("Connection error.")  # a second call that never got through

    def slow_index():
        with trace.step("retrieve", kind="retrieval"):
            raise ReadTimeout("the index did not answer in 5s")

    def outside_any_step():
        parse(answer(retrieve(), reply='{"answer": "Paris"}'))
        raise RuntimeError("post-processing broke")

    for fn in (gateway_500, no_answer, api_error_after_an_answer):
        d = judge(fn)
        assert (d.rung, d.rule) == ("error", "gateway_error"), fn.__name__
    assert (judge(slow_index).rung, judge(slow_index).rule) == ("error", "timeout")
    assert (judge(outside_any_step).rung, judge(outside_any_step).rule) == ("error", "runner_error")
    timed_out = judge(lambda: "late", timed_out=True)
    assert (timed_out.rung, timed_out.rule) == ("error", "timeout")


def test_a_caught_step_error_followed_by_an_unrelated_one_is_outside_the_step():
    def recovers_then_fails():
        reply = answer(retrieve())
        try:
            parse(reply)
        except ValueError:
            pass  # recovered: the parse step's error is recorded, the example goes on
        raise RuntimeError("later, outside every step")
    output, error, tr = run_example(recovers_then_fails)
    assert tr["steps"][2]["error"]["type"] == "JSONDecodeError"
    assert escaped_step(tr, error) is None
    assert judge(recovers_then_fails).rule == "runner_error"


def test_an_exception_re_raised_from_a_step_error_is_that_steps_failure():
    def wraps_the_parse_error():
        reply = answer(retrieve())
        try:
            return parse(reply)
        except ValueError as e:
            raise RuntimeError("could not read the model's answer") from e
    d = judge(wraps_the_parse_error)
    assert (d.rung, d.rule) == ("prompt", "parse_error")


def test_the_innermost_step_the_exception_passed_through_names_the_rung():
    def whole_chain():
        with trace.step("chain", kind="other"):
            return parse(answer(retrieve()))
    output, error, tr = run_example(whole_chain)
    assert [s["name"] for s in tr["steps"] if s["error"]] == ["chain", "parse"]
    assert escaped_step(tr, error)["name"] == "parse"
    assert judge(whole_chain).rung == "prompt"

    def tool_raises():
        with trace.step("calculator", kind="tool"):
            raise ZeroDivisionError("division by zero")
    d = judge(tool_raises)
    assert (d.rung, d.rule) == ("error", "step_raised") and "'calculator' (tool)" in d.evidence


def test_a_trace_without_a_final_error_falls_back_to_the_runner_line():
    output, error, tr = run_example(lambda: parse(FENCED))
    tr = {**tr, "error": None}
    assert escaped_step(tr, error)["name"] == "parse"
    assert escaped_step(tr, "RuntimeError: something else") is None
    assert escaped_step(None, error) is None
    # a trace is what a sandbox wrote: odd shapes mean no step, never a crash
    for odd in ({"steps": 7}, {"steps": [{"error": "x"}, 3]}, {"steps": [{"kind": "generation", "llm_calls": 5,
                                                                         "error": {"type": "E"}}], "error": 1}):
        assert diagnose_example(output=None, expected="Paris", evidence=None, trace=odd,
                                runner_error="E").rung == "error"


def test_diagnose_counts_raised_steps_on_rungs_and_the_brief_says_what_is_on_none():
    """The whole evaluation of a pipeline whose parse step raises on fenced JSON: every example ended in an
    exception, yet the diagnosis recommends the prompt rung instead of filing them all under ``error``."""
    def gateway_down():
        with trace.step("answer", kind="generation"):
            model_call(503)
            raise RuntimeError("Error code: 503")

    cases = {
        "fenced-1": lambda: parse(answer(retrieve())),
        "fenced-2": lambda: parse(answer(retrieve())),
        "down": gateway_down,
        "late": lambda: "never",
        "no-signal": lambda: "Lyon",
    }
    rows, traces = [], {}
    for eid, fn in cases.items():
        output, error, tr = run_example(fn)
        timed_out = eid == "late"
        rows.append({"id": eid, "output": None if timed_out else output, "score": 0.0,
                     "error": "timeout after 30s" if timed_out else error, "timed_out": timed_out})
        traces[eid] = None if eid == "no-signal" else tr
    examples = [Example(id=eid, inputs={}, expected="Paris", evidence=GOLD) for eid in cases]
    d = diagnose(rows, examples, traces)
    assert d.ids["prompt"] == ["fenced-1", "fenced-2"] and d.recommended == "prompt"
    assert d.error_ids == ["down", "late"] and [d.details[i].rule for i in d.error_ids] == ["gateway_error", "timeout"]
    assert d.unattributed_ids == ["no-signal"]
    assert d.brief() == {"counts": {"prompt": 2, "retrieval": 0, "context": 0, "model": 0}, "errors": 2,
                         "unattributed": 1, "recommended": "prompt"}
    assert Diagnosis.from_json(json.loads(json.dumps(d.to_json()))) == d
