"""The gateway's OpenAI Chat Completions API through the real ``openai`` SDK and raw HTTP: plain,
streaming (with and without usage), tool calls both ways, ``/v1/models``, the allow-list, malformed
bodies in OpenAI's error shape, the shared cache, budget and call log (rows say which API)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from pipemend.fsutil import read_jsonl
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.gateway.openai_api import DEFAULT_MAX_TOKENS, to_messages_request

pytestmark = pytest.mark.timeout(60)

TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Look a city up.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCRIPT = [
    {"name": "capital", "match": {"system_contains": "geography", "last_user_contains": "capital of France"},
     "text": "Paris is the capital of France."},
    {"name": "long", "match": {"last_user_contains": "long answer"}, "text": "word " * 120},
    {"name": "call tool", "match": {"last_user_contains": "weather in Oslo"},
     "response": {"content": [{"type": "text", "text": "Let me look."},
                              {"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {"city": "Oslo"}}],
                  "stop_reason": "tool_use"}},
    {"name": "after tool", "match": {"last_user_contains": "rainy, 7 C"}, "text": "It is rainy in Oslo."},
    {"name": "once", "match": {"last_user_contains": "only once"}, "once": True, "text": "answered once"},
    {"name": "down", "match": {"last_user_contains": "upstream down"}, "error": {"status": 503, "message": "down"}},
]


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps({"entries": SCRIPT}))
    return f"scripted:{path}"


@pytest.fixture
def gw(tmp_path: Path, script: str):
    config = GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=[script, "simulated/echo"])
    with Gateway(config) as gateway:
        yield gateway


def client(gateway: Gateway, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="pipemend-gateway", **kw)


def calls(gateway: Gateway) -> list[dict]:
    gateway.flush()
    return list(read_jsonl(gateway.calls_path))


def ask(text: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- plain and streaming


def test_plain_completion_headers_and_a_call_log_row_in_messages_form(gw, script):
    raw = client(gw).chat.completions.with_raw_response.create(
        model=script, messages=ask("What is the capital of France?", "You answer geography questions."),
        max_tokens=50, temperature=0,
        extra_headers={"x-pipemend-example": "q-7", "x-pipemend-step": "answer", "x-pipemend-eval": "ev-1",
                       "x-pipemend-sample": "3"})
    done = raw.parse()
    assert done.object == "chat.completion" and done.model == script and done.id.startswith("chatcmpl-")
    [choice] = done.choices
    assert choice.message.role == "assistant" and choice.message.content == "Paris is the capital of France."
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert raw.headers["x-pipemend-cache"] == "miss"
    assert raw.headers["x-pipemend-output-tokens"] == str(done.usage.completion_tokens)
    [row] = calls(gw)
    assert row["call_id"] == raw.headers["x-pipemend-call-id"] and row["api"] == "openai-chat"
    assert (row["example_id"], row["step"], row["eval"], row["sample"]) == ("q-7", "answer", "ev-1", 3)
    assert (row["model"], row["backend"], row["cache"], row["error"]) == (script, "scripted", "miss", None)
    # the log keeps the Messages form both APIs share: system pulled out, max_tokens as given
    assert row["request"] == {"model": script, "max_tokens": 50, "temperature": 0,
                              "system": "You answer geography questions.",
                              "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    assert row["response"]["content"] == [{"type": "text", "text": "Paris is the capital of France."}]


def test_streaming_chunks_end_with_done_and_carry_usage_only_when_asked(gw, script):
    oai = client(gw)
    chunks = list(oai.chat.completions.create(model=script, messages=ask("a long answer please"), stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "word " * 120
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3  # several text deltas
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1

    plain = list(oai.chat.completions.create(model=script, messages=ask("a long answer please"), stream=True))
    assert all(c.usage is None and c.choices for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == text

    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=20, json={
            "model": script, "messages": ask("a long answer please"), "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]" and body.endswith("\n\n")
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"
    assert [r["api"] for r in calls(gw)] == ["openai-chat"] * 3


# --------------------------------------------------------------------------- tool calls


def test_tool_calls_out_and_tool_results_back(gw, script):
    oai = client(gw)
    first = oai.chat.completions.create(model=script, messages=ask("What is the weather in Oslo?"),
                                        tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    [choice] = first.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    [call] = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("toolu_01", "function", "lookup")
    assert isinstance(call.function.arguments, str) and json.loads(call.function.arguments) == {"city": "Oslo"}

    history = ask("What is the weather in Oslo?") + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "rainy, 7 C"},
    ]
    second = oai.chat.completions.create(model=script, messages=history, tools=TOOLS)
    assert second.choices[0].message.content == "It is rainy in Oslo." and second.choices[0].finish_reason == "stop"

    one, two = calls(gw)
    assert one["request"]["tools"] == [{"name": "lookup", "description": "Look a city up.",
                                        "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert one["request"]["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert two["request"]["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "toolu_01", "name": "lookup",
                                           "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "rainy, 7 C"}]},
    ]


def test_streamed_tool_calls_arrive_as_deltas_the_sdk_assembles(gw, script):
    stream = client(gw).chat.completions.create(model=script, messages=ask("weather in Oslo"), tools=TOOLS,
                                                tool_choice={"type": "function", "function": {"name": "lookup"}},
                                                stream=True)
    chunks = list(stream)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id == "toolu_01" and deltas[0].function.name == "lookup" and deltas[0].function.arguments == ""
    assert all(d.index == 0 for d in deltas)
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert calls(gw)[0]["request"]["tool_choice"] == {"type": "tool", "name": "lookup"}


# --------------------------------------------------------------------------- models and the allow-list


def test_models_lists_exactly_the_allow_list_and_retrieves_one(gw, script):
    oai = client(gw)
    assert [m.id for m in oai.models.list()] == [script, "simulated/echo"]
    assert oai.models.retrieve("simulated/echo").id == "simulated/echo"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"


def test_a_model_not_on_the_allow_list_is_refused_in_openai_shape(gw, tmp_path: Path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("- text: never served\n")
    for model in ("gpt-4o-mini", f"scripted:{secret}", "os:abort"):
        with pytest.raises(openai.NotFoundError) as e:
            client(gw, max_retries=0).chat.completions.create(model=model, messages=ask("hi"))
        err = e.value.body
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "model_not_found"
        assert "not served by this gateway" in err["message"] and "simulated/echo" in err["message"]
    rows = calls(gw)
    assert len(rows) == 3 and all(r["error"]["status"] == 404 and r["backend"] is None for r in rows)
    assert set(gw.registry.loaded()) == {r for r in gw.config.models}  # nothing else was built


# --------------------------------------------------------------------------- bad bodies


@pytest.mark.parametrize("body, param, words", [
    (b"not json", None, "not valid JSON"),
    (b"[1, 2]", "body", "JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model", "field required"),
    (json.dumps({"model": "simulated/echo", "messages": []}).encode(), "messages", "non-empty"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "system", "content": "only"}]}).encode(),
     "messages", "at least one user message"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "robot", "content": "x"}]}).encode(),
     "messages.0.role", "got 'robot'"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "r" * 100_000, "content": "x"}]}).encode(),
     "messages.0.role", "got 'rrrr"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "user", "content": "x"}],
                 "functions": [{"name": "f"}]}).encode(), "functions", "use tools"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}).encode(),
     "messages.0.content.0.type", "content part"),
    (json.dumps({"model": "simulated/echo", "messages": [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": "{not json"}}]},
        {"role": "user", "content": "x"}]}).encode(), "messages.0.tool_calls.0.function.arguments", "JSON object"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "tool", "content": "x"}]}).encode(),
     "messages.0.tool_call_id", "expected the id"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(),
     "n", "one choice"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "user", "content": "x"}], "temperature": 3}).encode(),
     "temperature", "between 0 and 2"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(),
     "max_tokens", "integer >= 1"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "user", "content": "x"}],
                 "tools": [{"type": "retrieval"}]}).encode(), "tools.0", "function"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "user", "content": "x"}],
                 "tool_choice": "sometimes"}).encode(), "tool_choice", "'auto'"),
    (json.dumps({"model": "simulated/echo", "messages": [{"role": "user", "content": "x"}],
                 "stream": "yes"}).encode(), "stream", "true or false"),
    (b'{"model": "simulated/echo", "messages": ' + b"[" * 200 + b"]" * 200 + b"}", None, "nested more than"),
])
def test_bad_bodies_get_openai_shaped_400s_naming_the_parameter(gw, body, param, words):
    r = httpx.post(gw.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=20)
    assert r.status_code == 400 and r.headers["x-should-retry"] == "false"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"]
    assert len(err["message"]) < 300  # a refused value is echoed clipped
    [row] = calls(gw)
    assert row["api"] == "openai-chat" and row["error"]["status"] == 400 and row["response"] is None


def test_the_sdk_raises_its_bad_request_error_and_a_broken_body_stream_is_refused_in_openai_shape(gw):
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).chat.completions.create(model="simulated/echo", messages=ask("x"), temperature=2.5)
    assert e.value.body["param"] == "temperature"

    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["message"].startswith("unsupported transfer")


# --------------------------------------------------------------------------- cache, budget, backend errors


def test_a_repeat_is_a_cache_hit_and_the_messages_api_shares_the_entry(gw, script):
    oai = client(gw)
    messages = ask("answer only once")
    first = oai.chat.completions.with_raw_response.create(model=script, messages=messages, max_tokens=64)
    again = oai.chat.completions.with_raw_response.create(model=script, messages=messages, max_tokens=64)
    assert (first.headers["x-pipemend-cache"], again.headers["x-pipemend-cache"]) == ("miss", "hit")
    assert again.parse().choices[0].message.content == "answered once"  # the `once` entry cannot answer twice
    native = anthropic.Anthropic(base_url=gw.url, api_key="x").messages.with_raw_response.create(
        model=script, max_tokens=64, messages=messages)
    assert native.headers["x-pipemend-cache"] == "hit" and native.parse().content[0].text == "answered once"
    rows = calls(gw)
    assert [(r["api"], r["cache"]) for r in rows] == [("openai-chat", "miss"), ("openai-chat", "hit"),
                                                      ("anthropic-messages", "hit")]
    assert rows[1]["origin_latency_s"] is not None and rows[1]["cost_usd"] == 0


def test_budget_exhaustion_and_backend_errors_are_openai_errors_without_sdk_retries(tmp_path: Path, script):
    config = GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=[script], budget_tokens=1)
    with Gateway(config) as gw:
        oai = client(gw)  # the SDK's default retries: x-should-retry false must stop them
        with pytest.raises(openai.InternalServerError) as e:
            oai.chat.completions.create(model=script, messages=ask("upstream down"))
        assert e.value.status_code == 503 and e.value.body["type"] == "server_error"
        oai.chat.completions.create(model=script, messages=ask("capital of France", "geography"))
        with pytest.raises(openai.RateLimitError) as e:
            oai.chat.completions.create(model=script, messages=ask("a long answer"))
        assert e.value.body["code"] == "rate_limit_exceeded" and "budget" in e.value.body["message"]
        rows = calls(gw)
    assert [r["error"] and r["error"]["status"] for r in rows] == [503, None, 429]


# --------------------------------------------------------------------------- the translation itself


def test_a_chat_request_becomes_the_messages_request_the_backends_take():
    request, stream, usage = to_messages_request({
        "model": "m", "temperature": 1.7, "top_p": 0.5, "stop": "END", "seed": 3, "response_format": {"type": "text"},
        "messages": [
            {"role": "developer", "content": "rule one"},
            {"role": "system", "content": [{"type": "text", "text": "rule two"}]},
            {"role": "user", "content": [{"type": "text", "text": "see"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": ""}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "a", "content": "ra"},
            {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "rb"}]},
            {"role": "user", "content": "go on"},
            {"role": "system", "content": "late note"},
        ]})
    assert (stream, usage) == (False, False)
    assert request == {
        "model": "m", "max_tokens": DEFAULT_MAX_TOKENS, "system": "rule one\n\nrule two",
        "temperature": 1.0, "top_p": 0.5, "stop_sequences": ["END"],  # OpenAI's 0..2 capped at the Messages API's 1
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "iVBO"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}},
                                              {"type": "tool_use", "id": "b", "name": "g", "input": {"x": 1}}]},
            {"role": "user", "content": [  # tool results and the user's next words in one turn
                {"type": "tool_result", "tool_use_id": "a", "content": "ra"},
                {"type": "tool_result", "tool_use_id": "b", "content": [{"type": "text", "text": "rb"}]},
                {"type": "text", "text": "go on"}]},
            {"role": "system", "content": "late note"},
        ]}
    request, stream, usage = to_messages_request({"model": "m", "max_tokens": 9, "max_completion_tokens": 20,
                                                  "stream": True, "stream_options": {"include_usage": True},
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert request["max_tokens"] == 20 and (stream, usage) == (True, True)
