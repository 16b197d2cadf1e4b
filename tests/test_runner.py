"""``python -m pipemend.runner`` as a real subprocess over the toy targets in fixtures/targets/."""

from __future__ import annotations

import contextvars
import http.server
import json
import os
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from pipemend import trace
from pipemend.dataset import Example
from pipemend.runtime.forwarder import Forwarder
from pipemend.runtime.runner import header_value, install_httpx_hook, uninstall_httpx_hook, write_trace

# one xdist worker runs this module (.ci/run: --dist loadfile; the mark keeps it so under loadgroup), so the mixed run (a hang included) is made once
pytestmark = pytest.mark.xdist_group("runner")
PIPELINES = Path(__file__).parent / "fixtures" / "targets"
REAL_KEY = "sk-ant-REAL-SECRET-must-not-leak"


def run_runner(tmp_path: Path, target: str, rows: list[dict], *extra: str, entrypoint: str = "pipeline:run",
               env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full_env = {**os.environ, "ANTHROPIC_API_KEY": REAL_KEY, "ANTHROPIC_AUTH_TOKEN": REAL_KEY,
                "ANTHROPIC_FOUNDRY_API_KEY": REAL_KEY, "CLAUDE_CODE_OAUTH_TOKEN": REAL_KEY, **(env or {})}
    cmd = [sys.executable, "-m", "pipemend.runtime.runner", "--target", str(PIPELINES / target), "--entrypoint", entrypoint,
           "--inputs", str(inputs), "--out", str(tmp_path / "out"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=tmp_path)


def results(tmp_path: Path) -> dict[str, dict]:
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


def trace_of(tmp_path: Path, ex_id: str) -> dict:
    return json.loads((tmp_path / "out" / "traces" / f"{ex_id}.json").read_text())


# --------------------------------------------------------------------------- failures are data


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One run over examples that succeed, raise, hang and return bad outputs."""
    tmp = tmp_path_factory.mktemp("mixed")
    rows = [
        {"id": "ok1", "inputs": {"mode": "ok", "text": "one"}},
        {"id": "raise", "inputs": {"mode": "raise", "text": "kaboom"}},
        {"id": "hang", "inputs": {"mode": "hang"}},
        {"id": "nonjson", "inputs": {"mode": "nonjson"}},
        {"id": "none", "inputs": {"mode": "none"}},
        {"id": "ok2", "inputs": {"mode": "ok", "text": "two"}},
    ]
    proc = run_runner(tmp, "toy", rows, "--timeout", "2", "--concurrency", "2")
    return tmp, proc


def test_every_example_gets_a_result_and_the_run_exits_0(mixed_run):
    tmp, proc = mixed_run
    assert proc.returncode == 0, proc.stderr
    res = results(tmp)
    assert set(res) == {"ok1", "raise", "hang", "nonjson", "none", "ok2"}
    assert res["ok1"]["output"] == "echo:one" and res["ok2"]["output"] == "echo:two"
    assert res["ok1"]["error"] is None and res["ok1"]["timed_out"] is False
    assert all(set(r) == {"id", "output", "error", "timed_out", "duration_s"} for r in res.values())
    assert "[runner] 6/6 done" in proc.stderr
    assert proc.stdout == ""  # the pipeline's prints are in the traces, not on stdout


def test_an_exception_is_isolated_with_its_traceback(mixed_run):
    tmp, _ = mixed_run
    r = results(tmp)["raise"]
    assert r["output"] is None and r["error"] == "ValueError: boom kaboom" and r["timed_out"] is False
    t = trace_of(tmp, "raise")
    assert t["error"]["type"] == "ValueError" and "pipeline.py" in t["error"]["traceback"]
    assert t["steps"][0]["error"]["message"] == "boom kaboom"
    assert t["steps"][0]["logs"][0]["message"] == "working on raise"


def test_a_hung_example_times_out_and_the_run_finishes(mixed_run):
    tmp, _ = mixed_run
    r = results(tmp)["hang"]
    assert r["timed_out"] is True and r["error"] == "timeout after 2s" and r["output"] is None
    t = trace_of(tmp, "hang")
    assert t["error"]["type"] == "Timeout"
    assert "threading.Event().wait()" in t["error"]["traceback"]  # where it hung
    assert t["steps"][0]["name"] == "work" and t["steps"][0]["end"] is None


def test_outputs_that_are_not_json_are_errors(mixed_run):
    tmp, _ = mixed_run
    res = results(tmp)
    assert res["nonjson"]["output"] is None and "got set" in res["nonjson"]["error"]
    assert res["none"]["output"] is None and "got NoneType" in res["none"]["error"]
    assert trace_of(tmp, "nonjson")["error"]["type"] == "InvalidOutput"


# --------------------------------------------------------------------------- concurrency


def test_examples_overlap_up_to_the_concurrency(tmp_path):
    d = tmp_path / "barrier"
    d.mkdir()
    rows = [{"id": f"b{i}", "inputs": {"mode": "barrier", "dir": str(d), "me": str(i), "n": 3}} for i in range(3)]
    proc = run_runner(tmp_path, "toy", rows, "--concurrency", "3", "--timeout", "30")
    assert proc.returncode == 0, proc.stderr
    assert {r["output"] for r in results(tmp_path).values()} == {"met"}  # all three were running at once


def test_concurrency_is_bounded(tmp_path):
    d = tmp_path / "active"
    d.mkdir()
    rows = [{"id": f"a{i}", "inputs": {"mode": "active", "dir": str(d), "me": str(i)}} for i in range(6)]
    proc = run_runner(tmp_path, "toy", rows, "--concurrency", "2", "--timeout", "30")
    assert proc.returncode == 0, proc.stderr
    seen = [int(r["output"]) for r in results(tmp_path).values()]
    assert len(seen) == 6 and max(seen) <= 2


# --------------------------------------------------------------------------- outputs: whole lines, whole traces


def test_a_second_run_replaces_results_and_traces_whole(tmp_path):
    first = [{"id": f"r{i}", "inputs": {"mode": "ok", "text": f"first {i}"}} for i in range(5)]
    assert run_runner(tmp_path, "toy", first, "--concurrency", "3").returncode == 0
    second = [{"id": f"r{i}", "inputs": {"mode": "ok", "text": f"second {i}"}} for i in range(3)]
    proc = run_runner(tmp_path, "toy", second, "--concurrency", "3")
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "out" / "results.jsonl").read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 4  # this run's rows only, each a whole line
    rows = [json.loads(line) for line in lines[:-1]]
    assert sorted(r["id"] for r in rows) == ["r0", "r1", "r2"]
    assert all("second" in json.dumps(r["output"]) for r in rows)
    assert "second" in json.dumps(trace_of(tmp_path, "r1")["output"])
    assert not [p.name for p in (tmp_path / "out" / "traces").iterdir() if not p.name.endswith(".json")]


def test_a_trace_that_cannot_be_moved_into_place_leaves_no_temporary_file(tmp_path):
    write_trace(tmp_path / "a.json", {"v": 1})
    write_trace(tmp_path / "a.json", {"v": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 2}
    (tmp_path / "b.json").mkdir()  # os.replace onto a folder fails
    with pytest.raises(OSError):
        write_trace(tmp_path / "b.json", {"v": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


# --------------------------------------------------------------------------- the label seal


def test_a_row_with_labels_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "imported"
    rows = [{"id": "x1", "inputs": {"mode": "ok"}}, {"id": "x2", "inputs": {"mode": "ok"}, "expected": "secret"}]
    proc = run_runner(tmp_path, "toy", rows, env={"PIPEMEND_FIXTURE_MARKER": str(marker)})
    assert proc.returncode == 2
    assert "line 2" in proc.stderr and "'expected'" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.parametrize("line, problem", [
    ('{"id": "a/b", "inputs": {}}', "file name"),
    ('{"id": "a", "inputs": []}', '"inputs" must be a JSON object'),
    ('not json', "not valid JSON"),
])
def test_malformed_inputs_exit_2(tmp_path, line, problem):
    (tmp_path / "in.jsonl").write_text(line + "\n")
    proc = subprocess.run([sys.executable, "-m", "pipemend.runner", "--target", str(PIPELINES / "toy"),
                           "--entrypoint", "pipeline:run", "--inputs", str(tmp_path / "in.jsonl"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and problem in proc.stderr


def test_the_runner_process_never_sees_labels_or_the_real_key(tmp_path):
    examples = [
        Example(id="v1", inputs={"mode": "dump", "question": "Who?"}, expected="zanzibar-quokka-42",
                evidence=["gold-doc-7f3a"], split="val"),
        Example(id="v2", inputs={"mode": "ok", "question": "What?"}, expected="ophelia-narwhal-99", split="val"),
    ]
    dump = tmp_path / "dump.json"
    examples[0].inputs["dump"] = str(dump)
    proc = run_runner(tmp_path, "toy", [e.sealed() for e in examples], "--model", "simulated/echo",
                      "--gateway-url", "http://127.0.0.1:9")
    assert proc.returncode == 0, proc.stderr
    seen_text = dump.read_text()
    seen = json.loads(seen_text)
    assert seen["inputs"]["question"] == "Who?" and "--inputs" in seen["orig_argv"] and seen["inputs_file"]
    for label in ("zanzibar-quokka-42", "gold-doc-7f3a", "ophelia-narwhal-99", REAL_KEY):
        assert label not in seen_text
    assert seen["environ"]["ANTHROPIC_API_KEY"] == "pipemend-gateway"
    assert not {"ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_FOUNDRY_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"} & set(seen["environ"])
    assert seen["environ"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9"
    assert seen["environ"]["PIPEMEND_MODEL"] == "simulated/echo"


# --------------------------------------------------------------------------- the entrypoint


@pytest.mark.parametrize("target, entrypoint, expected", [
    ("toy", "no_such_module:run", ["no_such_module", "ModuleNotFoundError"]),
    ("broken", "pipeline:run", ["'pipeline'", "pipemend_fixture_missing_dependency"]),
    ("toy", "pipeline:nope", ["has no attribute 'nope'"]),
    ("toy", "pipeline", ["expected module:function"]),
])
def test_an_unimportable_entrypoint_exits_2_with_a_message(tmp_path, target, entrypoint, expected):
    proc = run_runner(tmp_path, target, [{"id": "a", "inputs": {}}], entrypoint=entrypoint)
    assert proc.returncode == 2
    for text in expected:
        assert text in proc.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()


# --------------------------------------------------------------------------- traces of a real pipeline


def test_steps_logs_prints_decorator_and_tracing_faults(tmp_path):
    proc = run_runner(tmp_path, "steps", [{"id": "q1", "inputs": {"question": "Where is Paris?"}}])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert results(tmp_path)["q1"]["output"] == "Where is Paris? -> Paris is in France."
    t = trace_of(tmp_path, "q1")
    steps = {s["name"]: s for s in t["steps"]}
    assert [s["name"] for s in t["steps"]] == ["hop", "retrieve", "parse", "weird", "generate", "evil", "evil_tool", "fails"]
    hop, ret, parse, gen = steps["hop"], steps["retrieve"], steps["parse"], steps["generate"]
    assert ret["parent"] == parse["parent"] == gen["parent"] == hop["id"] and hop["parent"] is None
    assert ret["kind"] == "retrieval" and ret["inputs"] == {"query": "Where is Paris?", "k": 2} and ret["doc_ids"] == ["d1", "d2"]
    assert gen["kind"] == "generation" and gen["doc_ids"] == ["d1", "d2"] and gen["output"] == hop["output"]
    assert [(l["source"], l.get("level"), l["message"]) for l in ret["logs"]] == [("logging", "INFO", "retrieving 2 for Where is Paris?")]
    assert [(l["source"], l["message"]) for l in gen["logs"]] == [("stdout", "generating for Where is Paris?"), ("stderr", "warning on stderr")]
    assert [l["message"] for l in parse["logs"]] == ["parsed Where is Paris?"]
    assert hop["logs"][0] == {**hop["logs"][0], "source": "step", "message": "hop for Where is Paris?"}
    assert any("unknown step kind 'nonsense'" in l["message"] for l in hop["logs"])
    assert steps["weird"]["kind"] == "other"
    assert parse["inputs"] == {"raw": "<unrepresentable Unprintable: RuntimeError>"}
    assert steps["fails"]["error"]["type"] == "ZeroDivisionError" and t["error"] is None
    assert [l["message"] for l in t["logs"] if l["source"] == "stdout"] == ["outside any step"]
    # the Evil values broke the tracer's copying, not the pipeline: markers stored, warnings logged
    evil, evil_tool = steps["evil"], steps["evil_tool"]
    assert evil["inputs"]["arg"] == evil["output"] == evil_tool["output"] == "<pipemend: could not record Evil: RuntimeError>"
    assert evil_tool["end"] is not None and evil_tool["error"] is None
    warnings = [l for l in t["logs"] + evil["logs"] + evil_tool["logs"] if l.get("logger") == "pipemend.trace"]
    assert len(warnings) == 4 and all("could not record" in l["message"] for l in warnings)


# --------------------------------------------------------------------------- the gateway boundary


class FakeGatewayHandler(http.server.BaseHTTPRequestHandler):
    """Stands in for the gateway (built elsewhere): answers Messages requests with x-pipemend-* headers."""

    server: FakeGatewayServer

    def log_message(self, *args):
        pass

    def address_string(self):
        return "fake-gateway"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            n = len(self.server.requests) + 1
            self.server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                         "body": body})
        text = f"reply{n}"
        self.send_response(200)
        self.send_header("x-pipemend-call-id", f"c-{n}")
        self.send_header("x-pipemend-cache", "hit" if n % 2 == 0 else "miss")
        self.send_header("x-pipemend-input-tokens", str(10 * n))
        self.send_header("x-pipemend-output-tokens", str(n))
        if body.get("stream"):
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            msg = {"id": f"msg_{n}", "type": "message", "role": "assistant", "model": body["model"], "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10 * n, "output_tokens": 0}}
            events = [("message_start", {"type": "message_start", "message": msg}),
                      ("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}})]
            events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": part}}) for part in (text[:3], text[3:])]
            events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                       ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                          "usage": {"output_tokens": n}}),
                       ("message_stop", {"type": "message_stop"})]
            for name, data in events:
                self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()
            return
        payload = json.dumps({"id": f"msg_{n}", "type": "message", "role": "assistant", "model": body["model"],
                              "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                              "stop_sequence": None, "usage": {"input_tokens": 10 * n, "output_tokens": n}}).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class FakeGatewayServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeGatewayHandler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()


class FakeGatewayUnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str):
        super().__init__(path, FakeGatewayHandler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()


def _serve(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _check_llm_run(tmp_path: Path, server, proc) -> None:
    assert proc.returncode == 0, proc.stderr
    res = results(tmp_path)
    assert res["x1"]["error"] is None and res["x2"]["error"] is None
    assert len(server.requests) == 4
    by_example: dict[str, list[dict]] = {}
    for r in server.requests:
        h = r["headers"]
        assert r["path"] == "/v1/messages"
        # anthropic 2.x sends the key as a Bearer token, older versions as x-api-key
        assert "pipemend-gateway" in (h.get("x-api-key"), h.get("authorization", "").removeprefix("Bearer "))
        assert REAL_KEY not in json.dumps(h)
        assert r["body"]["model"] == "local/test-model"
        by_example.setdefault(h["x-pipemend-example"], []).append(r)
    assert set(by_example) == {"x1", "x2"}
    for ex_id, reqs in by_example.items():
        steps = {r["body"]["messages"][0]["content"].split(":")[0]: r["headers"]["x-pipemend-step"] for r in reqs}
        assert steps == {"plan": "plan", "answer": "answer"}
        t = trace_of(tmp_path, ex_id)
        plan, answer = t["steps"]
        assert answer["parent"] == plan["id"]
        [pc], [ac] = plan["llm_calls"], answer["llm_calls"]
        for call in (pc, ac):
            n = int(call["call_id"].split("-")[1])
            assert call["gen_ai.request.model"] == "local/test-model"
            assert call["gen_ai.usage.input_tokens"] == 10 * n and call["gen_ai.usage.output_tokens"] == n
            assert call["pipemend.cache_hit"] is (n % 2 == 0) and call["duration_s"] >= 0
        # the streamed reply reached the pipeline whole: the hook did not eat the body
        assert res[ex_id]["output"]["answer"] == f"reply{int(ac['call_id'].split('-')[1])}"
        assert res[ex_id]["output"]["plan"] == f"reply{int(pc['call_id'].split('-')[1])}"


LLM_ROWS = [{"id": "x1", "inputs": {"question": "q1"}}, {"id": "x2", "inputs": {"question": "q2"}}]


def test_llm_calls_carry_headers_and_attach_to_their_steps(tmp_path):
    server = _serve(FakeGatewayServer())
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = run_runner(tmp_path, "llm", LLM_ROWS, "--gateway-url", url, "--model", "local/test-model")
        _check_llm_run(tmp_path, server, proc)
    finally:
        server.shutdown()
        server.server_close()


def test_gateway_socket_is_reached_through_the_forwarder(tmp_path):
    sock = tmp_path / "gw.sock"
    server = _serve(FakeGatewayUnixServer(str(sock)))
    try:
        proc = run_runner(tmp_path, "llm", LLM_ROWS, "--gateway-socket", str(sock), "--model", "local/test-model")
        _check_llm_run(tmp_path, server, proc)
        assert "forwarding http://127.0.0.1:" in proc.stderr
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("value, sent, via", [("3", "3", "url"), ("banana", "0", "socket"), (None, "0", "url"),
                                               ("12345", "0", "url")])
def test_every_model_request_carries_the_sample_index(tmp_path, value, sent, via):
    """``$PIPEMEND_SAMPLE`` reaches the gateway as ``x-pipemend-sample`` on every request, beside the eval token,
    through a URL and through the forwarder; anything but a small non-negative integer is sent as 0."""
    env = {"PIPEMEND_EVAL": "eval-77", **({"PIPEMEND_SAMPLE": value} if value is not None else {})}
    if via == "socket":
        sock = tmp_path / "gw.sock"
        server = _serve(FakeGatewayUnixServer(str(sock)))
        where = ["--gateway-socket", str(sock)]
    else:
        server = _serve(FakeGatewayServer())
        where = ["--gateway-url", f"http://127.0.0.1:{server.server_address[1]}"]
    try:
        proc = run_runner(tmp_path, "llm", LLM_ROWS, *where, "--model", "local/test-model", env=env)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    assert len(server.requests) == 4  # plain and streamed calls of both examples
    assert {(r["headers"]["x-pipemend-sample"], r["headers"]["x-pipemend-eval"]) for r in server.requests} == {
        (sent, "eval-77")}


@pytest.mark.parametrize("value, seen", [("7", "7"), ("-1", "0")])
def test_the_pipeline_sees_the_sample_index_the_gateway_gets(tmp_path, value, seen):
    dump = tmp_path / "dump.json"
    proc = run_runner(tmp_path, "toy", [{"id": "d", "inputs": {"mode": "dump", "dump": str(dump)}}],
                      "--gateway-url", "http://127.0.0.1:9", env={"PIPEMEND_SAMPLE": value})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(dump.read_text())["environ"]["PIPEMEND_SAMPLE"] == seen


def test_forwarder_answers_502_when_the_socket_is_gone(tmp_path):
    with Forwarder(tmp_path / "missing.sock") as fwd:
        r = httpx.get(fwd.url + "/x", timeout=10)
    assert r.status_code == 502 and "unreachable" in r.text


def test_hook_never_reads_a_streaming_body_ahead_of_the_caller():
    """The server sends one chunk, then waits until the client has seen it: a hook that buffered
    the body would block here until the server gave up."""
    first_seen = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("x-pipemend-call-id", "c-stream")
            self.end_headers()
            self.wfile.write(b"first\n")
            self.wfile.flush()
            self.server.waited = first_seen.wait(10)  # type: ignore[attr-defined]
            self.wfile.write(b"second\n")

    server = _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    install_httpx_hook()
    try:
        def pipeline():
            ex = trace.start_example("stream")
            with trace.step("s", kind="generation"):
                with httpx.Client() as client:
                    with client.stream("GET", f"http://127.0.0.1:{server.server_address[1]}/") as r:
                        assert r.request.headers["x-pipemend-example"] == "stream"
                        assert r.request.headers["x-pipemend-step"] == "s"
                        chunks = r.iter_bytes()
                        got = next(chunks)
                        first_seen.set()
                        got += b"".join(chunks)
            return got, ex.finish(output="ok")

        got, t = contextvars.copy_context().run(pipeline)
    finally:
        uninstall_httpx_hook()
        trace.uninstall_capture()
        server.shutdown()
        server.server_close()
    assert got == b"first\nsecond\n" and server.waited is True  # type: ignore[attr-defined]
    assert t["steps"][0]["llm_calls"][0]["call_id"] == "c-stream"


def test_async_anthropic_client_is_tagged_and_recorded():
    import anthropic

    server = _serve(FakeGatewayServer())
    install_httpx_hook()
    try:
        async def pipeline():
            ex = trace.start_example("async-ex")
            client = anthropic.AsyncAnthropic(api_key="pipemend-gateway", max_retries=0,
                                              base_url=f"http://127.0.0.1:{server.server_address[1]}")
            with trace.step("ask", kind="generation"):
                msg = await client.messages.create(model="local/m", max_tokens=5,
                                                   messages=[{"role": "user", "content": "ask: hi"}])
            await client.close()
            return msg.content[0].text, ex.finish(output="ok")

        import asyncio

        text, t = contextvars.copy_context().run(asyncio.run, pipeline())
    finally:
        uninstall_httpx_hook()
        trace.uninstall_capture()
        server.shutdown()
        server.server_close()
    assert text == "reply1"
    [req] = server.requests
    assert req["headers"]["x-pipemend-example"] == "async-ex" and req["headers"]["x-pipemend-step"] == "ask"
    [call] = t["steps"][0]["llm_calls"]
    assert call["call_id"] == "c-1" and call["gen_ai.request.model"] == "local/m" and call["pipemend.cache_hit"] is False


def test_non_ascii_step_names_are_percent_encoded_in_headers():
    assert header_value("retrieve") == "retrieve"
    assert header_value("récupérer docs") == "r%C3%A9cup%C3%A9rer docs"
