"""The gateway through the real ``anthropic`` SDK and raw HTTP: plain, streaming, tool use, cache,
budget, malformed requests, concurrency, unix socket, Claude-Code-shaped requests."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import anthropic
import httpx
import pytest

from pipemend.fsutil import read_jsonl
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.gateway.backends.scripted import ScriptIncomplete

pytestmark = pytest.mark.timeout(60)

HELLO = [{"role": "user", "content": "hello gateway"}]
# Test backends are served only when the host lists them (a request never chooses code on the host).
SIMULATED = ["simulated/echo", "simulated/slow-echo", "simulated/fail", "simulated/tool-echo"]


@pytest.fixture
def gw(tmp_path: Path):
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=SIMULATED)) as gateway:
        yield gateway


@pytest.fixture
def serve(tmp_path: Path):
    """Start a gateway serving exactly the given models (stopped at the end of the test)."""
    started: list[Gateway] = []

    def start(*models: str, run: str = "run") -> Gateway:
        gateway = Gateway(GatewayConfig(run_dir=tmp_path / run, cache_dir=tmp_path / "cache", models=list(models)))
        started.append(gateway.start())
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def client(gateway: Gateway, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="x", **kw)


def calls(gateway: Gateway) -> list[dict]:
    gateway.flush()
    return list(read_jsonl(gateway.calls_path))


def write_script(path: Path, entries: list[dict]) -> str:
    path.write_text(json.dumps({"entries": entries}))
    return f"scripted:{path}"


def test_plain_call_returns_message_headers_and_log_row(gw):
    raw = client(gw).messages.with_raw_response.create(
        model="simulated/echo", max_tokens=50, messages=HELLO,
        extra_headers={"x-pipemend-example": "q-001", "x-pipemend-step": "s2"},
    )
    msg = raw.parse()
    assert msg.content[0].text == "hello gateway"
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    assert raw.headers["x-pipemend-cache"] == "miss"
    assert raw.headers["x-pipemend-output-tokens"] == str(msg.usage.output_tokens)
    [row] = calls(gw)
    assert row["format"] == "pipemend-call-1"
    assert row["call_id"] == raw.headers["x-pipemend-call-id"]
    assert (row["example_id"], row["step"], row["backend"], row["cache"]) == ("q-001", "s2", "simulated", "miss")
    assert row["request"]["messages"] == HELLO and row["response"]["content"][0]["text"] == "hello gateway"
    assert row["cost_usd"] == 0 and row["error"] is None and row["latency_s"] >= 0


def test_call_without_pipemend_headers_is_still_logged(gw):
    client(gw).messages.create(model="simulated/echo", max_tokens=5, messages=HELLO)
    [row] = calls(gw)
    assert row["example_id"] is None and row["step"] is None


def test_streaming_text_through_sdk(gw):
    long_text = "word " * 100  # several text deltas
    with client(gw).messages.stream(model="simulated/echo", max_tokens=500,
                                    messages=[{"role": "user", "content": long_text}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == long_text
    assert final.content[0].text == long_text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


def test_tool_use_round_trip_with_scripted_session(serve, tmp_path):
    model = write_script(tmp_path / "session.json", [
        {"name": "call-tool", "once": True, "required": True, "match": {"last_user_contains": "weather"},
         "response": {"content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                   "input": {"city": "Paris", "days": [1, 2]}}], "stop_reason": "tool_use"}},
        {"name": "answer", "once": True, "required": True, "match": {"last_user_regex": "sunny, \\d+C"},
         "text": "It is sunny in Paris."},
    ])
    gw = serve(model)
    tools = [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object"}}]
    c = client(gw)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with c.messages.stream(model=model, max_tokens=100, tools=tools, messages=messages) as stream:
        first = stream.get_final_message()  # tool input arrives as input_json_delta
    [tool_use] = first.content
    assert first.stop_reason == "tool_use"
    assert (tool_use.type, tool_use.name, tool_use.input) == ("tool_use", "get_weather", {"city": "Paris", "days": [1, 2]})
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny, 21C"}]},
    ]
    second = c.messages.create(model=model, max_tokens=100, tools=tools, messages=messages)
    assert second.content[0].text == "It is sunny in Paris."
    assert second.usage.input_tokens > 0 and second.usage.output_tokens > 0  # estimated when not scripted
    backend = gw.registry.get(model)
    backend.check_complete()
    # The script is spent: a third turn is unmatched, answered as an error naming the request, and recorded.
    with pytest.raises(anthropic.BadRequestError) as err:
        c.messages.create(model=model, max_tokens=100, messages=[{"role": "user", "content": "weather again?"}])
    assert "no entry matches" in str(err.value) and "weather again?" in str(err.value)
    with pytest.raises(ScriptIncomplete, match="weather again"):
        backend.check_complete()
    assert calls(gw)[-1]["error"]["type"] == "invalid_request_error"


def test_unused_required_entry_fails_the_check(serve, tmp_path):
    model = write_script(tmp_path / "s.yaml", [
        {"name": "used", "text": "ok"}, {"name": "never", "required": True, "match": {"system_contains": "x"}, "text": "y"},
    ])
    gw = serve(model)
    client(gw).messages.create(model=model, max_tokens=5, messages=HELLO)
    with pytest.raises(ScriptIncomplete, match="never"):
        gw.registry.get(model).check_complete()


def test_repeat_is_a_cache_hit_and_cache_survives_the_gateway(tmp_path):
    cfg = GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=SIMULATED)
    with Gateway(cfg) as gw:
        c = client(gw)
        first = c.messages.with_raw_response.create(model="simulated/echo", max_tokens=9, messages=HELLO)
        second = c.messages.with_raw_response.create(model="simulated/echo", max_tokens=9, messages=HELLO)
        other = c.messages.with_raw_response.create(model="simulated/echo", max_tokens=10, messages=HELLO)
        assert [r.headers["x-pipemend-cache"] for r in (first, second, other)] == ["miss", "hit", "miss"]
        assert second.parse().content == first.parse().content
        assert gw.registry.get("simulated/echo").calls == 2
        assert gw.stats()["cache_hits"] == 1
        rows = calls(gw)
        assert [r["cache"] for r in rows] == ["miss", "hit", "miss"] and rows[1]["cost_usd"] == 0
    with Gateway(cfg.model_copy(update={"run_dir": tmp_path / "run2"})) as gw2:
        again = client(gw2).messages.with_raw_response.create(model="simulated/echo", max_tokens=9, messages=HELLO)
        assert again.headers["x-pipemend-cache"] == "hit"
        assert gw2.registry.get("simulated/echo").calls == 0


def test_errors_are_not_cached(gw):
    c = client(gw, max_retries=0)
    for _ in range(2):
        with pytest.raises(anthropic.InternalServerError, match="always fails"):
            c.messages.create(model="simulated/fail", max_tokens=5, messages=HELLO)
    assert gw.registry.get("simulated/fail").calls == 2
    assert [r["cache"] for r in calls(gw)] == ["miss", "miss"]


def test_budget_refuses_new_calls_but_serves_cache_hits(tmp_path):
    cfg = GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", budget_tokens=5, models=SIMULATED)
    with Gateway(cfg) as gw:
        c = client(gw)  # default retries: the refusal must still come back at once, as an error
        c.messages.create(model="simulated/echo", max_tokens=5, messages=[{"role": "user", "content": "x" * 40}])
        with pytest.raises(anthropic.RateLimitError) as err:
            c.messages.create(model="simulated/echo", max_tokens=5, messages=HELLO)
        assert err.value.status_code == 429
        assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "rate_limit_error"
        assert err.value.body["error"]["message"].startswith("budget exhausted: ")
        assert "budget exhausted" in str(err.value) and "token budget" in str(err.value)
        assert len(calls(gw)) == 2  # the SDK did not retry the refusal
        hit = c.messages.with_raw_response.create(model="simulated/echo", max_tokens=5,
                                                  messages=[{"role": "user", "content": "x" * 40}])
        assert hit.headers["x-pipemend-cache"] == "hit"
    # A resumed run does not get its budget back: spending is read from the call log.
    with Gateway(cfg) as gw2:
        with pytest.raises(anthropic.RateLimitError):
            client(gw2).messages.create(model="simulated/echo", max_tokens=5, messages=[{"role": "user", "content": "new"}])


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"model": "simulated/echo", "messages": HELLO}).encode(), "max_tokens"),
    (json.dumps({"model": "simulated/echo", "max_tokens": 5, "messages": []}).encode(), "messages"),
    (json.dumps({"model": "simulated/echo", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}).encode(),
     "messages.0.role"),
    (json.dumps({"model": "simulated/echo", "max_tokens": 5, "messages": HELLO, "temperature": "hot"}).encode(),
     "temperature"),
])
def test_malformed_request_gets_anthropic_style_400(gw, body, needle):
    resp = httpx.post(f"{gw.url}/v1/messages", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    err = resp.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"]
    assert resp.headers["x-pipemend-call-id"]
    assert calls(gw)[-1]["error"]["status"] == 400


def test_unknown_fields_pass_and_unknown_paths_404(gw):
    body = {"model": "simulated/echo", "max_tokens": 5, "messages": HELLO, "frobnicate": {"a": 1}, "service_tier": "auto"}
    assert httpx.post(f"{gw.url}/v1/messages", json=body).status_code == 200
    resp = httpx.post(f"{gw.url}/v2/whatever", json=body)
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"


def test_concurrent_identical_requests_reach_backend_once(gw):
    c = client(gw)
    results, errors = [], []

    def call():
        try:
            r = c.messages.with_raw_response.create(model="simulated/slow-echo", max_tokens=5, messages=HELLO)
            results.append((r.headers["x-pipemend-cache"], r.parse().content[0].text))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert gw.registry.get("simulated/slow-echo").calls == 1
    assert sorted(h for h, _ in results) == ["hit"] * 7 + ["miss"]
    assert {text for _, text in results} == {"hello gateway"}


def test_unix_socket_access(tmp_path):
    sock = tmp_path / "gw.sock"
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", socket_path=sock,
                               models=["simulated/echo"])) as gw:
        assert gw.socket_path == sock and sock.is_socket()
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://gateway") as http:
            for _ in range(2):  # keep-alive: two requests on one connection
                resp = http.post("/v1/messages", json={"model": "simulated/echo", "max_tokens": 5, "messages": HELLO})
                assert resp.status_code == 200 and resp.json()["content"][0]["text"] == "hello gateway"
            assert http.get("/pipemend/stats").json()["calls"] == 2
    assert not sock.exists()


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for chunk in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_claude_code_shaped_request_streams_sse(serve, tmp_path):
    model = write_script(tmp_path / "cc.yaml", [{
        "match": {"system_contains": "You are Claude Code"},
        "response": {"content": [{"type": "text", "text": "Reading the file."},
                                 {"type": "tool_use", "id": "toolu_9", "name": "Read", "input": {"file_path": "/a.py"}}],
                     "stop_reason": "tool_use", "usage": {"input_tokens": 120, "output_tokens": 30}},
    }])
    body = {
        "model": model, "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI.",
                    "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "fix the bug"}]},
                     {"role": "system", "content": [{"type": "text", "text": "# Environment\n - Platform: linux"}]}],
        "tools": [{"name": "Read", "description": "read", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "metadata": {"user_id": "user_abc_session_1"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
        "output_config": {"effort": "high"},
    }
    gw = serve(model)
    headers = {"x-api-key": "sk-ant-whatever", "anthropic-version": "2023-06-01",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14", "user-agent": "claude-cli/2.0"}
    resp = httpx.post(f"{gw.url}/v1/messages?beta=true", json=body, headers=headers)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert [e for e, _ in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == 120
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "Reading the file."}
    assert events[4][1]["content_block"] == {"type": "tool_use", "id": "toolu_9", "name": "Read", "input": {}}
    assert json.loads(events[5][1]["delta"]["partial_json"]) == {"file_path": "/a.py"}
    assert events[7][1]["delta"]["stop_reason"] == "tool_use" and events[7][1]["usage"]["output_tokens"] == 30
    assert resp.headers["x-pipemend-input-tokens"] == "120"
    # metadata does not change the answer, so a new session id still hits the cache
    body["metadata"] = {"user_id": "user_abc_session_2"}
    again = httpx.post(f"{gw.url}/v1/messages?beta=true", json=body, headers=headers)
    assert again.headers["x-pipemend-cache"] == "hit"


def test_a_cache_hit_logs_how_long_its_answer_took_to_compute(tmp_path):
    script = write_script(tmp_path / "slow.yaml", [{"text": "slow answer", "delay_s": 0.3}])
    ask = dict(model=script, max_tokens=5, messages=HELLO)
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=[script])) as gw:
        client(gw).messages.create(**ask)
        client(gw).messages.create(**ask)
        miss, hit = calls(gw)
    assert miss["cache"] == "miss" and miss["origin_latency_s"] is None and miss["latency_s"] >= 0.3
    assert hit["cache"] == "hit" and hit["latency_s"] < 0.3 and 0.3 <= hit["origin_latency_s"] <= miss["latency_s"]
    # the latency is stored with the entry, so a later run's hit (a fresh gateway, the same cache) knows it too
    with Gateway(GatewayConfig(run_dir=tmp_path / "run2", cache_dir=tmp_path / "cache", models=[script])) as gw2:
        client(gw2).messages.create(**ask)
        (later,) = calls(gw2)
    assert later["cache"] == "hit" and later["origin_latency_s"] == hit["origin_latency_s"]


def test_stats_endpoint(gw):
    c = client(gw)
    for _ in range(2):
        c.messages.create(model="simulated/echo", max_tokens=5, messages=HELLO)
    stats = httpx.get(f"{gw.url}/pipemend/stats").json()
    assert {k: stats[k] for k in ("calls", "cache_hits", "cost_usd")} == {"calls": 2, "cache_hits": 1, "cost_usd": 0.0}
    assert stats["input_tokens"] > 0 and stats["output_tokens"] > 0
    assert stats == gw.stats()


def test_count_tokens_estimate(gw):
    resp = client(gw).messages.count_tokens(model="simulated/echo", messages=HELLO)
    assert resp.input_tokens > 0
