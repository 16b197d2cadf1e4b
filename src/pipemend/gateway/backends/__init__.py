"""Backends by model name, and the registry that picks them.

=====================================  ==========================================
model name                             backend
=====================================  ==========================================
``claude-*``                           ``anthropic``: the real API, key held by the gateway
``local/qwen2.5-coder-1.5b-instruct``  ``local``: llama-cpp-python on the CPU
``scripted:PATH``                      ``scripted``: replies from a file (strict fake)
``simulated/echo`` and kin             ``simulated``: deterministic fakes for fast tests
``package.module:Class``               a plugin class, built with no arguments
=====================================  ==========================================

A registry builds each backend once and keeps it, so state (a script's used
entries, the loaded local model) lives as long as the registry.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from pathlib import Path
from typing import Any

from ...protocols import LLMBackend
from .base import BackendError, forward_headers
from .local import MODEL_NAME as LOCAL_MODEL
from .simulated import SIMULATED

__all__ = ["BackendError", "BackendRegistry", "LLMBackend", "backend_kind", "forward_headers", "get_backend"]

_PLUGIN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def known_backends() -> list[str]:
    return ["claude-* (anthropic)", f"{LOCAL_MODEL} (local)", "scripted:PATH (scripted)", *SIMULATED,
            "package.module:Class (plugin)"]


def backend_kind(model: str) -> str:
    """The backend family a model name selects: anthropic, local, scripted, simulated or plugin."""
    if model.startswith("claude-"):
        return "anthropic"
    if model == LOCAL_MODEL:
        return "local"
    if model.startswith("scripted:"):
        return "scripted"
    if model in SIMULATED:
        return "simulated"
    if _PLUGIN.match(model):
        return "plugin"
    raise BackendError(400, f"unknown model {model!r}; known backends: {', '.join(known_backends())}")


class BackendRegistry:
    """Builds and keeps one backend per model name (one anthropic backend for all ``claude-*``)."""

    def __init__(self, api_key: str | None = None, *, upstream_url: str | None = None, **anthropic_options: Any):
        self._api_key = api_key
        self._upstream_url = upstream_url
        self._anthropic_options = anthropic_options
        self._backends: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> LLMBackend:
        kind = backend_kind(model)
        key = "claude-*" if kind == "anthropic" else model
        with self._lock:
            if key not in self._backends:
                self._backends[key] = self._build(kind, model)
            return self._backends[key]

    def _build(self, kind: str, model: str) -> Any:
        if kind == "anthropic":
            from .anthropic import AnthropicBackend

            return AnthropicBackend(self._api_key, upstream_url=self._upstream_url, **self._anthropic_options)
        if kind == "local":
            from .local import LocalBackend

            return LocalBackend()
        if kind == "scripted":
            from .scripted import ScriptedBackend

            path = Path(model.removeprefix("scripted:")).expanduser()
            return ScriptedBackend(path, name=model)
        if kind == "simulated":
            return SIMULATED[model](model)
        module_name, _, cls_name = model.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as e:
            raise BackendError(400, f"cannot load backend plugin {model!r}: {e}") from e
        return cls()

    def loaded(self) -> dict[str, Any]:
        """The backends built so far, by model name (``claude-*`` for the anthropic one)."""
        with self._lock:
            return dict(self._backends)


_default: BackendRegistry | None = None


def get_backend(model: str) -> LLMBackend:
    """The backend for ``model`` from the process-wide registry (anthropic key from ``ANTHROPIC_API_KEY``)."""
    global _default
    if _default is None:
        _default = BackendRegistry(os.environ.get("ANTHROPIC_API_KEY"))
    return _default.get(model)
