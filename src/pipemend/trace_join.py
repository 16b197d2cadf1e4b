"""Host-side traces of pipelines that mark no steps: each model call becomes a generation step.

A pipeline written without ``pipemend.trace`` leaves a trace with no steps and
its model calls hanging off the example (``llm_calls`` holds only ids and
token counts). The host knows more: the gateway's call log
(``RUN_DIR/gateway/calls.jsonl``) holds each call's request and answer.
``join_calls`` turns such a trace (no steps, or only joined ones) into one
with a ``generation`` step per call, in call order (the call log's ``t``, when the gateway took the request), whose
``inputs`` are the prompt (``model``, ``system``, ``messages`` as text, either
API's shape: Anthropic Messages or OpenAI Chat Completions) and whose
``output`` is the answer's text (with ``tool_calls`` when the model called
tools). The call's own record moves from the example onto its step.

Joined steps carry ``"source": "call_log"`` (a step the pipeline wrote with
that mark is forged and dropped); a trace with any step the pipeline marked
keeps its steps. ``scoring.score_results`` does the join
(``join_traces=True``, as ``evaluate`` asks) with the calls it charges to
the example, and writes the trace back, so the diagnosis, the agent's
``read_trace``, the history folder and the report all read the same steps.

``prompt_texts`` gives the diagnosis the prompts of a trace's joined steps, and
of the generation steps a framework hook recorded (``runtime/frameworks.py``:
``"source": "dspy"``/``"langchain"``, whose traces are not joined), against
which it checks the gold evidence's text.
"""

from __future__ import annotations

import json
from typing import Any

from .runtime.frameworks import SOURCES as HOOK_SOURCES
from .runtime.trace import CUT_MARK, PROVIDER_KEY

JOINED_SOURCE = "call_log"
MAX_JOINED_CHARS = 4_000_000
"""The text of all of a trace's joined prompts and answers together; each text gets an equal share (a
prompt's text past its share is cut, and a passage there is not found in it)."""
MAX_TRACE_FILE_BYTES = 16 << 20
"""A joined trace must stay readable by every host reader (``fsutil.read_regular``'s default cap)."""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" ... [+{len(text) - limit} chars]"


def content_text(content: Any) -> str:
    """The text of a message's content in either API: a string, or a list of blocks/parts (``text`` ones are
    joined; a tool result's content is read; other blocks, images and tool uses, are shown as JSON)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return json.dumps(content, ensure_ascii=False, default=str)
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif isinstance(block, dict) and block.get("type") == "tool_result":
            parts.append(content_text(block.get("content")))
        else:
            parts.append(json.dumps(block, ensure_ascii=False, default=str))
    return "\n".join(parts)


def call_prompt(request: Any, limit: int = MAX_JOINED_CHARS) -> dict[str, Any]:
    """``{"model", "system", "messages": [{"role", "content"}]}`` of a call-log ``request`` (either API), each
    text cut at ``limit`` characters (an OpenAI assistant turn's ``tool_calls`` are shown in its content); a
    request the gateway could not parse (logged raw) is one message of its text."""
    if isinstance(request, str):
        return {"model": None, "system": None, "messages": [{"role": "raw", "content": _cut(request, limit)}]}
    if not isinstance(request, dict):
        return {"model": None, "system": None, "messages": []}
    system = request.get("system")
    messages = []
    for m in request.get("messages") or []:
        if not isinstance(m, dict):
            continue
        text = content_text(m.get("content"))
        if m.get("tool_calls"):
            text += ("\n" if text else "") + json.dumps(m["tool_calls"], ensure_ascii=False, default=str)
        messages.append({"role": str(m.get("role")), "content": _cut(text, limit)})
    model = request.get("model")
    return {"model": model if isinstance(model, str) else None,
            "system": _cut(content_text(system), limit) if system is not None else None, "messages": messages}


def call_answer(response: Any, limit: int = MAX_JOINED_CHARS) -> Any:
    """The answer of a call-log ``response`` (either API): its text (cut at ``limit``), or ``{"text",
    "tool_calls"}`` when the model called tools; None when there is no response (an error)."""
    if not isinstance(response, dict):
        return None
    tool_calls: list[Any] = []
    if isinstance(response.get("choices"), list):  # OpenAI Chat Completions
        texts = []
        for choice in response["choices"]:
            msg = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(msg, dict):
                texts.append(content_text(msg.get("content")))
                tool_calls += msg.get("tool_calls") or []
        text = "\n".join(texts)
    else:  # Anthropic Messages
        blocks = response.get("content") if isinstance(response.get("content"), list) else []
        text = "".join(b["text"] for b in blocks if isinstance(b, dict) and isinstance(b.get("text"), str))
        tool_calls = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
    text = _cut(text, limit)
    return {"text": text, "tool_calls": tool_calls} if tool_calls else text


API_PROVIDERS = {"anthropic-messages": "anthropic", "openai-chat": "openai", "None": "anthropic"}
"""A call-log row's ``api`` -> the provider its client spoke to (rows older than ``api`` are Messages calls)."""


def _call_record(row: dict[str, Any], recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The step's ``llm_calls`` entry: what the trace recorded for the call, else one from the call log."""
    if recorded is not None:
        return recorded
    return {"call_id": row.get("call_id"), PROVIDER_KEY: API_PROVIDERS.get(str(row.get("api"))),
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": row.get("model"), "gen_ai.usage.input_tokens": row.get("input_tokens"),
            "gen_ai.usage.output_tokens": row.get("output_tokens"), "pipemend.cache_hit": row.get("cache") == "hit",
            "duration_s": row.get("latency_s")}


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _texts_in(row: dict[str, Any]) -> int:
    request = row.get("request")
    n = len(request.get("messages") or []) + 1 if isinstance(request, dict) else 1
    return n + 1  # and the answer


def generation_steps(calls: list[dict[str, Any]], recorded: dict[str, dict[str, Any]] | None = None, *,
                     max_chars: int = MAX_JOINED_CHARS) -> list[dict[str, Any]]:
    """One ``generation`` step (``pipemend-1`` shape, ``"source": "call_log"``) per call-log row, in call order.
    ``recorded``: the trace's own ``llm_calls`` entries by ``call_id``, kept on their steps. Each text (system,
    message, answer) is cut at an equal share of ``max_chars``."""
    recorded = recorded or {}
    limit = max(1, max_chars // max(1, sum(_texts_in(row) for row in calls)))
    order = sorted(range(len(calls)), key=lambda i: (_num(calls[i].get("t")), i))
    steps = []
    for n, i in enumerate(order, start=1):
        row = calls[i]
        err = row.get("error")
        start = _num(row.get("t"))
        steps.append({
            "id": f"call{n}", "parent": None, "name": f"model call {n}", "kind": "generation",
            "inputs": call_prompt(row.get("request"), limit), "output": call_answer(row.get("response"), limit),
            "doc_ids": None, "logs": [], "start": start, "end": start + _num(row.get("latency_s")),
            "error": None if not err else {"type": "GatewayError", "message": json.dumps(err, default=str)[:2000],
                                           "traceback": None},
            "llm_calls": [_call_record(row, recorded.get(str(row.get("call_id"))))],
            "source": JOINED_SOURCE,
        })
    return steps


def _joined(step: Any) -> bool:
    return isinstance(step, dict) and step.get("source") == JOINED_SOURCE


def join_calls(trace: dict[str, Any], calls: list[dict[str, Any]], *,
               max_chars: int = MAX_JOINED_CHARS) -> dict[str, Any] | None:
    """``trace`` with a generation step per call (``calls``: the example's call-log rows, in any order) when the
    pipeline marked no step; None when nothing changes.

    Call it on the trace as the sandbox wrote it: steps there that claim ``"source": "call_log"`` are forged
    and dropped first (so joining an already joined trace again with the same calls gives the same trace)."""
    steps = trace.get("steps")
    if not isinstance(steps, list):
        return None
    kept = [s for s in steps if not _joined(s)]
    forged = len(kept) != len(steps)
    if kept or not calls:
        return {**trace, "steps": kept} if forged else None
    own = [c for c in trace.get("llm_calls") or [] if isinstance(c, dict)]
    recorded = {str(c["call_id"]): c for c in own if c.get("call_id")}
    joined_ids = {str(row.get("call_id")) for row in calls}
    return {**trace, "steps": generation_steps(calls, recorded, max_chars=max_chars),
            "llm_calls": [c for c in own if str(c.get("call_id")) not in joined_ids]}


def joined_trace_bytes(trace: dict[str, Any], calls: list[dict[str, Any]]) -> bytes | None:
    """``join_calls`` encoded as the trace file (UTF-8 JSON), its texts cut further until the file fits
    ``MAX_TRACE_FILE_BYTES``; None when nothing changes (or even the shortest join would not fit)."""
    max_chars = MAX_JOINED_CHARS
    while max_chars >= 1000:
        joined = join_calls(trace, calls, max_chars=max_chars)
        if joined is None:
            return None
        data = json.dumps(joined, ensure_ascii=False, indent=1, default=str).encode("utf-8") + b"\n"
        if len(data) <= MAX_TRACE_FILE_BYTES:
            return data
        max_chars //= 4
    return None


def _prompt_text(inputs: dict[str, Any]) -> str:
    parts = [inputs.get("system") or ""] + [
        content_text(m.get("content")) for m in inputs.get("messages") or [] if isinstance(m, dict)]
    return "\n".join(p for p in parts if isinstance(p, str))


def prompt_texts(trace: dict[str, Any] | None) -> list[str]:
    """The prompt of each model call joined into ``trace``, or recorded by a framework hook (system and messages,
    as one text each). Hooked prompts count only when none of them was cut by the sandbox's trace limits: a cut
    prompt could not show that a passage is missing."""
    joined, hooked = [], []
    for step in (trace or {}).get("steps") or []:
        if not isinstance(step, dict) or step.get("kind") != "generation" or not isinstance(step.get("inputs"), dict):
            continue
        inputs = step["inputs"]
        if step.get("source") == JOINED_SOURCE:
            joined.append(_prompt_text(inputs))
        elif step.get("source") in HOOK_SOURCES and isinstance(inputs.get("messages"), list):
            if CUT_MARK in json.dumps(inputs, ensure_ascii=False, default=str):
                return joined  # a joined trace has no hooked steps: this trace's prompts cannot be checked
            hooked.append(_prompt_text(inputs))
    return joined + hooked
