"""The OpenAI Chat Completions front end: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A Chat Completions request is translated into the Messages request the backends already take, goes
through the same ``GatewayService.call`` (allow-list, backend, cache, budget, call log with
``"api": "openai-chat"``), and the Messages response is translated back: a ``chat.completion``
object, or ``chat.completion.chunk`` server-sent events ending in ``data: [DONE]`` (with a last
usage-only chunk when ``stream_options.include_usage`` is set). So an OpenAI request and the
equivalent Messages request share one cache entry, and the call log holds the Messages form either
way (what scoring and the diagnosis read).

What is translated:

- ``system``/``developer`` messages before the first other turn become ``system``; later ones stay
  ``system``-role turns (the Messages path passes those through);
- text and ``image_url`` content parts; an assistant's ``tool_calls`` (JSON-string ``arguments``)
  become ``tool_use`` blocks and ``tool`` messages ``tool_result`` blocks; turns of one role in a
  row are merged;
- ``max_completion_tokens`` (else ``max_tokens``, else ``DEFAULT_MAX_TOKENS``), ``temperature``
  (OpenAI's 0..2, capped at the Messages API's 1), ``top_p``, ``stop``, ``tools``, ``tool_choice``
  and ``parallel_tool_calls``;
- other parameters (``seed``, ``user``, ``logprobs``, ``response_format``, ...) are accepted and
  not applied; ``n`` above 1 and the legacy ``functions``/``function_call`` are refused.

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the status
the Messages path would give.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator, Mapping
from urllib.parse import unquote

from .backends.base import BackendError
from .service import GatewayService, Reply, json_reply
from .sse import text_chunks
from .validate import check_request, parse_json

CHAT_API = "openai-chat"
"""The call log's ``api`` of a ``POST /v1/chat/completions`` call."""
DEFAULT_MAX_TOKENS = 4096
"""``max_tokens`` of a request that names none (the Messages API requires one; OpenAI's does not)."""
MAX_TEMPERATURE = 1.0  # the Messages API's top; OpenAI allows up to 2
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                  "refusal": "content_filter", "pause_turn": "stop"}
TOOL_CHOICES = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}
SSE_HEADERS = "text/event-stream; charset=utf-8"
SHOWN = 100  # characters of a refused value echoed back


class ChatRequestError(BackendError):
    """A Chat Completions request the gateway cannot take: a 400 naming the parameter (``param``)."""

    def __init__(self, param: str, message: str):
        super().__init__(400, f"{param}: {message}", "invalid_request_error")
        self.param = param


# --------------------------------------------------------------------------- errors


def _shown(value: Any) -> str:
    """``repr(value)``, clipped: a refused value is echoed back, and a request may be 32 MiB."""
    text = repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + "…"


def error_body(error: BackendError) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI's API writes it, for a ``BackendError`` of either front end."""
    status, kind, code = error.status, "invalid_request_error", None
    if status == 401:
        kind, code = "authentication_error", "invalid_api_key"
    elif status == 403:
        kind = "permission_error"
    elif status == 404:
        code = "model_not_found" if error.message.startswith("model ") else "not_found"
    elif status == 408:
        code = "timeout"
    elif status == 413:
        code = "request_too_large"
    elif status == 429:
        kind, code = "rate_limit_error", "rate_limit_exceeded"
    elif status >= 500:
        kind, code = "server_error", None
    return {"error": {"message": error.message, "type": kind, "param": getattr(error, "param", None), "code": code}}


def error_reply(error: BackendError, headers: Mapping[str, str] | None = None) -> Reply:
    # The gateway has already retried what is worth retrying; the SDK should not retry on top.
    return json_reply(error.status, error_body(error), {"x-should-retry": "false", **(headers or {})})


# --------------------------------------------------------------------------- request: Chat Completions → Messages


def _text_parts(content: Any, where: str, *, images: bool) -> str | list[dict[str, Any]]:
    """A message's content as Messages content: a string stays one; a list of parts becomes blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatRequestError(where, "expected a string or a list of content parts")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.{j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise ChatRequestError(f"{at}.{kind}", "expected a string")
            blocks.append({"type": "text", "text": text})
        elif kind == "image_url" and images:
            blocks.append(_image_block(part.get("image_url"), at))
        else:
            allowed = "'text' or 'image_url'" if images else "'text'"
            raise ChatRequestError(f"{at}.type", f"expected a content part of type {allowed}, got {_shown(kind)}")
    return blocks


def _image_block(image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str) or not url:
        raise ChatRequestError(f"{where}.image_url.url", "expected an image URL string")
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        media_type = header.removeprefix("data:").removesuffix(";base64")
        if not sep or not header.endswith(";base64") or not media_type:
            raise ChatRequestError(f"{where}.image_url.url", "expected a base64 data URL (data:image/png;base64,...)")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ChatRequestError(f"{where}.function.name", "expected a function call with a name")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise ChatRequestError(f"{where}.id", "expected the tool call's id (a string)")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise ChatRequestError(f"{where}.function.arguments", "expected a string holding a JSON object")
    return {"type": "tool_use", "id": call_id, "name": function["name"], "input": parsed}


def _turn(message: Any, i: int) -> dict[str, Any]:
    """One non-system Chat Completions message as a Messages turn."""
    where = f"messages.{i}"
    role = message.get("role")
    if role == "user":
        return {"role": "user", "content": _text_parts(message.get("content"), f"{where}.content", images=True)}
    if role == "assistant":
        content = message.get("content")
        parts = [] if content is None else _text_parts(content, f"{where}.content", images=False)
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ChatRequestError(f"{where}.tool_calls", "expected a list of tool calls")
        if not calls:
            return {"role": "assistant", "content": parts}
        blocks = [{"type": "text", "text": parts}] if isinstance(parts, str) and parts else list(parts or [])
        blocks += [_tool_use(call, f"{where}.tool_calls.{j}") for j, call in enumerate(calls)]
        return {"role": "assistant", "content": blocks}
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ChatRequestError(f"{where}.tool_call_id", "expected the id of the tool call this answers")
        result = _text_parts(message.get("content"), f"{where}.content", images=False)
        return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": result}]}
    raise ChatRequestError(f"{where}.role",
                           f"expected 'system', 'developer', 'user', 'assistant' or 'tool', got {_shown(role)}")


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _messages(messages: Any) -> tuple[str, list[dict[str, Any]]]:
    """The system text and the Messages turns of a Chat Completions ``messages`` list."""
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError("messages", "expected a non-empty list of messages")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatRequestError(f"messages.{i}", "expected an object with role and content")
        if message.get("role") in ("system", "developer"):
            content = _text_parts(message.get("content"), f"messages.{i}.content", images=False)
            text = content if isinstance(content, str) else "\n".join(b["text"] for b in content)
            if not turns:
                system.append(text)
            else:
                turns.append({"role": "system", "content": text})
            continue
        turn = _turn(message, i)
        if turns and turns[-1]["role"] == turn["role"]:  # e.g. several tool results, then the user's words
            turns[-1] = {"role": turn["role"], "content": _blocks(turns[-1]["content"]) + _blocks(turn["content"])}
        else:
            turns.append(turn)
    if not turns:
        raise ChatRequestError("messages", "expected at least one user message besides system messages")
    return "\n\n".join(system), turns


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise ChatRequestError("tools", "expected a list of tools")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ChatRequestError(f"tools.{i}", "expected {\"type\": \"function\", \"function\": {\"name\", ...}}")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ChatRequestError(f"tools.{i}.function.parameters", "expected a JSON Schema object")
        spec: dict[str, Any] = {"name": function["name"], "input_schema": parameters}
        if isinstance(function.get("description"), str):
            spec["description"] = function["description"]
        out.append(spec)
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if isinstance(choice, str) and choice in TOOL_CHOICES:
        return dict(TOOL_CHOICES[choice])
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]:
        return {"type": "tool", "name": function["name"]}
    raise ChatRequestError("tool_choice", "expected 'none', 'auto', 'required' or "
                                          "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ChatRequestError(name, f"expected a number between {low:g} and {high:g}")
    return value


def to_messages_request(body: Any) -> tuple[dict[str, Any], bool, bool]:
    """A Chat Completions request body as ``(messages_request, stream, include_usage)``, or a 400
    ``ChatRequestError`` naming the parameter at fault."""
    if not isinstance(body, dict):
        raise ChatRequestError("body", f"expected a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ChatRequestError("model", "field required (a model name string)")
    for legacy in ("functions", "function_call"):
        if legacy in body:
            raise ChatRequestError(legacy, "the legacy function-calling parameters are not served; use tools and "
                                           "tool_choice")
    system, turns = _messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ChatRequestError("max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                               "expected an integer >= 1")
    request: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": turns}
    if system:
        request["system"] = system
    if (temperature := _number(body, "temperature", 0, 2)) is not None:
        request["temperature"] = min(temperature, MAX_TEMPERATURE)
    if (top_p := _number(body, "top_p", 0, 1)) is not None:
        request["top_p"] = top_p
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ChatRequestError("stop", "expected a string or a list of strings")
        if stop:
            request["stop_sequences"] = stop
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ChatRequestError("n", "this gateway answers one choice per request (n = 1)")
    if body.get("tools"):
        request["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        request["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("parallel_tool_calls") is False and request.get("tools"):
        request["tool_choice"] = {**request.get("tool_choice", {"type": "auto"}), "disable_parallel_tool_use": True}
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ChatRequestError("stream", "expected true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ChatRequestError("stream_options", "expected {\"include_usage\": true|false}")
    check_request(request)  # what reaches a backend is a valid Messages request, whatever came in
    return request, stream, bool(options.get("include_usage", False))


# --------------------------------------------------------------------------- response: Messages → Chat Completions


def _usage(response: dict[str, Any]) -> dict[str, Any]:
    usage = response.get("usage") or {}
    cached = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cached + int(usage.get("cache_creation_input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _tool_calls(response: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"id": str(block.get("id") or f"call_{i}"), "type": "function",
         "function": {"name": str(block.get("name", "")),
                      "arguments": json.dumps(block.get("input") or {}, separators=(",", ":"), ensure_ascii=False)}}
        for i, block in enumerate(response.get("content") or [])
        if isinstance(block, dict) and block.get("type") == "tool_use"
    ]


def _text(response: dict[str, Any]) -> str:
    return "".join(str(b.get("text", "")) for b in response.get("content") or []
                   if isinstance(b, dict) and b.get("type") == "text")


def _finish_reason(response: dict[str, Any], tool_calls: list[dict[str, Any]]) -> str:
    reason = FINISH_REASONS.get(str(response.get("stop_reason")), "stop")
    return "tool_calls" if tool_calls and reason == "stop" else reason


def chat_completion(response: dict[str, Any], model: str, completion_id: str, created: int) -> dict[str, Any]:
    """A Messages response as a ``chat.completion`` object."""
    calls = _tool_calls(response)
    text = _text(response)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(response, calls)}],
        "usage": _usage(response), "system_fingerprint": None,
    }


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode("utf-8")


def stream_events(completion: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """The ``chat.completion.chunk`` events that stream ``completion``, then ``data: [DONE]``."""
    head = {k: completion[k] for k in ("id", "created", "model", "system_fingerprint")}
    choice, message = completion["choices"][0], completion["choices"][0]["message"]

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        data: dict[str, Any] = {**head, "object": "chat.completion.chunk",
                                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if include_usage:
            data["usage"] = None
        return _sse(data)

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for piece in text_chunks(message.get("content") or ""):
        yield chunk({"content": piece})
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call["function"]
        yield chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                     "function": {"name": function["name"], "arguments": ""}}]})
        for piece in text_chunks(function["arguments"]):
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    yield chunk({}, choice["finish_reason"])
    if include_usage:
        yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": completion["usage"]})
    yield b"data: [DONE]\n\n"


# --------------------------------------------------------------------------- the routes


def handle_chat_completions(service: GatewayService, raw: bytes, headers: Mapping[str, str]) -> Reply:
    """``POST /v1/chat/completions``: one call through ``service``, answered as OpenAI's API would."""
    asked: dict[str, Any] = {}

    def parse() -> dict[str, Any]:
        request, asked["stream"], asked["include_usage"] = to_messages_request(parse_json(raw))
        return request

    outcome = service.call(parse, raw, headers, api=CHAT_API)
    if outcome.error is not None:
        return error_reply(outcome.error, outcome.headers)
    assert outcome.response is not None and outcome.request is not None
    completion = chat_completion(outcome.response, outcome.request["model"],
                                 "chatcmpl-" + outcome.call_id.removeprefix("c-"), int(time.time()))
    if asked.get("stream"):
        body = b"".join(stream_events(completion, asked.get("include_usage", False)))
        return Reply(200, body, SSE_HEADERS, outcome.headers)
    return json_reply(200, completion, outcome.headers)


def _model_object(name: str) -> dict[str, Any]:
    owner = "anthropic" if name.startswith("claude-") else "pipemend"
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


def list_models(service: GatewayService) -> Reply:
    """``GET /v1/models``: the models this gateway serves (its host's allow-list; ``claude-*`` stands for
    every Claude model)."""
    return json_reply(200, {"object": "list", "data": [_model_object(n) for n in service.models.names]})


def retrieve_model(service: GatewayService, quoted_name: str) -> Reply:
    """``GET /v1/models/{model}``: the model if this gateway serves it, else OpenAI's 404."""
    name = unquote(quoted_name)
    try:
        service.models.check(name)
    except BackendError as e:
        return error_reply(e)
    return json_reply(200, _model_object(name))
