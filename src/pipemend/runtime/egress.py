"""The egress watch: model calls that go around pipemend's gateway, caught inside the sandbox.

Part of ``pipemend.runtime`` (standard library only). A pipeline that calls a
provider pipemend does not route -- a hard-coded base URL, another vendor's
SDK -- gets no traces, no cache, no budget and no cost accounting, and inside a
sandbox with no network it simply fails every example with a connection error.
The runner installs one ``EgressWatch`` so the user learns why on the first
example instead:

- at the HTTP level (``note_request``, called by the runner's httpx hook for
  every request): a request to anything but the gateway whose host is a known
  model provider, or whose path is a model API's (``/v1/chat/completions``,
  ``/v1/messages``, ``:generateContent``, ``/api/chat`` ...), is *unrouted*;
- at the socket level (a ``sys.addaudithook`` on ``socket.getaddrinfo`` and
  ``socket.connect``): a connection to a host other than the gateway and the
  sandbox's own loopback is refused with ``PermissionError`` before it is made
  (whatever the HTTP client). A known provider's host is *unrouted*; any other
  host (telemetry, a model download) is a *blocked* host, reported as a warning;
- imports of other vendors' SDKs are noted, to name the SDK in the message.

The runner stops after the example in which the first unrouted call happened
and writes ``OUT/egress.json`` (``{"format", "unrouted": [...], "blocked":
[...], "sdks": [...]}``); the host turns it into a usage error (exit 2) that
names the host and SDK. Audit hooks cannot be removed, so ``install`` adds one
hook for the process and ``uninstall`` only detaches the watch from it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
import threading
from typing import Any
from urllib.parse import urlsplit

EGRESS_JSON = "egress.json"
EGRESS_FORMAT = "pipemend-egress-1"
MAX_FINDINGS = 20
"""At most this many unrouted calls and blocked hosts are kept (the first ones)."""

PROVIDER_HOSTS = (
    "api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com", "aiplatform.googleapis.com",
    "api.cohere.com", "api.cohere.ai", "api.mistral.ai", "api.groq.com", "api.together.xyz", "api.together.ai",
    "api.fireworks.ai", "api.deepseek.com", "openrouter.ai", "api.perplexity.ai", "api.x.ai",
    "api-inference.huggingface.co", "router.huggingface.co", "api.replicate.com", "api.voyageai.com",
)
"""Model providers' API hosts (a subdomain counts too)."""
PROVIDER_SUFFIXES = (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com")
_BEDROCK = re.compile(r"^bedrock(-runtime|-agent-runtime)?(-fips)?\.[a-z0-9-]+\.amazonaws\.com$")
MODEL_API_PATH = re.compile(
    r"/(v\d+(beta\d*)?/)?(chat/completions|completions|messages|responses|embeddings)/?$"
    r"|:(generateContent|streamGenerateContent|predict|rawPredict)$"
    r"|^/api/(chat|generate|embed|embeddings)/?$"
    r"|/model/[^/]+/(invoke|invoke-with-response-stream|converse|converse-stream)$"
)
"""Paths of model APIs: OpenAI and Anthropic style, Gemini/Vertex, Ollama, Bedrock."""
OTHER_SDKS = {
    "google.generativeai": "google-generativeai", "google.genai": "google-genai", "vertexai": "vertexai",
    "cohere": "cohere", "mistralai": "mistralai", "groq": "groq", "together": "together",
    "fireworks": "fireworks-ai", "replicate": "replicate", "ollama": "ollama", "boto3": "boto3 (Bedrock)",
    "huggingface_hub": "huggingface_hub", "voyageai": "voyageai",
}
"""Top-level modules of SDKs whose calls the gateway does not serve, and the name to show."""


def is_provider_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    return (any(host == h or host.endswith("." + h) for h in PROVIDER_HOSTS)
            or host.endswith(PROVIDER_SUFFIXES) or bool(_BEDROCK.match(host)))


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class EgressWatch:
    """What the pipeline tried to reach besides the gateway at ``gateway_url``."""

    def __init__(self, gateway_url: str | None):
        parts = urlsplit(gateway_url or "")
        self.gateway_host = (parts.hostname or "").lower()
        self.gateway_port = parts.port or (443 if parts.scheme == "https" else 80) if parts.hostname else None
        self.unrouted: list[dict[str, Any]] = []
        self.blocked: list[dict[str, Any]] = []
        self.sdks: list[str] = []
        self._lock = threading.Lock()
        self._first_unrouted_example: str | None = None

    # ------------------------------------------------------------------ what counts as the gateway

    def is_gateway(self, host: str, port: int | None) -> bool:
        if not self.gateway_host:
            return False
        host = host.lower().rstrip(".")
        same_host = host == self.gateway_host or (_is_loopback(host) and _is_loopback(self.gateway_host))
        return same_host and (port is None or port == self.gateway_port)

    # ------------------------------------------------------------------ findings

    @property
    def found_unrouted(self) -> bool:
        return bool(self.unrouted)

    def note_request(self, url: str, example_id: str | None, user_agent: str | None = None) -> None:
        """An HTTP request the pipeline is about to send (the runner's httpx hook)."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if not host:
            return
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = None
        if self.is_gateway(host, port):
            return
        if is_provider_host(host) or MODEL_API_PATH.search(parts.path or ""):
            self._unrouted(f"{parts.scheme}://{parts.netloc}{parts.path}", host, example_id, user_agent)

    def _unrouted(self, where: str, host: str, example_id: str | None, user_agent: str | None) -> None:
        with self._lock:
            if any(u["host"] == host for u in self.unrouted) or len(self.unrouted) >= MAX_FINDINGS:
                return
            self.unrouted.append({"host": host, "url": where[:300], "example_id": example_id,
                                  "user_agent": (user_agent or "")[:120] or None})

    def _blocked(self, host: str, port: Any) -> None:
        with self._lock:
            if any(b["host"] == host for b in self.blocked) or len(self.blocked) >= MAX_FINDINGS:
                return
            self.blocked.append({"host": host, "port": port if isinstance(port, int) else None})

    def audit(self, event: str, args: tuple[Any, ...], example_id: str | None) -> None:
        """The audit hook's body: refuse a connection that is not the gateway's or loopback."""
        if event == "import":
            name = args[0] if args and isinstance(args[0], str) else ""
            for mod, shown in OTHER_SDKS.items():
                if (name == mod or name.startswith(mod + ".")) and shown not in self.sdks:
                    self.sdks.append(shown)
            return
        if event == "socket.getaddrinfo":
            host, port = args[0], args[1]
            if isinstance(host, bytes):
                host = host.decode("ascii", "replace")
            if not isinstance(host, str) or not host or _is_loopback(host):
                return
            port_num = int(port) if isinstance(port, int) or (isinstance(port, str) and port.isdigit()) else None
            if self.is_gateway(host, port_num):
                return
            self._refuse(host.lower(), port_num, example_id)
        elif event == "socket.connect":
            sock, address = args[0], args[1]
            if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
                return  # unix sockets (the gateway's, a multiprocessing pipe) and the like
            if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
                return
            host, port = address[0], address[1] if len(address) > 1 else None
            if _is_loopback(host) or self.is_gateway(host, port if isinstance(port, int) else None):
                return
            self._refuse(host.lower(), port, example_id)

    def _refuse(self, host: str, port: Any, example_id: str | None) -> None:
        if is_provider_host(host):
            self._unrouted(f"{host}:{port}" if port else host, host, example_id, None)
        else:
            self._blocked(host, port)
        raise PermissionError(f"pipemend: network access to {host}{f':{port}' if port else ''} is blocked: "
                              "model calls go through pipemend's gateway ($ANTHROPIC_BASE_URL, $OPENAI_BASE_URL)")

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {"format": EGRESS_FORMAT, "unrouted": list(self.unrouted), "blocked": list(self.blocked),
                    "sdks": list(self.sdks)}


_watch: EgressWatch | None = None
_installed = False
_current_example: Any = None
"""A callable giving the current example id (the runner passes ``trace.current_example_id``)."""


def _hook(event: str, args: tuple[Any, ...]) -> None:
    watch = _watch
    if watch is None or not (event == "import" or event.startswith("socket.")):
        return
    example = _current_example() if _current_example is not None else None
    watch.audit(event, args, example)


def install(watch: EgressWatch, current_example: Any = None) -> EgressWatch:
    """Make ``watch`` the process's egress watch (adding the audit hook the first time)."""
    global _watch, _installed, _current_example
    _watch, _current_example = watch, current_example
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    return watch


def uninstall() -> None:
    """Detach the watch; the (irremovable) hook then does nothing."""
    global _watch
    _watch = None


def current() -> EgressWatch | None:
    return _watch


def describe(finding: dict[str, Any]) -> str:
    """One sentence for the host's error message, from a (hostile, already type-checked) ``egress.json``."""
    unrouted = [u for u in finding.get("unrouted") or [] if isinstance(u, dict)]
    sdks = [s for s in finding.get("sdks") or [] if isinstance(s, str)]
    if not unrouted:
        return ""
    first = unrouted[0]
    hosts = ", ".join(sorted({str(u.get("host")) for u in unrouted}))
    where = f" in example {first.get('example_id')!r}" if first.get("example_id") else ""
    sdk = f"; SDK seen: {', '.join(sdks)}" if sdks else (
        f"; client: {first.get('user_agent')}" if first.get("user_agent") else "")
    return (f"the pipeline called {hosts} directly{where} ({first.get('url')}{sdk}), which pipemend does not route: "
            "point the client at pipemend's gateway ($ANTHROPIC_BASE_URL for the anthropic SDK, $OPENAI_BASE_URL "
            "for the openai SDK and LiteLLM's openai/ models) instead of a hard-coded URL or another vendor's SDK")
