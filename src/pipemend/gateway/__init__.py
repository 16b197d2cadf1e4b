"""The Anthropic-compatible LLM gateway: every LLM call of a run goes through it.

``Gateway(GatewayConfig(run_dir=...)).start()`` serves ``POST /v1/messages``
(plain and SSE streaming) on ``gw.url`` and optionally a unix socket; it serves
only the models its host configured (``GatewayConfig.models``: a request never
chooses code on the host), picks their backends by name (``backends``), bounds
every input a request sends (``server``, ``validate``), answers repeats from a content cache
(``cache``), enforces the run's budget (``budget``) and logs every call to
``RUN_DIR/gateway/calls.jsonl`` (``calllog``).

The names below are loaded on first use (PEP 562): code that needs one leaf of this package,
``gateway.pricing`` for a proposer's budget above all, must not pay for the server and every backend
(numpy, llama.cpp's bindings). A plugin proposer's sandbox imports the budget once per proposal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends import BackendError, BackendRegistry, get_backend
    from .config import GatewayConfig
    from .server import Gateway, serve_forever_cli

_EXPORTS = {"BackendError": ".backends", "BackendRegistry": ".backends", "get_backend": ".backends",
            "GatewayConfig": ".config", "Gateway": ".server", "serve_forever_cli": ".server"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
