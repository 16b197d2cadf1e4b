"""Every input a pipeline sends the gateway is bounded: body size (plain and chunked), chunk lines,
how long a body may take, JSON nesting, header sizes, open connections, and a client that never reads
its streamed answer. A hostile request costs its own connection, never the gateway."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import anthropic
import httpx
import pytest

from pipemend.gateway import Gateway, GatewayConfig, server, validate

pytestmark = pytest.mark.timeout(60)
HELLO = [{"role": "user", "content": "hello gateway"}]
CLIENT_TIMEOUT_S = 20  # far below the gateway's idle timeout: a stall shows up as a client timeout


@pytest.fixture
def gw(tmp_path: Path):
    cfg = GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                        models=["simulated/echo", "simulated/slow-echo"])
    with Gateway(cfg) as gateway:
        yield gateway


def raw_exchange(gw: Gateway, data: bytes, *, then_wait: bool = True) -> bytes:
    """Send ``data`` on a fresh connection and read the reply until the gateway closes or answers."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=CLIENT_TIMEOUT_S) as s:
        s.sendall(data)
        reply = b""
        while then_wait:
            try:
                piece = s.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            reply += piece
            if b"\r\n\r\n" in reply:
                head, _, body = reply.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    break
        return reply


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1."), reply[:200]
    return int(reply.split(b" ", 2)[1])


def post_head(length: str, extra: str = "") -> bytes:
    return (f"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode("latin-1")


def still_serves(gw: Gateway) -> None:
    msg = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0).messages.create(
        model="simulated/echo", max_tokens=5, messages=HELLO)
    assert msg.content[0].text == "hello gateway"


def test_a_body_over_the_limit_is_refused_unread(gw):
    reply = raw_exchange(gw, post_head(str(server.MAX_BODY + 1)))  # and then never sends it
    assert status_of(reply) == 413 and b"request_too_large" in reply
    still_serves(gw)


@pytest.mark.parametrize("length", ["-5", "abc", "1e3", "\u00b2", "99999999999999999999999"])
def test_a_bad_content_length_is_refused_at_once(gw, length):
    reply = raw_exchange(gw, post_head(length) + b'{"model": "x"}')  # -5 once meant: read until the client hangs up
    assert status_of(reply) in (400, 413)
    still_serves(gw)


def test_two_different_content_lengths_are_refused(gw):
    data = post_head("2", "Content-Length: 3\r\n") + b"{}"
    assert status_of(raw_exchange(gw, data)) == 400


def chunked_head() -> bytes:
    return b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_chunked_body_is_bounded_in_total(gw, monkeypatch):
    monkeypatch.setattr(server, "MAX_BODY", 1000)
    chunk = b"x" * 600
    data = chunked_head() + b"%x\r\n" % len(chunk) + chunk + b"\r\n" + b"%x\r\n" % len(chunk) + chunk + b"\r\n0\r\n\r\n"
    assert status_of(raw_exchange(gw, data)) == 413
    still_serves(gw)


@pytest.mark.parametrize("line", [b"f" * 3000, b"-10", b"zz", b"", b"1" * 40])
def test_a_bad_chunk_size_line_is_refused(gw, line):
    reply = raw_exchange(gw, chunked_head() + line + b"\r\nabc\r\n0\r\n\r\n")
    assert status_of(reply) in (400, 413)
    still_serves(gw)


def test_endless_trailers_are_refused(gw):
    body = json.dumps({"model": "simulated/echo", "max_tokens": 5, "messages": HELLO}).encode()
    data = chunked_head() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n" + b"X-Trailer: y\r\n" * 100 + b"\r\n"
    assert status_of(raw_exchange(gw, data)) == 400


def test_a_chunked_body_still_works(gw):
    body = json.dumps({"model": "simulated/echo", "max_tokens": 5, "messages": HELLO}).encode()
    data = chunked_head() + b"%x\r\n" % 10 + body[:10] + b"\r\n" + b"%x\r\n" % (len(body) - 10) + body[10:] + b"\r\n0\r\n\r\n"
    reply = raw_exchange(gw, data)
    assert status_of(reply) == 200 and b"hello gateway" in reply


def test_a_dribbled_body_gets_a_deadline(gw, monkeypatch):
    monkeypatch.setattr(server, "BODY_DEADLINE_S", 1.0)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=CLIENT_TIMEOUT_S) as s:
        s.sendall(post_head("100") + b'{"model"')  # ... and the other 92 bytes never come
        reply = s.recv(65536)
    assert status_of(reply) == 408
    still_serves(gw)


def nested(depth: int) -> bytes:
    return json.dumps({"model": "simulated/echo", "max_tokens": 5, "messages": HELLO,
                       "metadata": json.loads("[" * depth + "]" * depth)}).encode()


@pytest.mark.parametrize("body", [
    b"[" * 200_000 + b"]" * 200_000,   # past the recursion limit of the JSON parser
    nested(validate.MAX_DEPTH + 5),     # parses, but too deep for the rest of the way
])
def test_deeply_nested_json_is_a_400_not_a_crash(gw, body):
    resp = httpx.post(f"{gw.url}/v1/messages", content=body, timeout=CLIENT_TIMEOUT_S)
    assert resp.status_code == 400 and "nested more than" in resp.json()["error"]["message"]
    count = httpx.post(f"{gw.url}/v1/messages/count_tokens", content=body, timeout=CLIENT_TIMEOUT_S)
    assert count.status_code == 400
    still_serves(gw)
    gw.flush()  # the call log's writer is alive


def test_reasonable_nesting_passes(gw):
    resp = httpx.post(f"{gw.url}/v1/messages", content=nested(20), timeout=CLIENT_TIMEOUT_S)
    assert resp.status_code == 200


def test_header_lines_and_header_count_are_bounded(gw):
    long_header = b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 65_600 + b"\r\n\r\n"
    assert status_of(raw_exchange(gw, long_header)) == 431
    many = b"GET /health HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n"
    assert status_of(raw_exchange(gw, many)) == 431
    long_path = b"GET /" + b"p" * 65_600 + b" HTTP/1.1\r\nHost: gw\r\n\r\n"
    assert status_of(raw_exchange(gw, long_path)) == 414
    still_serves(gw)


def test_huge_example_header_is_clipped_in_the_call_log(gw):
    anthropic.Anthropic(base_url=gw.url, api_key="x").messages.create(
        model="simulated/echo", max_tokens=5, messages=HELLO, extra_headers={"x-pipemend-example": "e" * 50_000})
    gw.flush()
    row = json.loads(gw.calls_path.read_text().splitlines()[-1])
    assert 0 < len(row["example_id"]) <= 1024


def test_open_connections_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "MAX_CONNECTIONS", 3)
    cfg = GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=["simulated/echo"])
    with Gateway(cfg) as gw:
        idle = [socket.create_connection(("127.0.0.1", gw.port), timeout=CLIENT_TIMEOUT_S) for _ in range(3)]
        try:
            # wait until the gateway holds all three (each in its own thread, waiting for a request line)
            for _ in range(400):
                if gw.open_connections == 3:
                    break
                threading.Event().wait(0.05)
            assert gw.open_connections == 3
            with socket.create_connection(("127.0.0.1", gw.port), timeout=CLIENT_TIMEOUT_S) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
                try:
                    assert extra.recv(100) == b""  # closed unanswered
                except ConnectionResetError:
                    pass
        finally:
            for s in idle:
                s.close()
        for _ in range(400):  # the slots come back once the idle connections are gone
            try:
                if httpx.get(f"{gw.url}/health", timeout=CLIENT_TIMEOUT_S).status_code == 200:
                    break
            except httpx.TransportError:
                threading.Event().wait(0.05)
        else:
            pytest.fail("the gateway did not serve again after the idle connections closed")
        still_serves(gw)


def test_a_client_that_never_reads_its_stream_stalls_only_itself(gw):
    big = "word " * 1_600_000  # an 8 MB answer, streamed: far more than the socket buffers hold
    body = json.dumps({"model": "simulated/echo", "max_tokens": 5, "stream": True,
                       "messages": [{"role": "user", "content": big}]}).encode()
    with socket.socket() as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(CLIENT_TIMEOUT_S)
        stuck.connect(("127.0.0.1", gw.port))
        stuck.sendall(post_head(str(len(body))) + body)  # ... and never reads the answer
        for _ in range(3):
            still_serves(gw)
