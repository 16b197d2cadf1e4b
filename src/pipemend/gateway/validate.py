"""Checks a Messages request just enough to refuse what no backend could answer.

Unknown keys pass through untouched (clients such as Claude Code send
``thinking``, ``metadata``, ``context_management``, ``output_config`` and
more), and so do ``system``-role messages among the turns, which Claude Code
uses for its environment notes.
"""

from __future__ import annotations

import json
from typing import Any

from .backends.base import BackendError

ROLES = ("user", "assistant", "system")
MAX_DEPTH = 64  # nesting of arrays and objects in a request (tool schemas nest a dozen deep at most)


def _bad(message: str) -> BackendError:
    return BackendError(400, message, "invalid_request_error")


def parse_json(raw: bytes) -> Any:
    """A request body parsed as JSON, nested at most ``MAX_DEPTH`` deep, or a 400 ``BackendError``.

    The body's size is already bounded by the server; the depth bound keeps every later step
    (cache key, call log, backends) clear of the recursion limit.
    """
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _bad(f"request body is nested more than {MAX_DEPTH} deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"request body is not valid JSON: {e}") from e
    if _depth(body) > MAX_DEPTH:
        raise _bad(f"request body is nested more than {MAX_DEPTH} deep")
    return body


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value`` (iterative; stops counting past ``MAX_DEPTH``)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_request(raw: bytes) -> dict[str, Any]:
    """The request body as a dict, or a 400 ``BackendError`` saying what is wrong."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise _bad(f"request body must be a JSON object, got {type(body).__name__}")
    check_request(body)
    return body


def check_request(body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: field required (a model name string)")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad("max_tokens: field required (an integer >= 1)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: field required (a non-empty list of messages)")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages.{i}: expected an object with role and content")
        if message.get("role") not in ROLES:
            raise _bad(f"messages.{i}.role: expected 'user', 'assistant' or 'system', got {message.get('role')!r}")
        content = message.get("content")
        if isinstance(content, list):
            for j, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise _bad(f"messages.{i}.content.{j}: expected a content block with a 'type'")
        elif not isinstance(content, str):
            raise _bad(f"messages.{i}.content: expected a string or a list of content blocks")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise _bad("system: expected a string or a list of text blocks")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1
    ):
        raise _bad("temperature: expected a number between 0 and 1")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise _bad("stop_sequences: expected a list of strings")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _bad("stream: expected true or false")
    if "tools" in body and not isinstance(body["tools"], list):
        raise _bad("tools: expected a list of tool definitions")
