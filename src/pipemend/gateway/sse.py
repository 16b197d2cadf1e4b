"""Server-sent events of the Messages API, synthesized from a complete response.

message_start, then per content block content_block_start, its deltas
(text_delta, input_json_delta, thinking_delta + signature_delta) and
content_block_stop, then message_delta (stop reason, usage) and message_stop.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

TEXT_CHUNK = 200  # characters per text delta (both APIs)


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode("utf-8")


def text_chunks(text: str, size: int = TEXT_CHUNK) -> Iterator[str]:
    for i in range(0, len(text), size):
        yield text[i : i + size]


def _block_events(index: int, block: dict[str, Any]) -> Iterator[bytes]:
    kind = block.get("type")
    if kind == "text":
        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": {"type": "text", "text": ""}})
        for piece in text_chunks(block.get("text", "")):
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": {"type": "text_delta", "text": piece}})
    elif kind in ("tool_use", "server_tool_use"):
        start = {**block, "input": {}}
        yield _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
        partial = json.dumps(block.get("input", {}), separators=(",", ":"), ensure_ascii=False)
        for piece in text_chunks(partial):
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": {"type": "input_json_delta", "partial_json": piece}})
    elif kind == "thinking":
        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
        for piece in text_chunks(block.get("thinking", "")):
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": {"type": "thinking_delta", "thinking": piece}})
        if block.get("signature"):
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": {"type": "signature_delta", "signature": block["signature"]}})
    else:  # redacted_thinking, tool results of server tools, ...: the whole block at start
        yield _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
    yield _event("content_block_stop", {"type": "content_block_stop", "index": index})


def sse_events(response: dict[str, Any]) -> Iterator[bytes]:
    """The SSE byte chunks that stream ``response``."""
    usage = dict(response.get("usage") or {})
    start_usage = {**usage, "output_tokens": min(1, int(usage.get("output_tokens") or 0))}
    message = {**response, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    yield _event("message_start", {"type": "message_start", "message": message})
    for index, block in enumerate(response.get("content") or []):
        yield from _block_events(index, block)
    yield _event("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": response.get("stop_reason"), "stop_sequence": response.get("stop_sequence")},
        "usage": usage,
    })
    yield _event("message_stop", {"type": "message_stop"})


def sse_body(response: dict[str, Any]) -> bytes:
    return b"".join(sse_events(response))
