from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pipemend.dataset import Example
from pipemend.fsutil import append_jsonl, read_json, read_jsonl
from pipemend.metrics import load_metric
from pipemend.scoring import (
    bootstrap_ci,
    paired_bootstrap,
    score_results,
    sign_test,
    write_eval,
)

ROW_KEYS = {"id", "split", "output", "score", "error", "timed_out", "latency_s", "cost_usd",
            "input_tokens", "output_tokens", "llm_calls"}
SUMMARY_KEYS = {"format", "split", "n", "score", "ci_low", "ci_high", "errors", "cost_usd", "latency_s_mean",
                "input_tokens", "output_tokens", "startup_s", "unattributed_calls", "unattributed_cost_usd",
                "unattributed_latency_s", "unattributed_input_tokens", "unattributed_output_tokens", "unheaded_call_ids"}


def _examples() -> list[Example]:
    return [
        Example(id="q1", inputs={"q": "capital of France"}, expected="Paris"),
        Example(id="q2", inputs={"q": "capital of Spain"}, expected=["Madrid", "madrid city"]),
        Example(id="q3", inputs={"q": "capital of Italy"}, expected="Rome"),
        Example(id="q4", inputs={"q": "capital of Peru"}, expected="Lima"),
    ]


def _call(call_id, example_id, cost, tin, tout, cache="miss"):
    return {"format": "pipemend-call-1", "call_id": call_id, "t": 1.0, "example_id": example_id, "step": "answer",
            "model": "simulated/echo", "backend": "simulated", "request": {}, "response": {},
            "input_tokens": tin, "output_tokens": tout, "latency_s": 0.1, "cost_usd": cost, "cache": cache,
            "error": None}


def _write_results(path: Path, rows):
    for r in rows:
        append_jsonl(path, r)


def _results():
    return [
        {"id": "q1", "output": "The Paris.", "error": None, "timed_out": False, "duration_s": 1.0},
        {"id": "q2", "output": {"answer": "Madrid City"}, "error": None, "timed_out": False, "duration_s": 3.0},
        {"id": "q3", "output": None, "error": {"type": "KeyError", "message": "'docs'"}, "timed_out": False,
         "duration_s": 0.5},
        # q4: the runner died before writing it
    ]


def test_scores_join_labels_and_call_log_costs_per_example(tmp_path):
    results = tmp_path / "results.jsonl"
    _write_results(results, _results())
    log = tmp_path / "calls.jsonl"
    for row in [_call("c1", "q1", 0.01, 100, 10), _call("c2", "q1", 0.02, 200, 20),
                _call("c3", "q2", 0.0, 50, 5, cache="hit"), _call("c9", "other", 9.0, 9, 9)]:
        append_jsonl(log, row)

    rows, summary = score_results(results, _examples(), load_metric("exact_match", tmp_path), split="val",
                                  call_log=log)
    by_id = {r["id"]: r for r in rows}
    assert [r["id"] for r in rows] == ["q1", "q2", "q3", "q4"]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert by_id["q1"]["score"] == 1.0 and by_id["q1"]["split"] == "val"
    assert by_id["q1"]["cost_usd"] == pytest.approx(0.03)
    assert (by_id["q1"]["input_tokens"], by_id["q1"]["output_tokens"], by_id["q1"]["llm_calls"]) == (300, 30, 2)
    assert by_id["q1"]["latency_s"] == 1.0
    assert by_id["q2"]["score"] == 1.0 and by_id["q2"]["llm_calls"] == 1  # dict output, list of answers
    assert by_id["q3"]["score"] == 0.0 and by_id["q3"]["error"] == "KeyError: 'docs'"
    assert by_id["q4"]["error"] == "no result" and by_id["q4"]["score"] == 0.0
    assert by_id["q4"]["llm_calls"] == 0

    assert set(summary) == SUMMARY_KEYS
    assert summary["format"] == "pipemend-eval-1" and summary["split"] == "val"
    assert summary["n"] == 4 and summary["score"] == 0.5 and summary["errors"] == 2
    assert summary["cost_usd"] == pytest.approx(0.03)
    assert (summary["input_tokens"], summary["output_tokens"]) == (350, 35)
    assert summary["latency_s_mean"] == pytest.approx((1.0 + 3.0 + 0.5) / 3)
    assert summary["ci_low"] <= 0.5 <= summary["ci_high"]


def test_latency_adds_back_what_the_llm_cache_saved(tmp_path):
    """A candidate whose unchanged steps hit the cache is compared with a base that paid for every call."""
    results = tmp_path / "results.jsonl"
    _write_results(results, _results()[:2])
    log = tmp_path / "calls.jsonl"
    hit = {**_call("c1", "q1", 0.0, 100, 10, cache="hit"), "latency_s": 0.002, "origin_latency_s": 2.502}
    old_hit = _call("c2", "q1", 0.0, 100, 10, cache="hit")  # logged before origin latencies existed
    miss = {**_call("c3", "q2", 0.01, 100, 10), "origin_latency_s": None}
    for row in (hit, old_hit, miss):
        append_jsonl(log, row)
    rows, _ = score_results(results, _examples()[:2], load_metric("exact_match", tmp_path), split="val",
                            call_log=log)
    assert rows[0]["latency_s"] == pytest.approx(1.0 + 2.5)
    assert rows[1]["latency_s"] == pytest.approx(3.0)


def test_trace_call_ids_pick_this_evaluations_calls_only(tmp_path):
    """The call log holds two evaluations of q1; the trace's call ids select the right one."""
    results = tmp_path / "results.jsonl"
    _write_results(results, _results()[:1])
    log = tmp_path / "calls.jsonl"
    for row in [_call("old-1", "q1", 1.0, 1000, 100), _call("new-1", "q1", 0.5, 10, 1)]:
        append_jsonl(log, row)
    traces = tmp_path / "traces"
    traces.mkdir()
    trace = {"trace_format": "pipemend-1", "example_id": "q1", "steps": [
        {"id": "s1", "kind": "generation", "name": "answer",
         "llm_calls": [{"call_id": "new-1", "gen_ai.usage.input_tokens": 10},
                       {"call_id": "not-logged", "gen_ai.usage.input_tokens": 7,
                        "gen_ai.usage.output_tokens": 2}]}],
             "llm_calls": [{"call_id": "outside-steps", "gen_ai.usage.input_tokens": 1}]}
    (traces / "q1.json").write_text(json.dumps(trace))

    rows, _ = score_results(results, _examples()[:1], load_metric("exact_match", tmp_path), split="val",
                            call_log=log, traces_dir=traces)
    assert rows[0]["cost_usd"] == 0.5
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"], rows[0]["llm_calls"]) == (18, 3, 3)


def test_timeouts_and_raising_metrics_score_zero_without_crashing(tmp_path):
    results = tmp_path / "results.jsonl"
    _write_results(results, [
        {"id": "q1", "output": "Paris", "error": None, "timed_out": True, "duration_s": 30.0},
        {"id": "q2", "output": "Madrid", "error": None, "timed_out": False, "duration_s": 1.0},
    ])
    (tmp_path / "m.py").write_text(
        "def score(output, expected, example):\n"
        "    if example['id'] == 'q2':\n"
        "        raise RuntimeError('cannot score')\n"
        "    return 1.0\n"
    )
    rows, summary = score_results(results, _examples()[:2], load_metric("m.py:score", tmp_path), split="train")
    assert rows[0]["score"] == 0.0 and rows[0]["timed_out"] and rows[0]["error"] == "timed out"
    assert rows[1]["score"] == 0.0 and "RuntimeError: cannot score" in rows[1]["error"]
    assert summary["errors"] == 2


def test_write_eval_round_trips(tmp_path):
    results = tmp_path / "results.jsonl"
    _write_results(results, _results())
    rows, summary = score_results(results, _examples(), load_metric("exact_match", tmp_path), split="val")
    out = tmp_path / "evals" / "baseline-val"
    write_eval(out, rows, summary)
    assert list(read_jsonl(out / "scored.jsonl")) == json.loads(json.dumps(rows))
    assert read_json(out / "summary.json") == summary
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- work outside the examples (start-up)


def _runner_json(out: Path, startup_s: float, token: str = "tok") -> None:
    (out / "runner.json").write_text(json.dumps({"format": "pipemend-runner-1", "startup_s": startup_s, "eval": token}))


def _eval_call(call_id, example_id, cost, *, token="tok", latency=0.1, t=1.0):
    return {**_call(call_id, example_id, cost, 10, 1), "eval": token, "latency_s": latency, "t": t}


def test_calls_outside_examples_and_start_up_are_charged_to_the_evaluation(tmp_path):
    results = tmp_path / "results.jsonl"
    _write_results(results, _results())  # q1..q3 ran, q4 has no result
    _runner_json(tmp_path, 3.0)
    log = tmp_path / "calls.jsonl"
    for row in [_eval_call("c1", "q1", 0.01), _eval_call("c2", "q2", 0.02),
                _eval_call("s1", "<startup>", 0.40, latency=2.0),  # made while the module imported
                _eval_call("b1", "<outside>", 0.08, latency=0.5),  # a background thread, after start-up
                _eval_call("x1", "q1", 5.0, token="another-eval"),  # another evaluation's call: not ours
                _eval_call("x2", "<startup>", 7.0, token="another-eval")]:
        append_jsonl(log, row)
    rows, summary = score_results(results, _examples(), load_metric("exact_match", tmp_path), split="val", call_log=log)
    by_id = {r["id"]: r for r in rows}
    share = 0.48 / 4
    assert by_id["q1"]["cost_usd"] == pytest.approx(0.01 + share)
    assert by_id["q2"]["cost_usd"] == pytest.approx(0.02 + share)
    assert by_id["q4"]["cost_usd"] == pytest.approx(share)  # cost is spread over every example
    overhead = 3.0 + 0.5  # start-up (longer than its own calls' 2.0) plus the background call
    assert by_id["q1"]["latency_s"] == pytest.approx(1.0 + overhead / 3)  # latency over the examples that ran
    assert by_id["q3"]["latency_s"] == pytest.approx(0.5 + overhead / 3)
    assert by_id["q4"]["latency_s"] is None
    assert set(summary) == SUMMARY_KEYS
    assert summary["startup_s"] == 3.0 and summary["unattributed_calls"] == 2
    assert summary["unattributed_cost_usd"] == pytest.approx(0.48)
    assert summary["unattributed_latency_s"] == pytest.approx(overhead)
    assert summary["cost_usd"] == pytest.approx(0.03 + 0.48)
    assert (summary["unattributed_input_tokens"], summary["input_tokens"]) == (20, 40)


def test_moving_the_model_calls_to_import_time_saves_nothing(tmp_path):
    """The same four one-second calls, made per example or all at import time, cost the same and take as long."""
    def evaluation(name, tags, duration_s, startup_s):
        d = tmp_path / name
        d.mkdir()
        results = d / "results.jsonl"
        _write_results(results, [{"id": ex.id, "output": "x", "error": None, "timed_out": False,
                                  "duration_s": duration_s} for ex in _examples()])
        _runner_json(d, startup_s)
        log = d / "calls.jsonl"
        for i, tag in enumerate(tags):
            append_jsonl(log, _eval_call(f"{name}-{i}", tag, 0.25, latency=1.0))
        return score_results(results, _examples(), load_metric("exact_match", tmp_path), split="val", call_log=log)

    per_rows, per_sum = evaluation("per-example", ["q1", "q2", "q3", "q4"], duration_s=1.2, startup_s=0.05)
    imp_rows, imp_sum = evaluation("at-import", ["<startup>"] * 4, duration_s=0.2, startup_s=4.05)
    assert sum(r["cost_usd"] for r in imp_rows) == pytest.approx(sum(r["cost_usd"] for r in per_rows)) == pytest.approx(1.0)
    assert imp_sum["cost_usd"] == pytest.approx(per_sum["cost_usd"])
    assert imp_sum["unattributed_cost_usd"] == pytest.approx(1.0) and per_sum["unattributed_cost_usd"] == 0.0
    assert imp_sum["latency_s_mean"] == pytest.approx(per_sum["latency_s_mean"]) == pytest.approx(1.2 + 0.05 / 4)


def test_calls_without_an_eval_token_are_charged_when_inside_the_evaluations_window(tmp_path):
    results = tmp_path / "results.jsonl"
    _write_results(results, _results()[:2])
    log = tmp_path / "calls.jsonl"
    stripped = {**_call("raw", None, 0.3, 5, 5), "t": 105.0}  # the pipeline stripped every pipemend header
    before = {**_call("early", None, 9.0, 5, 5), "t": 50.0}  # another evaluation, earlier
    for row in [_eval_call("c1", "q1", 0.01, t=101.0), stripped, before]:
        append_jsonl(log, row)
    rows, summary = score_results(results, _examples()[:2], load_metric("exact_match", tmp_path), split="val",
                                  call_log=log, eval_token="tok", window=(100.0, 110.0))
    assert summary["unattributed_calls"] == 1 and summary["unattributed_cost_usd"] == pytest.approx(0.3)
    assert rows[0]["cost_usd"] == pytest.approx(0.01 + 0.15)
    # without the window, a token-less call is nobody's
    _, summary = score_results(results, _examples()[:2], load_metric("exact_match", tmp_path), split="val",
                               call_log=log, eval_token="tok")
    assert summary["unattributed_calls"] == 0


def test_a_forged_eval_token_inside_the_window_excuses_nothing(tmp_path):
    """A pipeline that sends another evaluation's token (or a made-up one) on its import-time calls is still
    charged for them: the run's gateway serves one evaluation at a time, so the window decides."""
    results = tmp_path / "results.jsonl"
    _write_results(results, _results()[:2])
    log = tmp_path / "calls.jsonl"
    forged = {**_eval_call("f1", "<startup>", 0.4, token="someone-else"), "t": 104.0}
    elsewhere = {**_eval_call("e1", "<startup>", 7.0, token="someone-else"), "t": 40.0}  # truly another evaluation
    for row in [_eval_call("c1", "q1", 0.01, t=101.0), forged, elsewhere]:
        append_jsonl(log, row)
    _, summary = score_results(results, _examples()[:2], load_metric("exact_match", tmp_path), split="val",
                               call_log=log, eval_token="tok", window=(100.0, 110.0))
    assert summary["unattributed_calls"] == 1 and summary["unattributed_cost_usd"] == pytest.approx(0.4)


def test_the_hosts_token_wins_over_what_the_sandbox_wrote(tmp_path):
    """A pipeline that rewrites runner.json to name another token is still charged for its start-up calls."""
    results = tmp_path / "results.jsonl"
    _write_results(results, _results()[:1])
    _runner_json(tmp_path, 0.0, token="forged")
    log = tmp_path / "calls.jsonl"
    for row in [_eval_call("s1", "<startup>", 0.5, latency=2.0), _eval_call("f1", "<startup>", 0.0, token="forged")]:
        append_jsonl(log, row)
    rows, summary = score_results(results, _examples()[:1], load_metric("exact_match", tmp_path), split="val",
                                  call_log=log, eval_token="tok")
    assert summary["unattributed_cost_usd"] == pytest.approx(0.5)
    # runner.json claimed no start-up time: the start-up calls' own latency is charged instead
    assert summary["unattributed_latency_s"] == pytest.approx(2.0)
    assert rows[0]["latency_s"] == pytest.approx(1.0 + 2.0)


@pytest.mark.parametrize("plant", ["symlink", "huge", "wrong-format", "not-json", "nan"])
def test_a_hostile_runner_json_is_ignored(tmp_path, plant):
    results = tmp_path / "results.jsonl"
    _write_results(results, _results()[:1])
    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps({"format": "pipemend-runner-1", "startup_s": 5.0, "eval": "tok"}))
    target = tmp_path / "runner.json"
    if plant == "symlink":
        target.symlink_to(real)
    elif plant == "huge":
        target.write_text(json.dumps({"format": "pipemend-runner-1", "startup_s": 5.0, "eval": "tok", "pad": "x" * 100_000}))
    elif plant == "wrong-format":
        target.write_text(json.dumps({"format": "pipemend-runner-9", "startup_s": 5.0, "eval": "tok"}))
    elif plant == "not-json":
        target.write_text("{")
    else:
        target.write_text('{"format": "pipemend-runner-1", "startup_s": NaN, "eval": "tok"}')
    rows, summary = score_results(results, _examples()[:1], load_metric("exact_match", tmp_path), split="val")
    assert summary["startup_s"] == 0.0 and rows[0]["latency_s"] == 1.0


def test_a_trace_planted_as_a_symlink_is_not_read(tmp_path):
    results = tmp_path / "results.jsonl"
    _write_results(results, _results()[:1])
    log = tmp_path / "calls.jsonl"
    append_jsonl(log, _call("c1", "q1", 0.25, 10, 1))
    traces = tmp_path / "traces"
    traces.mkdir()
    elsewhere = tmp_path / "other.json"
    elsewhere.write_text(json.dumps({"llm_calls": [{"call_id": "zzz"}]}))
    (traces / "q1.json").symlink_to(elsewhere)
    rows, _ = score_results(results, _examples()[:1], load_metric("exact_match", tmp_path), split="val",
                            call_log=log, traces_dir=traces)
    assert rows[0]["cost_usd"] == 0.25 and rows[0]["llm_calls"] == 1  # by example id, not the planted trace


IMPORT_TIME_PIPELINE = """
import os

import httpx

def _ask(text):
    r = httpx.post(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", timeout=20,
                   headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"]},
                   json={"model": os.environ["PIPEMEND_MODEL"], "max_tokens": 5,
                         "messages": [{"role": "user", "content": text}]})
    return r.json()["content"][0]["text"]

WARM = _ask("at import: precompute everything")  # work moved out of the examples

def run(inputs):
    return WARM + "/" + _ask("answer: " + inputs["question"])
"""


class _RecordingMessagesHandler(http.server.BaseHTTPRequestHandler):
    """A strict stand-in for the gateway at the LLM boundary: records each request's headers, answers
    ``reply<n>``, logs one call-log row per request the way the gateway does (example and eval headers)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            n = len(self.server.calls) + 1
            self.server.calls.append({
                "call_id": f"c-{n}", "t": 1.0, "example_id": self.headers.get("x-pipemend-example"),
                "eval": self.headers.get("x-pipemend-eval"), "input_tokens": 10, "output_tokens": 1,
                "latency_s": 0.01, "cost_usd": 0.1, "cache": "miss"})
        payload = json.dumps({"id": f"msg_{n}", "type": "message", "role": "assistant", "model": "m",
                              "content": [{"type": "text", "text": f"reply{n}"}], "stop_reason": "end_turn",
                              "usage": {"input_tokens": 10, "output_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("x-pipemend-call-id", f"c-{n}")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.mark.parametrize("token", ["eval-123", None])
def test_a_pipeline_that_calls_the_model_at_import_time_is_charged_for_it(tmp_path, token):
    """The real runner, a pipeline whose model call happens at import: the call carries the start-up tag
    and the evaluation's token, runner.json has the import's duration, and scoring charges both."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "pipeline.py").write_text(IMPORT_TIME_PIPELINE)
    rows_in = [{"id": "q1", "inputs": {"question": "a"}}, {"id": "q2", "inputs": {"question": "b"}}]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingMessagesHandler)
    server.calls, server.lock = [], threading.Lock()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k != "PIPEMEND_EVAL"} | ({"PIPEMEND_EVAL": token} if token else {})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipemend.runner", "--target", str(target), "--entrypoint", "pipeline:run",
             "--inputs", str(inputs), "--out", str(tmp_path / "out"), "--concurrency", "1",
             "--gateway-url", f"http://127.0.0.1:{server.server_address[1]}", "--model", "local/test-model"],
            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    runner_json = json.loads((tmp_path / "out" / "runner.json").read_text())
    assert runner_json["format"] == "pipemend-runner-1"
    assert isinstance(runner_json["startup_s"], float) and runner_json["startup_s"] > 0
    assert runner_json["eval"] == token if token else len(runner_json["eval"]) == 32  # else the runner's own token
    assert [c["example_id"] for c in server.calls] == ["<startup>", "q1", "q2"]
    assert {c["eval"] for c in server.calls} == {runner_json["eval"]}
    log = tmp_path / "calls.jsonl"
    for c in server.calls:
        append_jsonl(log, c)

    examples = [Example(id="q1", inputs={"question": "a"}, expected="reply1/reply2"),
                Example(id="q2", inputs={"question": "b"}, expected="reply1/reply3")]
    rows, summary = score_results(tmp_path / "out" / "results.jsonl", examples, load_metric("exact_match", tmp_path),
                                  split="val", call_log=log, traces_dir=tmp_path / "out" / "traces", eval_token=token)
    assert [r["score"] for r in rows] == [1.0, 1.0]
    assert summary["unattributed_calls"] == 1 and summary["unattributed_cost_usd"] == pytest.approx(0.1)
    assert summary["startup_s"] == runner_json["startup_s"]
    assert summary["cost_usd"] == pytest.approx(0.3)
    assert [r["cost_usd"] for r in rows] == [pytest.approx(0.15), pytest.approx(0.15)]
    assert all(r["latency_s"] >= runner_json["startup_s"] / 2 for r in rows)


# --------------------------------------------------------------------------- statistics


def test_bootstrap_ci_is_deterministic_and_sane():
    rng = np.random.default_rng(5)
    scores = (rng.random(200) < 0.6).astype(float).tolist()
    assert bootstrap_ci(scores) == bootstrap_ci(scores)
    low, high = bootstrap_ci(scores)
    assert low < float(np.mean(scores)) < high
    assert 0.05 < high - low < 0.2  # ≈ ±1.96·sqrt(.24/200) ≈ ±0.068
    assert bootstrap_ci(scores, seed=1) != bootstrap_ci(scores)
    narrow = bootstrap_ci(scores, confidence=0.5)
    assert low < narrow[0] < narrow[1] < high
    assert bootstrap_ci([1.0] * 30) == (1.0, 1.0)
    assert bootstrap_ci([]) == (0.0, 0.0)


def test_paired_bootstrap_detects_a_real_improvement_and_not_noise():
    base = [0.0] * 20 + [1.0] * 20
    better = [1.0] * 15 + [0.0] * 5 + [1.0] * 20  # 15 wins, no losses
    res = paired_bootstrap(base, better, seed=3)
    assert res["mean_delta"] == pytest.approx(15 / 40)
    assert 0 < res["ci_low"] < res["mean_delta"] < res["ci_high"]
    assert res["prob_positive"] == 1.0
    assert res == paired_bootstrap(base, better, seed=3)

    same = paired_bootstrap(base, base)
    assert same["mean_delta"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.0 and same["prob_positive"] == 0.0

    mixed = [1.0] * 5 + [0.0] * 15 + [0.0] * 5 + [1.0] * 15  # 5 wins, 5 losses
    res = paired_bootstrap(base, mixed)
    assert res["mean_delta"] == 0.0 and res["ci_low"] < 0 < res["ci_high"] and 0.2 < res["prob_positive"] < 0.8
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_sign_test_exact_binomial():
    res = sign_test([0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 0])
    assert (res["wins"], res["losses"], res["ties"], res["n"]) == (4, 1, 1, 5)
    assert res["p_value"] == pytest.approx(6 / 32)  # P(X>=4), X~Bin(5, 1/2) = (5+1)/32
    assert sign_test([0] * 10, [1] * 10)["p_value"] == pytest.approx(1 / 1024)
    assert sign_test([1] * 3, [0] * 3)["p_value"] == 1.0
    assert sign_test([0.5, 0.5], [0.5, 0.5]) == {"wins": 0, "losses": 0, "ties": 2, "n": 0, "p_value": 1.0}
