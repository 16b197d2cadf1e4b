from __future__ import annotations

import json
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
                "input_tokens", "output_tokens"}


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
