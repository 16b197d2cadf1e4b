"""The HTTP side: a threading HTTP/1.1 server (keep-alive) on TCP, and optionally on a unix socket.

Routes: ``POST /v1/messages`` (any query string, e.g. ``?beta=true``),
``POST /v1/messages/count_tokens``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{model}`` (the OpenAI routes: ``openai_api``), ``GET /pipemend/stats``, ``GET /health``.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import signal
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import UsageError
from . import openai_api
from .backends import BackendError, BackendRegistry, ModelAllowList
from .budget import Budget
from .cache import ResponseCache, default_cache_dir
from .calllog import CallLog
from .config import GatewayConfig, load_api_key
from .service import GatewayService, Reply, error_reply, json_reply

log = logging.getLogger("pipemend.gateway")
# What a request may send: the pipeline is untrusted, so every input is bounded, and a slow or
# hostile client costs its own connection, never the gateway.
MAX_BODY = 32 << 20          # bytes of a request body (the Messages API's own limit is 32 MB)
MAX_CHUNK_LINE = 1024        # bytes of a chunk-size line or a trailer line of a chunked body
MAX_TRAILERS = 64            # trailer lines after a chunked body
BODY_DEADLINE_S = 120.0      # to receive a whole body, however it is dribbled
IDLE_TIMEOUT_S = 300         # any single read or write on a connection
MAX_CONNECTIONS = 1024       # open connections at once (one thread each); more are closed unanswered
# Request line and headers: http.server caps each line at 64 KiB and the headers at 100.


CHAT_PATH = "/v1/chat/completions"

_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,20}")


class _BadBody(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pipemend-gateway"
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S
    service: GatewayService
    connections: set[socket.socket]
    token: str | None = None
    """``GatewayConfig.token`` on TCP (the unix socket's file mode guards it instead)."""

    def setup(self) -> None:
        super().setup()
        self.connections.add(self.connection)

    def finish(self) -> None:
        self.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s", format % args)

    def _read(self, n: int, deadline: float) -> bytes:
        """Exactly ``n`` bytes of the body, in pieces, within the body's deadline."""
        parts, left = [], n
        while left:
            self._wait_until(deadline)
            try:
                piece = self.rfile.read1(min(left, 1 << 16))
            except TimeoutError:
                raise _BadBody(408, f"request body not received within {BODY_DEADLINE_S:.0f} s") from None
            if not piece:
                raise _BadBody(400, "request body ended early (connection closed)")
            parts.append(piece)
            left -= len(piece)
        return b"".join(parts)

    def _wait_until(self, deadline: float) -> None:
        """The next read may block until ``deadline`` at most."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise _BadBody(408, f"request body not received within {BODY_DEADLINE_S:.0f} s")
        self.connection.settimeout(min(left, IDLE_TIMEOUT_S))

    def _line(self, deadline: float) -> bytes:
        self._wait_until(deadline)
        try:
            line = self.rfile.readline(MAX_CHUNK_LINE + 1)
        except TimeoutError:
            raise _BadBody(408, f"request body not received within {BODY_DEADLINE_S:.0f} s") from None
        if len(line) > MAX_CHUNK_LINE:
            raise _BadBody(400, f"malformed chunked request body: a line over {MAX_CHUNK_LINE} bytes")
        if not line:
            raise _BadBody(400, "malformed chunked request body: it ended early")
        return line

    def _chunked(self, deadline: float) -> bytes:
        chunks, total = [], 0
        while True:
            text = self._line(deadline).split(b";")[0].strip()
            if not _HEX.fullmatch(text):
                raise _BadBody(400, "malformed chunked request body: bad chunk size")
            size = int(text, 16)
            if size == 0:
                for _ in range(MAX_TRAILERS + 1):
                    if self._line(deadline) in (b"\r\n", b"\n"):
                        return b"".join(chunks)
                raise _BadBody(400, f"malformed chunked request body: over {MAX_TRAILERS} trailer lines")
            total += size
            if total > MAX_BODY:
                raise _BadBody(413, f"request body over {MAX_BODY} bytes")
            chunks.append(self._read(size, deadline))
            if self._line(deadline) not in (b"\r\n", b"\n"):
                raise _BadBody(400, "malformed chunked request body: a chunk is longer than its size")

    def _body(self) -> bytes:
        try:
            return self._body_within(time.monotonic() + BODY_DEADLINE_S)
        finally:
            self.connection.settimeout(IDLE_TIMEOUT_S)

    def _body_within(self, deadline: float) -> bytes:
        if self.headers.get("transfer-encoding", "").strip().lower() == "chunked":
            return self._chunked(deadline)
        if self.headers.get("transfer-encoding"):
            raise _BadBody(400, "unsupported transfer-encoding (expected chunked or none)")
        lengths = self.headers.get_all("content-length") or ["0"]
        text = lengths[0].strip()
        if len(set(lengths)) > 1 or not _DIGITS.fullmatch(text):
            raise _BadBody(400, "content-length: expected one non-negative integer")
        length = int(text)
        if length > MAX_BODY:
            raise _BadBody(413, f"request body over {MAX_BODY} bytes")
        return self._read(length, deadline)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("content-type", reply.content_type)
        self.send_header("content-length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)

    def _path(self) -> str | None:
        """The request's path without its query and without the token's ``/t/<token>`` prefix; None (and a 401
        sent, the connection closed) when the gateway has a token and the request carries neither it there nor in
        ``x-pipemend-token``."""
        path = self.path.split("?", 1)[0].rstrip("/")
        if self.token is None:
            return path
        prefix = f"/t/{self.token}"
        if hmac.compare_digest(path[:len(prefix)].encode(), prefix.encode()) and path[len(prefix):][:1] in ("", "/"):
            return path[len(prefix):]
        if hmac.compare_digest(self.headers.get("x-pipemend-token", "").encode(), self.token.encode()):
            return path
        self.close_connection = True
        self._send(error_reply(BackendError(401, "this gateway needs its run's token (GatewayConfig.token)")))
        return None

    def do_POST(self) -> None:
        path = self._path()
        if path is None:
            return
        openai = path == CHAT_PATH
        try:
            raw = self._body()
        except _BadBody as e:  # the rest of the stream cannot be trusted: answer, then close
            self.close_connection = True
            error = BackendError(e.status, str(e))
            return self._send(openai_api.error_reply(error) if openai else error_reply(error))
        if path == "/v1/messages":
            reply = self.service.handle_messages(raw, self.headers)
        elif path == "/v1/messages/count_tokens":
            reply = self.service.count_tokens(raw)
        elif openai:
            reply = openai_api.handle_chat_completions(self.service, raw, self.headers)
        else:
            reply = error_reply(BackendError(404, f"no such endpoint: POST {path}"))
        self._send(reply)

    def do_GET(self) -> None:
        path = self._path()
        if path is None:
            return
        if path == "/pipemend/stats":
            self._send(json_reply(200, self.service.stats()))
        elif path == "/health":
            self._send(json_reply(200, {"ok": True}))
        elif path == "/v1/models":
            self._send(openai_api.list_models(self.service))
        elif path.startswith("/v1/models/"):
            self._send(openai_api.retrieve_model(self.service, path.removeprefix("/v1/models/")))
        else:
            self._send(error_reply(BackendError(404, f"no such endpoint: GET {path}")))


class _UnixHandler(_Handler):
    disable_nagle_algorithm = False  # no TCP_NODELAY on a unix socket

    def address_string(self) -> str:
        return "unix"


class _Bounded:
    """A threading server that holds at most ``MAX_CONNECTIONS`` connections (one thread each)."""

    daemon_threads = True
    _slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("gateway: over %d connections; closing a new one", MAX_CONNECTIONS)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._slots.release()


class _TCPServer(_Bounded, ThreadingHTTPServer):
    def __init__(self, *args: Any, **kwargs: Any):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)


class _UnixServer(_Bounded, socketserver.ThreadingUnixStreamServer):
    def __init__(self, *args: Any, **kwargs: Any):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)


class Gateway:
    """The gateway: ``Gateway(cfg).start()`` serves in background threads until ``stop()``."""

    def __init__(self, config: GatewayConfig, registry: BackendRegistry | None = None):
        self.config = config
        self.registry = registry or BackendRegistry(load_api_key(config))
        self.calls_path = Path(config.run_dir) / "gateway" / "calls.jsonl"
        self.service: GatewayService | None = None
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._port: int | None = None

    def start(self) -> "Gateway":
        if self.service is not None:
            raise UsageError("this gateway is already started")
        cfg = self.config
        models = ModelAllowList(cfg.models)
        models.build_all(self.registry)
        calls = CallLog(self.calls_path)  # repairs a torn last line before anything reads or appends
        budget = Budget(cfg.budget_usd, cfg.budget_tokens)
        budget.load_spent(self.calls_path)
        self.service = GatewayService(self.registry, ResponseCache(cfg.cache_dir or default_cache_dir()), calls, budget,
                                      models)
        attrs = {"service": self.service, "connections": self._connections}
        try:
            tcp = _TCPServer((cfg.host, cfg.port), type("Handler", (_Handler,), {**attrs, "token": cfg.token}))
        except OSError as e:
            calls.close()
            raise UsageError(f"gateway cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from e
        self._port = tcp.server_address[1]
        self._servers.append(tcp)
        if cfg.socket_path is not None:
            path = Path(cfg.socket_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()
            unix = _UnixServer(str(path), type("UnixHandler", (_UnixHandler,), attrs))
            os.chmod(path, 0o666)  # sandboxes run as another uid (65534)
            self._servers.append(unix)
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                                      name="pipemend-gateway")
            thread.start()
            self._threads.append(thread)
        log.info("gateway listening on %s%s", self.url, f" and {cfg.socket_path}" if cfg.socket_path else "")
        return self

    @property
    def port(self) -> int:
        if self._port is None:
            raise UsageError("the gateway is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, and ``/t/<token>`` after it when the gateway has a token (the runner makes it
        ``ANTHROPIC_BASE_URL``, so every request of the pipeline carries it)."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        token = f"/t/{self.config.token}" if self.config.token else ""
        return f"http://{host}:{self.port}{token}"

    @property
    def address(self) -> str:
        """``http://HOST:PORT`` without the token: for logs and journals."""
        return self.url.split("/t/", 1)[0]

    @property
    def socket_path(self) -> Path | None:
        return self.config.socket_path

    @property
    def open_connections(self) -> int:
        """How many client connections the gateway holds open now (capped at ``MAX_CONNECTIONS``)."""
        return len(self._connections)

    def stats(self) -> dict[str, Any]:
        if self.service is None:
            raise UsageError("the gateway is not started")
        return self.service.stats()

    def flush(self) -> None:
        """Wait until every call so far is in the call log on disk."""
        if self.service is not None:
            self.service.calls.flush()

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for conn in list(self._connections):  # idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join()
        if self.service is not None:
            self.service.calls.close()
        if self.config.socket_path is not None and Path(self.config.socket_path).is_socket():
            Path(self.config.socket_path).unlink()
        self._servers, self._threads = [], []

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever_cli(
    port: int,
    run_dir: Path,
    budget_usd: float | None = None,
    budget_tokens: int | None = None,
    cache_dir: Path | None = None,
    models: list[str] | None = None,
) -> None:
    """``pipemend gateway``: serve in the foreground until Ctrl-C or SIGTERM.

    ``models``: the model names to serve (``GatewayConfig.models``); None serves the real families only.
    """

    config = GatewayConfig(run_dir=Path(run_dir), port=port, budget_usd=budget_usd, budget_tokens=budget_tokens,
                           cache_dir=cache_dir, models=models)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Gateway(config) as gateway:
        served = ", ".join(ModelAllowList(models).names)
        print(f"pipemend gateway on {gateway.url} serving {served} (call log {gateway.calls_path}); Ctrl-C stops it",
              flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        stats = gateway.stats()
    print(f"gateway stopped: {stats['calls']} calls, {stats['cache_hits']} cache hits, ${stats['cost_usd']:.4f}")
