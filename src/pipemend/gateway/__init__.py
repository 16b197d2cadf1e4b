"""The Anthropic-compatible LLM gateway: every LLM call of a run goes through it.

``Gateway(GatewayConfig(run_dir=...)).start()`` serves ``POST /v1/messages``
(plain and SSE streaming) on ``gw.url`` and optionally a unix socket; it serves
only the models its host configured (``GatewayConfig.models``: a request never
chooses code on the host), picks their backends by name (``backends``), bounds
every input a request sends (``server``, ``validate``), answers repeats from a content cache
(``cache``), enforces the run's budget (``budget``) and logs every call to
``RUN_DIR/gateway/calls.jsonl`` (``calllog``).
"""

from __future__ import annotations

from .backends import BackendError, BackendRegistry, get_backend
from .config import GatewayConfig
from .server import Gateway, serve_forever_cli

__all__ = ["BackendError", "BackendRegistry", "Gateway", "GatewayConfig", "get_backend", "serve_forever_cli"]
