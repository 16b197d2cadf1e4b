"""The HTTP side: a threading HTTP/1.1 server (keep-alive) on TCP, and optionally on a unix socket.

Routes: ``POST /v1/messages`` (any query string, e.g. ``?beta=true``),
``POST /v1/messages/count_tokens``, ``GET /pipemend/stats``, ``GET /health``.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .backends import BackendError, BackendRegistry
from .budget import Budget
from .cache import ResponseCache, default_cache_dir
from .calllog import CallLog
from .config import GatewayConfig, load_api_key
from .service import GatewayService, Reply, error_reply, json_reply

log = logging.getLogger("pipemend.gateway")
MAX_BODY = 64 << 20
IDLE_TIMEOUT_S = 300


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pipemend-gateway"
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S
    service: GatewayService
    connections: set[socket.socket]

    def setup(self) -> None:
        super().setup()
        self.connections.add(self.connection)

    def finish(self) -> None:
        self.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s", format % args)

    def _body(self) -> bytes | None:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY:
            return None
        return self.rfile.read(length)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("content-type", reply.content_type)
        self.send_header("content-length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            raw = self._body()
        except ValueError:
            self.close_connection = True
            return self._send(error_reply(BackendError(400, "malformed chunked request body")))
        if raw is None:
            self.close_connection = True
            return self._send(error_reply(BackendError(413, f"request body over {MAX_BODY} bytes")))
        if path == "/v1/messages":
            reply = self.service.handle_messages(raw, self.headers)
        elif path == "/v1/messages/count_tokens":
            reply = self.service.count_tokens(raw)
        else:
            reply = error_reply(BackendError(404, f"no such endpoint: POST {path}"))
        self._send(reply)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/pipemend/stats":
            self._send(json_reply(200, self.service.stats()))
        elif path == "/health":
            self._send(json_reply(200, {"ok": True}))
        else:
            self._send(error_reply(BackendError(404, f"no such endpoint: GET {path}")))


class _UnixHandler(_Handler):
    disable_nagle_algorithm = False  # no TCP_NODELAY on a unix socket

    def address_string(self) -> str:
        return "unix"


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


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
        budget = Budget(cfg.budget_usd, cfg.budget_tokens)
        budget.load_spent(self.calls_path)
        calls = CallLog(self.calls_path)
        self.service = GatewayService(self.registry, ResponseCache(cfg.cache_dir or default_cache_dir()), calls, budget)
        attrs = {"service": self.service, "connections": self._connections}
        try:
            tcp = _TCPServer((cfg.host, cfg.port), type("Handler", (_Handler,), attrs))
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
        return f"http://{self.config.host}:{self.port}"

    @property
    def socket_path(self) -> Path | None:
        return self.config.socket_path

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
) -> None:
    """``pipemend gateway``: serve in the foreground until Ctrl-C or SIGTERM."""
    import signal

    config = GatewayConfig(run_dir=Path(run_dir), port=port, budget_usd=budget_usd, budget_tokens=budget_tokens,
                           cache_dir=cache_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Gateway(config) as gateway:
        print(f"pipemend gateway on {gateway.url} (call log {gateway.calls_path}); Ctrl-C stops it", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        stats = gateway.stats()
    print(f"gateway stopped: {stats['calls']} calls, {stats['cache_hits']} cache hits, ${stats['cost_usd']:.4f}")
