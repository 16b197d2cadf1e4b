"""Host-side scoring: join the runner's results with the labels, add cost and latency, and the statistics.

Labels never leave the host: the runner writes ``results.jsonl`` (outputs
only), and ``score_results`` joins them here with the frozen examples and
metric. This module is also pipemend's one statistics module: bootstrap CI,
paired bootstrap and the exact sign test the gate uses.

Cost and tokens of an example come from the gateway call log. With a
``traces_dir``, an example's calls are the ``call_id``s listed in its trace
(exact even when the call log holds many evaluations of the same example);
without a trace, or when the trace lists no call ids, they are the call-log
rows whose ``example_id`` is the example's (among this evaluation's calls when
they are known, else in the whole log).

Everything the candidate causes counts: the calls of this evaluation that no
example of it accounts for (made at import time, tagged ``<startup>``, or from
a background thread, tagged ``<outside>``, or with no example header at all)
and the pipeline's start-up time (``OUT/runner.json``) are charged to the
evaluation and spread evenly over its examples: each row's ``cost_usd`` gets
an equal share of their cost, and each row that ran an equal share of their
latency (start-up time, or the start-up calls' own latency when larger, plus
the latency of the other unaccounted calls). The summary shows them apart
(``startup_s``, ``unattributed_calls``, ``unattributed_cost_usd``,
``unattributed_latency_s``, and ``unheaded_call_ids``: the calls made after
start-up with no example header, which ``boundary.py`` warns about). A call belongs to this evaluation when its
call-log row's ``eval`` is the evaluation's token (``x-pipemend-eval``, which
the runner sends on every request), or when its ``t`` falls in the
evaluation's time window whatever its ``eval`` says (a run's gateway serves one
evaluation at a time, so a pipeline that strips or forges the header is
charged, not excused).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .dataset import Example
from .fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json_object, read_jsonl
from .metrics import METRIC_ERROR_PREFIX, Metric, ScoreContext, Scored
from .trace_join import joined_trace_bytes

EVAL_FORMAT = "pipemend-eval-1"
NO_RESULT = "no result"
RUNNER_JSON = "runner.json"
RUNNER_FORMAT = "pipemend-runner-1"
STARTUP_TAG = "<startup>"
OUTSIDE_TAG = "<outside>"
MAX_TRACE_BYTES = 32 << 20
MAX_RUNNER_JSON_BYTES = 64 << 10


# --------------------------------------------------------------------------- joining results, labels and costs


def _runner_error(result: dict[str, Any]) -> str | None:
    err = result.get("error")
    if err:
        if isinstance(err, dict):
            kind, msg = err.get("type") or "Error", err.get("message") or ""
            return f"{kind}: {msg}" if msg else str(kind)
        return str(err)
    if result.get("timed_out"):
        return "timed out"
    return None


def trace_call_ids(trace: dict[str, Any]) -> list[str]:
    """The ``call_id``s a trace records (the example's and its steps'), in order, once each."""
    ids: list[str] = []
    calls = list(trace.get("llm_calls") or [])
    for step in trace.get("steps") or []:
        if isinstance(step, dict):
            calls += step.get("llm_calls") or []
    for call in calls:
        if isinstance(call, dict) and call.get("call_id"):
            ids.append(str(call["call_id"]))
    return list(dict.fromkeys(ids))


def _read_trace(traces_dir: Path | None, example_id: str) -> dict[str, Any] | None:
    if traces_dir is None:
        return None
    path = Path(traces_dir) / f"{example_id}.json"
    if path.parent != Path(traces_dir) or os.path.islink(traces_dir):
        return None
    return read_json_object(path, max_bytes=MAX_TRACE_BYTES)


def read_runner_json(path: Path) -> dict[str, Any]:
    """``{"startup_s": float, "eval": str | None}`` from the runner's ``runner.json`` (hostile: checked,
    size-capped, never through a link); ``startup_s`` 0.0 and ``eval`` None when absent or malformed."""
    obj = read_json_object(path, max_bytes=MAX_RUNNER_JSON_BYTES) or {}
    if obj.get("format") != RUNNER_FORMAT:
        obj = {}
    token = obj.get("eval")
    return {"startup_s": max(0.0, _num(obj.get("startup_s"))), "eval": token if isinstance(token, str) and token else None}


def _num(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def _usage(calls: Iterable[dict[str, Any]]) -> dict[str, Any]:
    calls = list(calls)
    return {
        "cost_usd": sum(_num(c.get("cost_usd")) for c in calls),
        "input_tokens": int(sum(_num(c.get("input_tokens")) for c in calls)),
        "output_tokens": int(sum(_num(c.get("output_tokens")) for c in calls)),
        "llm_calls": len(calls),
    }


def _cache_savings(calls: Iterable[dict[str, Any]]) -> float:
    """Seconds the LLM cache saved an example: for each hit, what computing its answer took, less what
    the hit took. Added to the runner's wall time, so latency compares a candidate whose unchanged
    steps hit the cache with a base that paid for every call."""
    saved = 0.0
    for c in calls:
        if c.get("cache") == "hit" and isinstance(c.get("origin_latency_s"), (int, float)):
            saved += max(0.0, float(c["origin_latency_s"]) - _num(c.get("latency_s")))
    return saved


def score_results(
    results_jsonl: Path,
    examples: list[Example],
    metric: Metric | Callable[..., float],
    *,
    split: str,
    call_log: Path | None = None,
    traces_dir: Path | None = None,
    runner_json: Path | None = None,
    eval_token: str | None = None,
    window: tuple[float, float] | None = None,
    join_traces: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Scored rows (one per example, in ``examples`` order) and the summary, in AGENTS.md's shapes.

    An example the runner reported as failed or timed out scores 0 with its
    error; one missing from ``results_jsonl`` scores 0 with error ``"no result"``;
    one whose metric fails scores 0 with ``"metric error: ..."``. The metric scores after the traces are
    joined: a judge reads the example's trace and the model calls charged to it (``metrics.ScoreContext``),
    and its calls go to the judge's own gateway, never this call log. ``latency_s`` is
    the runner's wall time plus what the LLM cache saved the example, plus its
    share of the evaluation's start-up and unaccounted calls (module docstring).

    ``runner_json`` defaults to ``runner.json`` beside ``results_jsonl``;
    ``eval_token`` (the host's ``PIPEMEND_EVAL`` for this evaluation) defaults to
    the token the runner reports there; ``window`` is ``(start, end)`` in
    ``time.time()`` seconds of the sandbox run, for calls that carry no token.

    With ``join_traces`` (``evaluate`` sets it, right after the sandbox's files came in), the trace of an
    example whose pipeline marked no step gets a generation step per call charged to it, joined from the
    call log, and is written back to ``traces_dir`` (``trace_join.joined_trace_bytes``).
    """
    if not isinstance(metric, Metric):
        metric = Metric(getattr(metric, "__name__", "metric"), metric)
    results: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(results_jsonl):
        if isinstance(row, dict) and "id" in row:
            results[str(row["id"])] = row  # a re-run example: the last row wins

    runner = read_runner_json(Path(runner_json) if runner_json is not None else Path(results_jsonl).parent / RUNNER_JSON)
    log_rows = [r for r in read_jsonl(call_log) if isinstance(r, dict)] if call_log is not None else []
    by_call = {str(r["call_id"]): r for r in log_rows if r.get("call_id")}
    token = eval_token or runner["eval"]
    ours = _eval_calls(log_rows, token, window)
    by_example: dict[str, list[dict[str, Any]]] = {}
    for r in ours if ours else log_rows:
        by_example.setdefault(str(r.get("example_id")), []).append(r)
    accounted: set[int] = set()
    pending: list[tuple[dict[str, Any], Example, ScoreContext]] = []

    rows: list[dict[str, Any]] = []
    for ex in examples:
        result = results.get(ex.id)
        row: dict[str, Any] = {"id": ex.id, "split": split, "output": None, "score": 0.0, "error": None,
                               "timed_out": False, "latency_s": None}
        if result is None:
            row["error"] = NO_RESULT
        else:
            row["output"] = result.get("output")
            row["timed_out"] = bool(result.get("timed_out"))
            duration = result.get("duration_s")
            row["latency_s"] = _num(duration) if duration is not None else None
            row["error"] = _runner_error(result)

        trace = _read_trace(traces_dir, ex.id)
        call_ids = trace_call_ids(trace) if trace else []
        if call_ids:
            calls = [by_call.get(cid) or _call_from_trace(trace, cid) for cid in call_ids]
        else:
            calls = by_example.get(ex.id, [])
        accounted |= {id(c) for c in calls}
        if join_traces and trace is not None and traces_dir is not None:
            joined = joined_trace_bytes(trace, [c for c in calls if "request" in c or "response" in c])
            if joined is not None:
                atomic_write_bytes(Path(traces_dir) / f"{ex.id}.json", joined)
                trace = json.loads(joined)
        if result is not None and row["error"] is None:
            pending.append((row, ex, ScoreContext(trace=trace, calls=tuple(calls), eval_token=token)))
        row.update(_usage(calls))
        if row["latency_s"] is not None:
            row["latency_s"] += _cache_savings(calls)
        rows.append(row)
    score_rows(metric, pending)
    overhead = _charge_overhead(rows, [r for r in ours if id(r) not in accounted], runner["startup_s"])
    summary = summarize(rows, split=split) | overhead
    summary["input_tokens"] += overhead["unattributed_input_tokens"]
    summary["output_tokens"] += overhead["unattributed_output_tokens"]
    return rows, summary


def score_rows(metric: Metric, pending: Sequence[tuple[dict[str, Any], Example, ScoreContext]]) -> None:
    """Score each ``(row, example, context)`` with ``metric`` into its row: ``score``, ``error``, and a weighted
    metric's ``metric_parts`` and the judges' ``judgments`` when there are any. ``metric.concurrency`` rows at
    once (a judge's model calls run side by side; a Python metric one row at a time)."""

    def one(item: tuple[dict[str, Any], Example, ScoreContext]) -> None:
        row, ex, ctx = item
        try:
            got = metric.score(row["output"], ex.expected, ex.model_dump(), ctx)
        except Exception as e:  # noqa: BLE001 - one example's scoring fault is data (a judge's bug included)
            got = Scored(0.0, f"{METRIC_ERROR_PREFIX}{type(e).__name__}: {e}")
        row["score"], row["error"] = got.score, got.error
        if got.parts is not None:
            row["metric_parts"] = got.parts
        if got.judgments:
            row["judgments"] = got.judgments

    workers = min(max(1, int(getattr(metric, "concurrency", 1))), len(pending))
    if workers <= 1:
        for item in pending:
            one(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pipemend-judge") as pool:
        list(pool.map(one, pending))


def _eval_calls(log_rows: list[dict[str, Any]], token: str | None, window: tuple[float, float] | None) -> list[dict[str, Any]]:
    """This evaluation's call-log rows: its token's, and every row inside its time window (the run's gateway
    serves one evaluation at a time, so a forged or stripped token excuses nothing)."""
    ours = []
    for r in log_rows:
        if token is not None and r.get("eval") == token:
            ours.append(r)
        elif window is not None and window[0] <= _num(r.get("t")) <= window[1]:
            ours.append(r)
    return ours


def _charge_overhead(rows: list[dict[str, Any]], unaccounted: list[dict[str, Any]], startup_s: float) -> dict[str, Any]:
    """Spread the unaccounted calls and the start-up time evenly over the rows (cost over all of them,
    latency over those that ran); return the summary's overhead fields."""
    usage = _usage(unaccounted)
    at_startup = [c for c in unaccounted if c.get("example_id") == STARTUP_TAG]
    later = [c for c in unaccounted if c.get("example_id") != STARTUP_TAG]

    def wall(calls: list[dict[str, Any]]) -> float:
        return sum(_num(c.get("latency_s")) for c in calls) + _cache_savings(calls)

    latency = max(startup_s, wall(at_startup)) + wall(later)
    ran = [r for r in rows if r.get("latency_s") is not None]
    for r in rows:
        r["cost_usd"] += usage["cost_usd"] / len(rows)
    for r in ran:
        r["latency_s"] += latency / len(ran)
    return {
        "startup_s": startup_s,
        "unattributed_calls": usage["llm_calls"],
        "unattributed_cost_usd": usage["cost_usd"],
        "unattributed_latency_s": latency,
        "unattributed_input_tokens": usage["input_tokens"],
        "unattributed_output_tokens": usage["output_tokens"],
        "unheaded_call_ids": [str(c.get("call_id")) for c in unaccounted
                              if c.get("example_id") in (None, "", OUTSIDE_TAG)][:100],
    }


def _call_from_trace(trace: dict[str, Any] | None, call_id: str) -> dict[str, Any]:
    """A call the call log lacks: its tokens as the trace recorded them, cost unknown (0)."""
    trace = trace or {}
    holders = [trace] + [s for s in trace.get("steps") or [] if isinstance(s, dict)]
    for holder in holders:
        for call in holder.get("llm_calls") or []:
            if isinstance(call, dict) and call.get("call_id") == call_id:
                return {"call_id": call_id, "input_tokens": call.get("gen_ai.usage.input_tokens"),
                        "output_tokens": call.get("gen_ai.usage.output_tokens"), "cost_usd": 0.0}
    return {"call_id": call_id}


def summarize(rows: Sequence[dict[str, Any]], *, split: str) -> dict[str, Any]:
    """The ``summary.json`` object of scored rows (an empty evaluation scores 0 with CI (0, 0))."""
    scores = [float(r["score"]) for r in rows]
    low, high = bootstrap_ci(scores)
    latencies = [float(r["latency_s"]) for r in rows if r.get("latency_s") is not None]
    return {
        "format": EVAL_FORMAT,
        "split": split,
        "n": len(rows),
        "score": float(np.mean(scores)) if scores else 0.0,
        "ci_low": low,
        "ci_high": high,
        "errors": sum(1 for r in rows if r.get("error")),
        "cost_usd": float(sum(_num(r.get("cost_usd")) for r in rows)),
        "latency_s_mean": float(np.mean(latencies)) if latencies else 0.0,
        "input_tokens": int(sum(_num(r.get("input_tokens")) for r in rows)),
        "output_tokens": int(sum(_num(r.get("output_tokens")) for r in rows)),
    }


def write_eval(out_dir: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write ``scored.jsonl`` and ``summary.json`` into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    text = "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(out_dir / "scored.jsonl", text)
    atomic_write_json(out_dir / "summary.json", {"format": EVAL_FORMAT, **summary})


# --------------------------------------------------------------------------- statistics


def _resampled_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // max(n, 1))  # bound memory: at most ~2M indices at once
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def _interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    scores: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; deterministic for a given seed. Empty → (0.0, 0.0)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        return 0.0, 0.0
    return _interval(_resampled_means(values, n_resamples, seed), confidence)


def paired_bootstrap(
    base_scores: Sequence[float],
    cand_scores: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap of the mean per-example delta (candidate − base), resampling examples in pairs.

    Returns ``{"n", "mean_delta", "ci_low", "ci_high", "confidence", "prob_positive", "n_resamples"}``;
    ``prob_positive`` is the share of resampled mean deltas above 0.
    """
    base, cand = np.asarray(base_scores, dtype=float), np.asarray(cand_scores, dtype=float)
    if base.shape != cand.shape:
        raise ValueError(f"paired scores differ in length: {base.size} base vs {cand.size} candidate")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    out: dict[str, Any] = {"n": int(base.size), "confidence": confidence, "n_resamples": n_resamples}
    if base.size == 0:
        return out | {"mean_delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "prob_positive": 0.0}
    deltas = cand - base
    means = _resampled_means(deltas, n_resamples, seed)
    low, high = _interval(means, confidence)
    return out | {"mean_delta": float(deltas.mean()), "ci_low": low, "ci_high": high,
                  "prob_positive": float((means > 0).mean())}


def sign_test(base: Sequence[float], cand: Sequence[float], *, tol: float = 1e-9) -> dict[str, Any]:
    """Exact one-sided sign test that the candidate beats the base per example.

    Ties (|delta| ≤ ``tol``) are dropped. ``p_value`` = P(X ≥ wins) for
    X ~ Binomial(wins + losses, 1/2); 1.0 when every pair ties.
    """
    if len(base) != len(cand):
        raise ValueError(f"paired scores differ in length: {len(base)} base vs {len(cand)} candidate")
    wins = losses = ties = 0
    for b, c in zip(base, cand):
        d = float(c) - float(b)
        if d > tol:
            wins += 1
        elif d < -tol:
            losses += 1
        else:
            ties += 1
    n = wins + losses
    p = sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0
    return {"wins": wins, "losses": losses, "ties": ties, "n": n, "p_value": float(p)}
