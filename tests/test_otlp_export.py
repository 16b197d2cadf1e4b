"""OpenTelemetry export: ``pipemend export --otlp``, OTLP/HTTP pushes and ``optimize --otlp-endpoint``.

One real optimize run on the tinyqa target (simulated echo model, process sandbox) streams to a real local
collector (``http.server`` in a thread) that refuses its first request with a 500; the other tests read that run.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

import optimize_harness

from pipemend.cli import app
from pipemend.errors import ExportFailed, UsageError
from pipemend.export.otlp import (MAX_MESSAGES_CHARS, evaluation_request, finished_evaluations, input_messages,
                                  run_requests, trace_id_of)
from pipemend.export.otlp_observer import SENT_FILE, SENT_FORMAT, OtlpObserver
from pipemend.export.otlp_push import otlp_encoding_from_env, otlp_headers_from_env, post_traces
from pipemend.fsutil import read_json, read_jsonl
from pipemend.optimize import OptimizeConfig, run_optimize
from pipemend.runtime.trace import TRACE_FORMAT, call_provider

# one xdist worker runs this module (.ci/run: --dist loadfile; the mark keeps it so under loadgroup), so its module-scoped runs are built once
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("otlp_export")]
RUN_ID = "otlp1"


class Collector:
    """A real OTLP/HTTP endpoint: records each POST (path, headers, body, the run's journal events at arrival)
    and answers with the next status of ``statuses`` (then 200)."""

    def __init__(self, statuses: list[int] | None = None, journal: Path | None = None):
        self.statuses = list(statuses or [])
        self.journal = journal
        self.received: list[dict] = []
        self.refused = 0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = collector.statuses.pop(0) if collector.statuses else 200
                if status == 200:
                    events = [e["event"] for e in read_jsonl(collector.journal)] if collector.journal else []
                    collector.received.append({"path": self.path, "headers": self.headers, "body": body,
                                               "events": events})
                else:
                    collector.refused += 1
                answer = b"{}" if status == 200 else b"collector exploded: boom"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def json_bodies(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def otlp_run(tmp_path_factory):
    """One optimize run (candidate 1 accepted, candidate 2 raced out) with ``--otlp-endpoint`` at a collector that
    refuses the first request: (run dir, collector, progress)."""
    tmp = tmp_path_factory.mktemp("otlp")
    target = optimize_harness.make_repo(tmp / "repo")
    reports = tmp / "reports"
    collector = Collector([500], journal=reports / RUN_ID / "journal.jsonl")
    progress = optimize_harness.RecordingProgress()
    cfg = OptimizeConfig(target=str(target), proposer="optimize_plugins:Script",
                         proposer_options={"steps": ["short", "sentence"]}, sandbox="process", run_id=RUN_ID,
                         reports_dir=str(reports), budget_usd=1.0, otlp_endpoint=collector.url)
    summary = run_optimize(cfg, progress)
    yield Path(summary.run_dir), collector, progress
    collector.close()


def _invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def _spans(request: dict) -> list[dict]:
    return [s for rs in request["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]


def _attrs(item: dict) -> dict:
    """OTLP KeyValues back to plain values (intValue strings become ints)."""

    def plain(v: dict):
        if "intValue" in v:
            return int(v["intValue"])
        if "arrayValue" in v:
            return [plain(x) for x in v["arrayValue"]["values"]]
        return next(iter(v.values()))

    return {a["key"]: plain(a["value"]) for a in item.get("attributes", [])}


def _export(run_dir: Path, out: Path, *more: str) -> list[dict]:
    r = _invoke("export", str(run_dir), "--otlp", str(out), *more)
    assert r.exit_code == 0, r.output
    assert f"to {out}" in r.output
    return [json.loads(line) for line in out.read_text().splitlines()]


def _walk_values(node, found):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("intValue", "startTimeUnixNano", "endTimeUnixNano", "timeUnixNano"):
                found.append(v)
            _walk_values(v, found)
    elif isinstance(node, list):
        for v in node:
            _walk_values(v, found)


def test_export_writes_otlp_json_lines_with_hex_ids_and_string_ints(otlp_run, tmp_path):
    run_dir, _, _ = otlp_run
    requests = _export(run_dir, tmp_path / "a.jsonl")
    labels = [label for label, _ in finished_evaluations(run_dir)]
    assert len(requests) == len(labels) and labels[0] == "baseline" and {"cand-1", "cand-2"} <= set(labels)
    names = [d.name for _, d in finished_evaluations(run_dir)]
    assert {"baseline-train", "baseline-val", "baseline-test", "val", "test", "val-look1"} <= set(names)
    assert not any(n.startswith("confirm-") for n in names)
    for request in requests:
        spans = _spans(request)
        assert spans
        for s in spans:
            assert len(s["traceId"]) == 32 and int(s["traceId"], 16) and s["traceId"] == s["traceId"].lower()
            assert len(s["spanId"]) == 16 and int(s["spanId"], 16) and s["spanId"] == s["spanId"].lower()
            assert isinstance(s["kind"], int) and int(s["endTimeUnixNano"]) >= int(s["startTimeUnixNano"]) > 10**18
        ints: list = []
        _walk_values(request, ints)
        assert ints and all(isinstance(v, str) and v.isdigit() for v in ints)
    # deterministic: the same ids on a second export, and derived from run id + candidate + example
    assert _export(run_dir, tmp_path / "b.jsonl") == requests
    val = next(r for (label, d), r in zip(finished_evaluations(run_dir), requests) if d.name == "baseline-val")
    roots = [s for s in _spans(val) if "parentSpanId" not in s]
    scored = {r["id"]: r for r in read_jsonl(run_dir / "evals" / "baseline-val" / "scored.jsonl")}
    assert len(roots) == len(scored) == 8
    for root in roots:
        a = _attrs(root)
        assert root["traceId"] == trace_id_of(RUN_ID, "baseline", a["pipemend.example.id"])
        assert a["pipemend.run.id"] == RUN_ID and a["pipemend.candidate"] == "baseline" and a["pipemend.split"] == "val"
        assert a["pipemend.score"] == scored[a["pipemend.example.id"]]["score"]
        event = next(e for e in root["events"] if e["name"] == "gen_ai.evaluation.result")
        ev = _attrs(event)
        assert ev["gen_ai.evaluation.name"] == "metric.py:score"
        assert ev["gen_ai.evaluation.score.value"] == scored[a["pipemend.example.id"]]["score"]


def test_chat_spans_carry_the_genai_conventions_from_the_call_log(otlp_run, tmp_path):
    run_dir, _, _ = otlp_run
    calls = {c["call_id"]: c for c in read_jsonl(run_dir / "gateway" / "calls.jsonl")}
    requests = _export(run_dir, tmp_path / "m.jsonl", "--include-messages")
    cand1_val = next(r for (label, d), r in zip(finished_evaluations(run_dir), requests)
                     if label == "cand-1" and d.name == "val")
    spans = _spans(cand1_val)
    by_id = {s["spanId"]: s for s in spans}
    chats = [s for s in spans if s["kind"] == 3]
    assert len(chats) == 8
    for chat in chats:
        a = _attrs(chat)
        row = calls[a["pipemend.call_id"]]
        assert chat["name"] == "chat simulated/echo"
        assert a["gen_ai.provider.name"] == "anthropic" and a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == "simulated/echo" == row["model"]
        assert a["gen_ai.response.model"] == row["response"]["model"]
        assert a["gen_ai.usage.input_tokens"] == row["input_tokens"] > 0
        assert a["gen_ai.usage.output_tokens"] == row["output_tokens"] > 0
        assert a["gen_ai.response.finish_reasons"] == [row["response"]["stop_reason"]]
        prompt = row["request"]["messages"][0]["content"]
        messages = json.loads(a["gen_ai.input.messages"])
        assert messages[0]["role"] == "user" and messages[0]["parts"][0] == {"type": "text", "content": prompt}
        output = json.loads(a["gen_ai.output.messages"])
        assert output[0]["role"] == "assistant" and output[0]["finish_reason"] == row["response"]["stop_reason"]
        # the call nests under the answer step, which nests under the example
        step = by_id[chat["parentSpanId"]]
        assert step["name"] == "answer" and _attrs(step)["pipemend.step.kind"] == "generation"
        root = by_id[step["parentSpanId"]]
        assert "parentSpanId" not in root and root["name"].startswith("example ")
        assert _attrs(root)["pipemend.candidate"] == "cand-1" and _attrs(root)["pipemend.candidate.n"] == 1
    steps = [s for s in spans if s["kind"] == 1 and "parentSpanId" in s]
    assert {s["name"] for s in steps} == {"retrieve", "answer", "parse"}
    retrieve = _attrs(next(s for s in steps if s["name"] == "retrieve"))
    assert retrieve["pipemend.step.doc_ids"] and json.loads(retrieve["pipemend.step.inputs"])["query"]
    # messages are opt-in
    plain = _export(run_dir, tmp_path / "p.jsonl")
    assert not any("gen_ai.input.messages" in _attrs(s) for r in plain for s in _spans(r))


def test_the_endpoint_receives_the_same_requests_as_json_and_protobuf(otlp_run, tmp_path):
    run_dir, _, _ = otlp_run
    lines = _export(run_dir, tmp_path / "x.jsonl")
    collector = Collector()
    try:
        env = {"OTEL_EXPORTER_OTLP_HEADERS": "x-team=night%20shift,broken-entry"}
        r = _invoke("export", RUN_ID, "--reports-dir", str(run_dir.parent), "--otlp-endpoint", collector.url, env=env)
        assert r.exit_code == 0, r.output
        assert f"sent {len(lines)} evaluation(s)" in r.output
        assert collector.json_bodies() == lines
        assert all(x["headers"]["Content-Type"] == "application/json" and x["headers"]["x-team"] == "night shift"
                   for x in collector.received)
    finally:
        collector.close()
    trace_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
    collector = Collector()
    try:
        r = _invoke("export", str(run_dir), "--otlp-endpoint", collector.url, "--otlp-encoding", "protobuf")
        assert r.exit_code == 0, r.output
        assert len(collector.received) == len(lines)
        for got, line in zip(collector.received, lines):
            assert got["headers"]["Content-Type"] == "application/x-protobuf"
            msg = trace_pb2.ExportTraceServiceRequest()
            msg.ParseFromString(got["body"])
            spans = [s for rs in msg.resource_spans for ss in rs.scope_spans for s in ss.spans]
            want = _spans(line)
            assert [(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name) for s in spans] == \
                [(w["traceId"], w["spanId"], w.get("parentSpanId", ""), w["name"]) for w in want]
            assert [s.start_time_unix_nano for s in spans] == [int(w["startTimeUnixNano"]) for w in want]
    finally:
        collector.close()


def test_optimize_streams_candidates_and_a_refusing_collector_is_a_warning(otlp_run, tmp_path):
    run_dir, collector, progress = otlp_run
    assert read_json(run_dir / "run.json")["status"] == "done"
    warnings = [e["text"] for e in progress.events("warning")]
    assert collector.refused == 1
    assert any(w.startswith("otlp: baseline_done not sent") and "HTTP 500" in w and collector.url in w and "boom" in w
               for w in warnings), warnings
    # candidate 1 reached the collector while the run went on, before the test split
    first_cand = next(r for r in collector.received
                      if any(_attrs(rs["resource"])["pipemend.candidate"] == "cand-1"
                             for rs in json.loads(r["body"])["resourceSpans"]))
    assert "candidate_done" in first_cand["events"] and "test_done" not in first_cand["events"]
    # in the end every exported trace arrived once: the refused baseline went at run_done
    exported = {s["traceId"] for _, _, r in run_requests(run_dir) for s in _spans(r)}
    got = [s["traceId"] for body in collector.json_bodies() for s in _spans(body) if "parentSpanId" not in s]
    assert sorted(got) == sorted(exported)
    sent = read_json(run_dir / SENT_FILE)
    assert sent["format"] == SENT_FORMAT and set(sent["endpoints"][collector.url]) == exported
    # a resumed run calls the observer again: nothing is sent twice
    before = len(collector.received)
    OtlpObserver(collector.url).run_done(run_dir)
    assert len(collector.received) == before


def _old_run(tmp_path: Path) -> Path:
    """A hand-made run dir whose trace is ``pipemend-1`` (``gen_ai.system``), with nested steps and an error."""
    run_dir = tmp_path / "old"
    ev = run_dir / "evals" / "val"
    (ev / "traces").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"format": "pipemend-run-1", "run_id": "old-run", "kind": "eval"}))
    (ev / "scored.jsonl").write_text(json.dumps({"id": "q1", "split": "val", "output": None, "score": 0.0,
                                                 "error": "ValueError: bad reply"}) + "\n")
    (ev / "summary.json").write_text(json.dumps({"format": "pipemend-eval-1", "split": "val", "n": 1, "score": 0.0}))
    call = {"call_id": "c-1", "gen_ai.system": "openai", "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-x", "gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 3,
            "duration_s": 0.5}
    trace = {"trace_format": "pipemend-1", "example_id": "q1", "start": 100.0, "end": 103.0,
             "error": {"type": "ValueError", "message": "bad reply", "traceback": "Traceback ..."},
             "output": None, "logs": [], "llm_calls": [],
             "steps": [
                 {"id": "s1", "parent": None, "name": "hop", "kind": "other", "inputs": {}, "output": None,
                  "doc_ids": None, "logs": [], "error": None, "start": 100.0, "end": 102.0, "llm_calls": []},
                 {"id": "s2", "parent": "s1", "name": "ask", "kind": "generation", "inputs": {"q": "x" * 50_000},
                  "output": "y", "doc_ids": None, "logs": [{"t": 101.0, "source": "stdout", "message": "hi"}],
                  "error": None, "start": 100.5, "end": 101.5, "llm_calls": [call]},
                 {"id": "s3", "parent": "s9", "name": "parse", "kind": "parse", "inputs": {}, "output": None,
                  "doc_ids": None, "logs": [], "start": 102.0, "end": None, "llm_calls": [],
                  "error": {"type": "ValueError", "message": "bad reply", "traceback": "Traceback ..."}}]}
    (ev / "traces" / "q1.json").write_text(json.dumps(trace))
    return run_dir


def test_an_old_pipemend_1_trace_still_reads(tmp_path):
    assert TRACE_FORMAT == "pipemend-2"
    assert call_provider({"gen_ai.system": "openai"}) == "openai"
    assert call_provider({"gen_ai.provider.name": "anthropic", "gen_ai.system": "x"}) == "anthropic"
    assert call_provider({}) is None
    run_dir = _old_run(tmp_path)
    request = evaluation_request(run_dir / "evals" / "val", run_id="old-run", candidate="baseline")
    spans = {s["name"]: s for s in _spans(request)}
    root, hop, ask, parse, chat = (spans[n] for n in ("example q1", "hop", "ask", "parse", "chat gpt-x"))
    assert _attrs(chat)["gen_ai.provider.name"] == "openai"
    assert _attrs(chat)["gen_ai.usage.input_tokens"] == 11 and _attrs(chat)["gen_ai.usage.output_tokens"] == 3
    assert "gen_ai.response.model" not in _attrs(chat)  # no call log: only what the trace has
    # nesting: hop under the example, ask under hop, the call under ask; an unknown parent falls back to the example
    assert hop["parentSpanId"] == root["spanId"] and ask["parentSpanId"] == hop["spanId"]
    assert chat["parentSpanId"] == ask["spanId"] and parse["parentSpanId"] == root["spanId"]
    assert int(chat["endTimeUnixNano"]) == int(ask["endTimeUnixNano"])
    assert int(chat["startTimeUnixNano"]) == 101_000_000_000
    assert len(_attrs(ask)["pipemend.step.inputs"]) < 10_000  # inputs are cut
    assert [e["name"] for e in ask["events"]] == ["pipemend.log"]
    # errors: status ERROR and an exception event; a step left open ends with its example
    for span in (root, parse):
        assert span["status"]["code"] == 2 and "ValueError" in span["status"]["message"]
        exc = next(e for e in span["events"] if e["name"] == "exception")
        assert _attrs(exc)["exception.type"] == "ValueError"
    assert parse["endTimeUnixNano"] == root["endTimeUnixNano"] == str(103 * 10**9)
    assert "status" not in hop
    # the same run through the whole-run reader (an eval run: its evals/<split> is the baseline)
    [(label, eval_dir, again)] = list(run_requests(run_dir))
    assert label == "baseline" and eval_dir.name == "val" and again == request


def test_a_trace_behind_a_link_is_not_read(tmp_path):
    run_dir = _old_run(tmp_path)
    traces = run_dir / "evals" / "val" / "traces"
    secret = tmp_path / "secret.json"
    (traces / "q1.json").rename(secret)
    (traces / "q1.json").symlink_to(secret)
    request = evaluation_request(run_dir / "evals" / "val", run_id="old-run", candidate="baseline")
    assert [s["name"] for s in _spans(request)] == ["example q1"]  # the example, without the linked trace's steps


def test_post_traces_says_which_url_refused_and_why(tmp_path):
    collector = Collector([500])
    try:
        with pytest.raises(ExportFailed) as e:
            post_traces(collector.url, {"resourceSpans": []})
        assert collector.url in str(e.value) and "HTTP 500" in str(e.value) and "boom" in str(e.value)
        post_traces(collector.url, {"resourceSpans": []}, headers={"x-mlflow-experiment-id": "7"})
        assert collector.received[-1]["headers"]["x-mlflow-experiment-id"] == "7"
    finally:
        collector.close()
    with pytest.raises(ExportFailed, match="127.0.0.1:9"):
        post_traces("http://127.0.0.1:9/v1/traces", {"resourceSpans": []}, timeout_s=2)
    with pytest.raises(UsageError, match="http"):
        post_traces("file:///etc/passwd", {"resourceSpans": []})
    assert otlp_headers_from_env({"OTEL_EXPORTER_OTLP_HEADERS": "a=1, b = x%3Dy ,junk,=v",
                                  "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a=2"}) == {"a": "2", "b": "x=y"}
    assert otlp_encoding_from_env({}) == "json"
    assert otlp_encoding_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
                                   "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}) == "protobuf"
    with pytest.raises(UsageError, match="grpc"):
        otlp_encoding_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    r = _invoke("export", str(tmp_path))
    assert r.exit_code == 2 and "--otlp" in r.output
    r = _invoke("export", "no-such-run", "--otlp", str(tmp_path / "x.jsonl"), "--reports-dir", str(tmp_path))
    assert r.exit_code == 2 and "not a pipemend run directory" in r.output and not (tmp_path / "x.jsonl").exists()


def test_messages_stay_valid_json_within_their_cap():
    request = {"system": "be brief", "messages": [{"role": "user", "content": f"question {i} " + "x" * 20_000}
                                                  for i in range(40)]
               + [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "look", "input": {"q": 1}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "found"}]}]}
    messages, system = input_messages(request)
    assert len(messages) <= MAX_MESSAGES_CHARS
    parsed = json.loads(messages)
    assert 1 < len(parsed) < 42 and parsed[-1] == {"role": "user", "parts": [
        {"type": "tool_call_response", "id": "t1", "response": "found"}]}
    assert parsed[-2]["parts"] == [{"type": "tool_call", "id": "t1", "name": "look", "arguments": {"q": 1}}]
    assert all(len(p["content"]) < 17_000 for m in parsed[:-2] for p in m["parts"])  # each text cut
    assert json.loads(system) == [{"type": "text", "content": "be brief"}]
