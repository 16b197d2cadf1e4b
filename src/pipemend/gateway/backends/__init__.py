"""Backends by model name, the registry that builds them, and the allow-list a gateway serves.

=====================================  ==========================================
model name                             backend
=====================================  ==========================================
``claude-*``                           ``anthropic``: the real API, key held by the gateway
``local/qwen2.5-coder-1.5b-instruct``  ``local``: llama-cpp-python on the CPU
``scripted:PATH``                      ``scripted``: replies from a file (strict fake)
``simulated/echo`` and kin             ``simulated``: deterministic fakes for fast tests
``package.module:Class``               a plugin class, built with no arguments
=====================================  ==========================================

A request never chooses code on the host: a gateway serves only the models
its host configured (``ModelAllowList``, from ``GatewayConfig.models``); the
test backends (``scripted:``, ``simulated/``) and plugins are served only
when listed there, and every listed model is built when the gateway starts,
so a bad one fails then, on the host. A registry builds each backend once and
keeps it, so state (a script's used entries, the loaded local model) lives
as long as the registry.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

from ...errors import ConfigError, UsageError
from ...plugins import is_dotted_path, resolve
from ...protocols import LLMBackend
from .base import LOCAL_MODEL, BackendError, forward_headers
from .simulated import SIMULATED

__all__ = ["BackendError", "BackendRegistry", "LLMBackend", "ModelAllowList", "backend_kind", "forward_headers",
           "get_backend"]

CLAUDE_FAMILY = "claude-*"
# What a gateway serves when its host lists nothing: the real model families, never a test backend or a plugin.
REAL_FAMILIES = (CLAUDE_FAMILY, LOCAL_MODEL)
MODEL_NAME_LIMIT = 200  # characters of a refused model name echoed back


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
    if is_dotted_path(model):
        return "plugin"
    raise BackendError(400, f"unknown model {model!r}; known backends: {', '.join(known_backends())}")


class ModelAllowList:
    """The model names a gateway answers, set on the host (``GatewayConfig.models``).

    ``None`` means the real families only: any ``claude-*`` model and the local model. A list
    means exactly those names; ``claude-*`` in it stands for every Claude model. A request for
    any other model is refused (404) before a backend is chosen: no import, no file read.
    """

    def __init__(self, models: Sequence[str] | None = None, *, source: object = "gateway config"):
        names = list(REAL_FAMILIES if models is None else models)
        if not names:
            raise ConfigError(source, "models", "an empty list serves nothing",
                              "at least one model name, or none at all for the real families")
        for name in names:
            if name != CLAUDE_FAMILY:
                try:
                    backend_kind(name)
                except BackendError as e:
                    raise ConfigError(source, "models", e.message) from None
        self.names: tuple[str, ...] = tuple(dict.fromkeys(names))
        self.claude_family = CLAUDE_FAMILY in self.names

    def allows(self, model: str) -> bool:
        if model in self.names and model != CLAUDE_FAMILY:
            return True
        return self.claude_family and model.startswith("claude-")

    def check(self, model: str) -> None:
        """Raise the 404 a client sees for a model this gateway does not serve."""
        if not self.allows(model):
            shown = model if len(model) <= MODEL_NAME_LIMIT else model[:MODEL_NAME_LIMIT] + "…"
            raise BackendError(404, f"model {shown!r} is not served by this gateway; it serves only the models "
                                    f"its host configured: {', '.join(self.names)}", "not_found_error")

    def build_all(self, registry: "BackendRegistry", *, source: object = "gateway config") -> None:
        """Build every listed backend now, so that a bad one (a missing script, a plugin that does not
        import) fails when the gateway starts, on the host, instead of on the first request."""
        for name in self.names:
            try:
                registry.get("claude-sonnet-4-5" if name == CLAUDE_FAMILY else name)
            except BackendError as e:
                raise ConfigError(source, f"models: {name}", e.message) from None
            except ConfigError as e:
                raise ConfigError(source, f"models: {name}", str(e)) from None


class BackendRegistry:
    """Builds and keeps one backend per model name (one anthropic backend for all ``claude-*``).

    Host-side only: the gateway checks a request's model against its ``ModelAllowList`` first.
    """

    def __init__(self, api_key: str | None = None, *, upstream_url: str | None = None, **anthropic_options: Any):
        self._api_key = api_key
        self._upstream_url = upstream_url
        self._anthropic_options = anthropic_options
        self._backends: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> LLMBackend:
        kind = backend_kind(model)
        key = CLAUDE_FAMILY if kind == "anthropic" else model
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
        return _load_plugin(model)

    def loaded(self) -> dict[str, Any]:
        """The backends built so far, by model name (``claude-*`` for the anthropic one)."""
        with self._lock:
            return dict(self._backends)


def _load_plugin(model: str) -> Any:
    """A plugin backend ``package.module:Class``, built with no arguments.

    Reached only from a registry, which is host-side: a request's model is checked against the
    host's ``ModelAllowList`` first, so only host configuration ever names a plugin here.
    """
    try:
        cls = resolve(model, {}, kind="backend plugin", allow_dotted=True)
    except UsageError as e:
        raise BackendError(400, f"cannot load {e}") from None
    return cls()


_default: BackendRegistry | None = None


def get_backend(model: str) -> LLMBackend:
    """The backend for ``model`` from the process-wide registry (anthropic key from ``ANTHROPIC_API_KEY``).

    Host code only: it builds whatever ``model`` names, plugins included; never pass it a request's model.
    """
    global _default
    if _default is None:
        _default = BackendRegistry(os.environ.get("ANTHROPIC_API_KEY"))
    return _default.get(model)
