"""Fake models for fast tests and benchmarks. Their names start with ``simulated/``.

They are chosen only when a request names them; nothing falls back to them.
All are deterministic (the gateway caches their answers whatever the temperature)
except the two sampled ones, which draw at random when a request asks for a
temperature > 0 (so the gateway caches them per draw, like a real model):

- ``simulated/echo``: answers with the last user message's text.
- ``simulated/slow-echo``: the same after 0.3 s (for concurrency tests).
- ``simulated/tool-echo``: if tools are offered and the last user turn is not a
  tool result, calls the first tool with ``{"text": <last user text>}``;
  otherwise answers with the last user text.
- ``simulated/fail``: always fails with a 500 (errors are never cached).
- ``simulated/sampled``: echoes; a sampled request's answer ends with `` #`` and a random
  token, so every draw differs from every other.
- ``simulated/noisy``: echoes; a sampled request's answer is, with probability
  ``NOISE`` (0.1), ``noise`` and a random token instead (a noisy pipeline's flips).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from typing import Any

from .base import BackendError, estimate_tokens, last_user_text, message_response, request_text

NOISE = 0.1
"""How often ``simulated/noisy`` answers a sampled request wrongly."""


class SimulatedBackend:
    """Base of the ``simulated/*`` fakes: counts its calls, estimates usage from text length."""

    cache_namespace = "simulated-1"
    deterministic = True
    delay_s = 0.0

    def __init__(self, name: str):
        self.name = name
        self.calls = 0
        self._lock = threading.Lock()

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        content, stop_reason = self.reply(request)
        out_text = "".join(b.get("text", "") or str(b.get("input", "")) for b in content)
        response = message_response(
            self.name,
            content,
            stop_reason=stop_reason,
            input_tokens=estimate_tokens(request_text(request)),
            output_tokens=estimate_tokens(out_text),
        )
        response["id"] = "msg_sim_" + hashlib.sha256(repr((request, content)).encode()).hexdigest()[:20]
        return response

    def reply(self, request: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        return [{"type": "text", "text": last_user_text(request)}], "end_turn"


class EchoBackend(SimulatedBackend):
    pass


class SlowEchoBackend(SimulatedBackend):
    delay_s = 0.3


class ToolEchoBackend(SimulatedBackend):
    def reply(self, request: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        tools = request.get("tools") or []
        messages = request.get("messages") or []
        last = messages[-1] if messages else {}
        is_tool_result = isinstance(last.get("content"), list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in last["content"]
        )
        if tools and not is_tool_result:
            digest = hashlib.sha256(last_user_text(request).encode()).hexdigest()[:20]
            block = {
                "type": "tool_use",
                "id": f"toolu_sim_{digest}",
                "name": tools[0].get("name", "tool"),
                "input": {"text": last_user_text(request)},
            }
            return [block], "tool_use"
        return super().reply(request)


class FailBackend(SimulatedBackend):
    def reply(self, request: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        raise BackendError(500, "simulated/fail always fails")


def _sampled(request: dict[str, Any]) -> bool:
    temperature = request.get("temperature", 0)
    return isinstance(temperature, (int, float)) and temperature > 0


class SampledEchoBackend(SimulatedBackend):
    deterministic = False

    def reply(self, request: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        text = last_user_text(request)
        if _sampled(request):
            text += " #" + secrets.token_hex(8)
        return [{"type": "text", "text": text}], "end_turn"


class NoisyEchoBackend(SimulatedBackend):
    deterministic = False

    def reply(self, request: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        if _sampled(request) and secrets.randbelow(1_000_000) < NOISE * 1_000_000:
            return [{"type": "text", "text": "noise " + secrets.token_hex(4)}], "end_turn"
        return super().reply(request)


SIMULATED = {
    "simulated/echo": EchoBackend,
    "simulated/slow-echo": SlowEchoBackend,
    "simulated/tool-echo": ToolEchoBackend,
    "simulated/fail": FailBackend,
    "simulated/sampled": SampledEchoBackend,
    "simulated/noisy": NoisyEchoBackend,
}
