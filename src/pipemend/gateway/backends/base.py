"""What every backend shares: the error it raises and helpers to read a Messages request."""

from __future__ import annotations

import contextvars
import uuid
from typing import Any

LOCAL_MODEL = "local/qwen2.5-coder-1.5b-instruct"
"""The one model the ``local`` backend serves (here, so that naming it does not load llama.cpp or numpy)."""

# Anthropic error types by HTTP status, for replies the gateway builds itself.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    529: "overloaded_error",
}

# Headers of the client request that a forwarding backend may pass on (``anthropic-beta``).
# Set by the gateway around ``complete()``; the ``LLMBackend`` protocol itself stays body-only.
forward_headers: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("forward_headers", default={})


class BackendError(Exception):
    """A backend could not answer; the gateway replies with an Anthropic-style error.

    ``status`` is the HTTP status of that reply, ``error_type`` the Anthropic error type.
    Errors are logged but never cached.
    """

    def __init__(self, status: int, message: str, error_type: str | None = None):
        self.status = status
        self.message = message
        self.error_type = error_type or ERROR_TYPES.get(status, "api_error")
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.error_type, "message": self.message}}


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or text/tool_result blocks joined by newlines."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content or []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind == "tool_result":
            parts.append(text_of(block.get("content", "")))
    return "\n".join(p for p in parts if p)


def system_text(request: dict[str, Any]) -> str:
    return text_of(request.get("system") or "")


def last_user_text(request: dict[str, Any]) -> str:
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token) for backends without a tokenizer."""
    return max(1, (len(text) + 3) // 4) if text else 0


def request_text(request: dict[str, Any]) -> str:
    """All text a request carries (system and every message), for token estimates."""
    texts = [system_text(request)]
    texts += [text_of(m.get("content")) for m in request.get("messages") or [] if isinstance(m, dict)]
    return "\n".join(texts)


def message_response(
    model: str,
    content: list[dict[str, Any]],
    *,
    stop_reason: str = "end_turn",
    input_tokens: int = 0,
    output_tokens: int = 0,
    stop_sequence: str | None = None,
    id_prefix: str = "msg_",
) -> dict[str, Any]:
    """A complete Messages API response body."""
    return {
        "id": f"{id_prefix}{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }
