"""A TCP → unix-socket forwarder: how a sandbox with no network reaches the host gateway.

The gateway's unix socket is mounted into the sandbox; the runner starts a
``Forwarder`` on ``127.0.0.1:<free port>`` and points ``ANTHROPIC_BASE_URL``
and ``OPENAI_BASE_URL`` (plus ``/v1``) at it, so an unchanged pipeline (plain
httpx, the anthropic or openai SDK) talks to the gateway under either API. Each TCP connection is piped byte for byte to a fresh connection on
the socket, both ways, until both sides close. ``python -m pipemend.runtime.forwarder
SOCKET [--port N]`` runs one in the foreground. Standard library only (``pipemend.runtime``).
"""

from __future__ import annotations

import argparse
import selectors
import socket
import socketserver
import sys
import threading
from pathlib import Path

_CHUNK = 64 * 1024


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes a→b and b→a until both directions have ended."""
    sel = selectors.DefaultSelector()
    peer = {a: b, b: a}
    open_ = {a, b}
    for s in open_:
        sel.register(s, selectors.EVENT_READ)
    try:
        while open_:
            for key, _ in sel.select():
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = src.recv(_CHUNK)
                except OSError:
                    data = b""
                dst = peer[src]
                if data:
                    try:
                        dst.sendall(data)
                        continue
                    except OSError:
                        return  # the other side is gone: drop the connection
                sel.unregister(src)
                open_.discard(src)
                try:
                    dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                except OSError:
                    pass
    finally:
        sel.close()


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        client: socket.socket = self.request
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.server.socket_path)
        except OSError as e:
            body = f"pipemend forwarder: gateway socket {self.server.socket_path} unreachable: {e}\n".encode()
            try:
                client.sendall(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            except OSError:
                pass
            upstream.close()
            return
        try:
            _pipe(client, upstream)
        finally:
            upstream.close()


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, socket_path: str):
        self.socket_path = socket_path
        super().__init__((host, port), _Handler)


class Forwarder:
    """Listens on ``host:port`` (port 0: a free one) and forwards to the unix socket ``socket_path``."""

    def __init__(self, socket_path: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.socket_path = str(socket_path)
        self._server = _Server(host, port, self.socket_path)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Forwarder:
        self._thread = threading.Thread(target=self._server.serve_forever, name="pipemend-forwarder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Forwarder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipemend.runtime.forwarder", description=__doc__.splitlines()[0])
    p.add_argument("socket", help="the gateway's unix socket")
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    args = p.parse_args(argv)
    fwd = Forwarder(args.socket, port=args.port).start()
    print(f"[forwarder] {fwd.url} -> unix:{args.socket}", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    fwd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
